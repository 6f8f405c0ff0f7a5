#!/usr/bin/env python3
"""gRPC interop test client and server on grpcio, for running gRPC's official
interop test cases (grpc.testing.TestService) through the Meshwire mesh.

    interop.py client --target HOST:PORT --authority NAME --cases a,b,c
        Runs the named client test cases (or "all") against TARGET, sending
        :authority NAME (channel option grpc.default_authority) so that a
        sidecar routes by it. Runs every case, prints PASS/FAIL per case and
        exits 1 if any failed.

    interop.py server --port 0 --port-file PATH
        Serves TestService on 127.0.0.1:PORT and, once serving, writes the
        bound port to PATH (atomically). Runs until SIGTERM/SIGINT.

The case and server behaviours follow gRPC's interop test descriptions
(doc/interop-test-descriptions.md in grpc/grpc). The Python stubs are
generated at start-up with grpc_tools.protoc from <repo>/proto into a
temporary directory; nothing generated is kept.

Needs grpcio and grpcio-tools: ./scripts/setup-test-deps.sh installs them
into <repo>/.venv.
"""

import argparse
import importlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent import futures

import grpc

PROTO_ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
)
PROTOS = (
    "grpc/testing/empty.proto",
    "grpc/testing/messages.proto",
    "grpc/testing/test.proto",
)

# Large enough for the mesh's 16 MiB messages; the cases themselves stay < 1 MiB.
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

ECHO_INITIAL_KEY = "x-grpc-test-echo-initial"
ECHO_TRAILING_KEY = "x-grpc-test-echo-trailing-bin"
INITIAL_VALUE = "test_initial_metadata_value"
TRAILING_VALUE = b"\xab\xab\xab"

# Every call a client case makes is bounded, so a hung call fails its case
# instead of hanging the test.
CALL_TIMEOUT = 30.0

empty_pb2 = messages_pb2 = test_pb2_grpc = None


def load_stubs():
    """Generates the Python stubs (python -m grpc_tools.protoc) into a temp
    dir, imports them, and removes the dir."""
    global empty_pb2, messages_pb2, test_pb2_grpc
    out = tempfile.mkdtemp(prefix="meshwire-interop-stubs-")
    try:
        protoc = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "--proto_path=" + PROTO_ROOT,
                "--python_out=" + out,
                "--grpc_python_out=" + out,
                *PROTOS,
            ],
            capture_output=True,
            text=True,
        )
        if protoc.returncode != 0:
            raise SystemExit(
                "python -m grpc_tools.protoc failed (%d) on %s:\n%s%s"
                % (protoc.returncode, PROTO_ROOT, protoc.stdout, protoc.stderr)
            )
        sys.path.insert(0, out)
        # The protos live at grpc/testing/*.proto, so the generated modules are
        # grpc.testing.*_pb2 (and import each other under that name). `grpc` is
        # grpcio's own package, which has no `testing` subpackage: extend its
        # search path so that grpc.testing resolves to the generated directory.
        grpc.__path__.append(os.path.join(out, "grpc"))
        empty_pb2 = importlib.import_module("grpc.testing.empty_pb2")
        messages_pb2 = importlib.import_module("grpc.testing.messages_pb2")
        test_pb2_grpc = importlib.import_module("grpc.testing.test_pb2_grpc")
    finally:
        # Everything is imported by now: nothing is left behind, even when the
        # process is later killed (as the tests' servers are).
        shutil.rmtree(out, ignore_errors=True)


# === server ===

CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number):
    return CODES.get(number, grpc.StatusCode.UNKNOWN)


def echo_metadata(context):
    md = dict(context.invocation_metadata())
    if ECHO_INITIAL_KEY in md:
        context.send_initial_metadata(((ECHO_INITIAL_KEY, md[ECHO_INITIAL_KEY]),))
    if ECHO_TRAILING_KEY in md:
        context.set_trailing_metadata(((ECHO_TRAILING_KEY, md[ECHO_TRAILING_KEY]),))


def abort_if_status(request, context):
    """Ends the call with request.response_status, if one is set."""
    if request.HasField("response_status") and request.response_status.code != 0:
        context.abort(
            status_code(request.response_status.code), request.response_status.message
        )


def payload(size):
    return messages_pb2.Payload(type=messages_pb2.COMPRESSABLE, body=b"\x00" * size)


def sleep_us(us):
    if us > 0:
        time.sleep(us / 1e6)


class TestService:
    """grpc.testing.TestService as the interop server behaves."""

    def EmptyCall(self, request, context):
        echo_metadata(context)
        return empty_pb2.Empty()

    def UnaryCall(self, request, context):
        echo_metadata(context)
        abort_if_status(request, context)
        return messages_pb2.SimpleResponse(payload=payload(request.response_size))

    def CacheableUnaryCall(self, request, context):
        return self.UnaryCall(request, context)

    def StreamingOutputCall(self, request, context):
        echo_metadata(context)
        abort_if_status(request, context)
        for params in request.response_parameters:
            sleep_us(params.interval_us)
            yield messages_pb2.StreamingOutputCallResponse(payload=payload(params.size))

    def StreamingInputCall(self, request_iterator, context):
        echo_metadata(context)
        size = sum(len(r.payload.body) for r in request_iterator)
        return messages_pb2.StreamingInputCallResponse(aggregated_payload_size=size)

    def FullDuplexCall(self, request_iterator, context):
        echo_metadata(context)
        for request in request_iterator:
            abort_if_status(request, context)
            for params in request.response_parameters:
                sleep_us(params.interval_us)
                yield messages_pb2.StreamingOutputCallResponse(
                    payload=payload(params.size)
                )

    def HalfDuplexCall(self, request_iterator, context):
        echo_metadata(context)
        requests = list(request_iterator)
        for request in requests:
            abort_if_status(request, context)
            for params in request.response_parameters:
                sleep_us(params.interval_us)
                yield messages_pb2.StreamingOutputCallResponse(
                    payload=payload(params.size)
                )

    def UnimplementedCall(self, request, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "UnimplementedCall")


def serve(args):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16), options=CHANNEL_OPTIONS
    )
    servicer = TestService()
    test_pb2_grpc.add_TestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    if port == 0:
        raise SystemExit("cannot bind 127.0.0.1:%d" % args.port)
    server.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.replace(tmp, args.port_file)
    print("interop server listening on 127.0.0.1:%d" % port, flush=True)
    while not stop.wait(1.0):
        pass
    server.stop(grace=1.0).wait()
    return 0


# === client ===


class CaseFailure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise CaseFailure(what)


def expect_payload(response, size):
    body = response.payload.body
    expect(
        response.payload.type == messages_pb2.COMPRESSABLE,
        "payload type %r, expected COMPRESSABLE" % response.payload.type,
    )
    expect(len(body) == size, "payload of %d bytes, expected %d" % (len(body), size))
    expect(body == b"\x00" * size, "payload of %d bytes is not all zeros" % size)


def expect_code(err, code, details=None):
    expect(
        err.code() == code,
        "status %s (%r), expected %s" % (err.code(), err.details(), code),
    )
    if details is not None:
        expect(
            err.details() == details,
            "status message %r, expected %r" % (err.details(), details),
        )


def streaming_request(size, request_size=0, interval_us=0, **kw):
    return messages_pb2.StreamingOutputCallRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_parameters=[
            messages_pb2.ResponseParameters(size=size, interval_us=interval_us)
        ],
        payload=payload(request_size),
        **kw,
    )


class Pipe:
    """A request iterator the test feeds one message at a time."""

    def __init__(self):
        self._q = queue.Queue()

    def add(self, msg):
        self._q.put(msg)

    def close(self):
        self._q.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        msg = self._q.get()
        if msg is None:
            raise StopIteration()
        return msg

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def case_empty_unary(stub, channel):
    resp = stub.EmptyCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    expect(isinstance(resp, empty_pb2.Empty), "response is %r, not Empty" % (resp,))


def case_large_unary(stub, channel):
    req = messages_pb2.SimpleRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_size=314159,
        payload=payload(271828),
    )
    expect_payload(stub.UnaryCall(req, timeout=CALL_TIMEOUT), 314159)


def case_client_streaming(stub, channel):
    sizes = (27182, 8, 1828, 45904)
    reqs = (messages_pb2.StreamingInputCallRequest(payload=payload(s)) for s in sizes)
    resp = stub.StreamingInputCall(reqs, timeout=CALL_TIMEOUT)
    expect(
        resp.aggregated_payload_size == 74922,
        "aggregated_payload_size %d, expected 74922" % resp.aggregated_payload_size,
    )


def case_server_streaming(stub, channel):
    sizes = (31415, 9, 2653, 58979)
    req = messages_pb2.StreamingOutputCallRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_parameters=[messages_pb2.ResponseParameters(size=s) for s in sizes],
    )
    got = list(stub.StreamingOutputCall(req, timeout=CALL_TIMEOUT))
    expect(len(got) == len(sizes), "%d responses, expected %d" % (len(got), len(sizes)))
    for resp, size in zip(got, sizes):
        expect_payload(resp, size)


def case_ping_pong(stub, channel):
    pairs = ((31415, 27182), (9, 8), (2653, 1828), (58979, 45904))
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=CALL_TIMEOUT)
        for size, request_size in pairs:
            pipe.add(streaming_request(size, request_size))
            expect_payload(next(responses), size)
        pipe.close()
        rest = list(responses)
        expect(not rest, "%d responses after the last ping" % len(rest))


def case_empty_stream(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=CALL_TIMEOUT)
        pipe.close()
        got = list(responses)
        expect(not got, "%d responses to an empty stream" % len(got))


def case_timeout_on_sleeping_server(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=0.001)
        pipe.add(messages_pb2.StreamingOutputCallRequest(payload=payload(27182)))
        try:
            next(responses)
        except grpc.RpcError as err:
            expect_code(err, grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            raise CaseFailure("a response arrived; expected DEADLINE_EXCEEDED")


def case_cancel_after_begin(stub, channel):
    with Pipe() as pipe:
        fut = stub.StreamingInputCall.future(pipe, timeout=CALL_TIMEOUT)
        fut.cancel()
        expect(fut.cancelled(), "future not cancelled")
        expect(
            fut.code() == grpc.StatusCode.CANCELLED,
            "status %s, expected CANCELLED" % fut.code(),
        )


def case_cancel_after_first_response(stub, channel):
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=CALL_TIMEOUT)
        pipe.add(streaming_request(31415, 27182))
        expect_payload(next(responses), 31415)
        responses.cancel()
        try:
            next(responses)
        except grpc.RpcError as err:
            expect_code(err, grpc.StatusCode.CANCELLED)
        else:
            raise CaseFailure("a response arrived after cancel; expected CANCELLED")


def case_custom_metadata(stub, channel):
    md = ((ECHO_INITIAL_KEY, INITIAL_VALUE), (ECHO_TRAILING_KEY, TRAILING_VALUE))

    def check(where, initial, trailing):
        initial, trailing = dict(initial), dict(trailing)
        expect(
            initial.get(ECHO_INITIAL_KEY) == INITIAL_VALUE,
            "%s: initial metadata %s=%r, expected %r (got %r)"
            % (where, ECHO_INITIAL_KEY, initial.get(ECHO_INITIAL_KEY), INITIAL_VALUE, initial),
        )
        expect(
            trailing.get(ECHO_TRAILING_KEY) == TRAILING_VALUE,
            "%s: trailing metadata %s=%r, expected %r (got %r)"
            % (where, ECHO_TRAILING_KEY, trailing.get(ECHO_TRAILING_KEY), TRAILING_VALUE, trailing),
        )

    req = messages_pb2.SimpleRequest(
        response_type=messages_pb2.COMPRESSABLE,
        response_size=314159,
        payload=payload(271828),
    )
    resp, call = stub.UnaryCall.with_call(req, metadata=md, timeout=CALL_TIMEOUT)
    expect_payload(resp, 314159)
    check("UnaryCall", call.initial_metadata(), call.trailing_metadata())

    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, metadata=md, timeout=CALL_TIMEOUT)
        pipe.add(streaming_request(314159, 271828))
        pipe.close()
        got = list(responses)
        expect(len(got) == 1, "FullDuplexCall: %d responses, expected 1" % len(got))
        expect_payload(got[0], 314159)
        check("FullDuplexCall", responses.initial_metadata(), responses.trailing_metadata())


def expect_status_echo(stub, message):
    status = messages_pb2.EchoStatus(code=2, message=message)
    req = messages_pb2.SimpleRequest(response_status=status)
    try:
        stub.UnaryCall(req, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        expect_code(err, grpc.StatusCode.UNKNOWN, message)
    else:
        raise CaseFailure("UnaryCall succeeded; expected UNKNOWN %r" % message)
    return status


def case_status_code_and_message(stub, channel):
    message = "test status message"
    status = expect_status_echo(stub, message)
    with Pipe() as pipe:
        responses = stub.FullDuplexCall(pipe, timeout=CALL_TIMEOUT)
        pipe.add(messages_pb2.StreamingOutputCallRequest(response_status=status))
        pipe.close()
        try:
            got = list(responses)
        except grpc.RpcError as err:
            expect_code(err, grpc.StatusCode.UNKNOWN, message)
        else:
            raise CaseFailure(
                "FullDuplexCall ended OK with %d responses; expected UNKNOWN" % len(got)
            )


def case_special_status_message(stub, channel):
    expect_status_echo(
        stub, "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"
    )


def case_unimplemented_method(stub, channel):
    try:
        stub.UnimplementedCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        expect_code(err, grpc.StatusCode.UNIMPLEMENTED)
    else:
        raise CaseFailure("UnimplementedCall succeeded; expected UNIMPLEMENTED")


def case_unimplemented_service(stub, channel):
    other = test_pb2_grpc.UnimplementedServiceStub(channel)
    try:
        other.UnimplementedCall(empty_pb2.Empty(), timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        expect_code(err, grpc.StatusCode.UNIMPLEMENTED)
    else:
        raise CaseFailure("UnimplementedService succeeded; expected UNIMPLEMENTED")


CASES = {
    name[len("case_") :]: fn
    for name, fn in list(globals().items())
    if name.startswith("case_")
}


def run_client(args):
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print("unknown case(s): %s (known: %s)" % (", ".join(unknown), ", ".join(CASES)))
        return 2
    options = CHANNEL_OPTIONS + [("grpc.default_authority", args.authority)]
    channel = grpc.insecure_channel(args.target, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=CALL_TIMEOUT)
    except grpc.FutureTimeoutError:
        print("FAIL: cannot connect to %s within %ss" % (args.target, CALL_TIMEOUT))
        return 1
    stub = test_pb2_grpc.TestServiceStub(channel)
    failed = []
    for name in names:
        start = time.monotonic()
        try:
            CASES[name](stub, channel)
        except CaseFailure as e:
            failed.append(name)
            print("FAIL %s: %s" % (name, e), flush=True)
        except grpc.RpcError as e:
            failed.append(name)
            print(
                "FAIL %s: unexpected RPC error %s: %r" % (name, e.code(), e.details()),
                flush=True,
            )
        except Exception:
            failed.append(name)
            print("FAIL %s: %s" % (name, traceback.format_exc()), flush=True)
        else:
            ms = (time.monotonic() - start) * 1000
            print("PASS %s (%.0f ms)" % (name, ms), flush=True)
    channel.close()
    passed = len(names) - len(failed)
    print("%d passed, %d failed" % (passed, len(failed)))
    if failed:
        print("failed cases: %s" % ",".join(failed))
        return 1
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("client", help="run interop client test cases")
    c.add_argument("--target", required=True, help="HOST:PORT to connect to")
    c.add_argument("--authority", required=True, help=":authority to send")
    c.add_argument("--cases", default="all", help="comma-separated case names, or all")
    s = sub.add_parser("server", help="serve grpc.testing.TestService")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    s.add_argument("--port-file", required=True, help="file to write the bound port to")
    args = parser.parse_args()
    load_stubs()
    return run_client(args) if args.mode == "client" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
