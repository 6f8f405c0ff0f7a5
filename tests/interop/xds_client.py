#!/usr/bin/env python3
"""A proxyless gRPC client (grpcio, xDS resolver) for Meshwire's control plane.

    xds_client.py --xds HOST:PORT --target xds:///echo --calls N [--node-id ID]

Writes a gRPC xDS bootstrap (gRFC A27) pointing at the control plane, then
makes N unary `meshwire.example.v1.Echo/Echo` calls on the channel
`xds:///<service>`: grpcio resolves the service through Listener (API
listener), RouteConfiguration, Cluster and ClusterLoadAssignment from our xDS
server and balances over the endpoints itself. Prints one JSON line:
{"servers": {name: calls}, "errors": [...]} and exits 0 if every call worked.

The Python stubs are generated at run time from <repo>/proto with
grpc_tools.protoc into a temp dir (nothing generated is kept).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")


def load_stubs():
    out = tempfile.mkdtemp(prefix="meshwire-xds-stubs-")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", "-I", PROTO_ROOT,
             "--python_out", out, "--grpc_python_out", out,
             "meshwire/example/v1/echo.proto"],
            capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("grpc_tools.protoc failed: %s%s" % (r.stdout, r.stderr))
        sys.path.insert(0, out)
        from meshwire.example.v1 import echo_pb2, echo_pb2_grpc  # noqa: E402
        return echo_pb2, echo_pb2_grpc
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--xds", required=True, help="control plane HOST:PORT")
    p.add_argument("--target", default="xds:///echo")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--node-id", default="grpc-proxyless-1")
    p.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()

    bootstrap = {
        "xds_servers": [{
            "server_uri": args.xds,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": args.node_id, "cluster": "grpc-proxyless", "locality": {}},
    }
    fd, path = tempfile.mkstemp(prefix="meshwire-xds-bootstrap-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(bootstrap, f)
    # Read by grpcio when the xds channel is created.
    os.environ["GRPC_XDS_BOOTSTRAP"] = path
    try:
        import grpc  # noqa: E402
        echo_pb2, echo_pb2_grpc = load_stubs()
        servers, errors = {}, []
        with grpc.insecure_channel(args.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for _ in range(args.calls):
                try:
                    reply = stub.Echo(echo_pb2.EchoRequest(payload=b"hi"),
                                      timeout=args.timeout, wait_for_ready=True)
                    servers[reply.server] = servers.get(reply.server, 0) + 1
                except grpc.RpcError as e:
                    errors.append("%s: %s" % (e.code(), e.details()))
                    break  # one failure says it all; do not wait out every call
        print(json.dumps({"servers": servers, "errors": errors}), flush=True)
        return 0 if not errors else 1
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
