"""A REST app on Python's standard http.server (HTTP/1.1, keep-alive), the
kind of app a user puts behind a sidecar. Used by tests/tests/protocols.rs.

Prints its port on the first line of stdout, then serves until killed.

  GET  /hello         JSON: the request line, Host and forwarding headers, conn id
  HEAD /hello         the same headers, no body
  GET  /chunked       a chunked response (Transfer-Encoding: chunked)
  GET  /big?n=N       N bytes with Content-Length
  GET  /empty         204
  GET  /cached        304
  GET  /close         answers with Connection: close
  GET  /status?code=N a small JSON body with status N
  POST /upload        reads the body (Content-Length or chunked) as it streams,
                      answers JSON {bytes, sha256}
"""

import hashlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

NEXT_CONN = [0]
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with LOCK:
            NEXT_CONN[0] += 1
            self.conn_id = NEXT_CONN[0]

    def log_message(self, *args):
        pass

    def hello_body(self):
        return json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "version": self.request_version,
                "host": self.headers.get("Host"),
                "x_forwarded_for": self.headers.get("X-Forwarded-For"),
                "forwarded": self.headers.get("Forwarded"),
                "connection": self.headers.get("Connection"),
                "x_custom": self.headers.get("X-Custom"),
                "conn": self.conn_id,
            }
        ).encode()

    def send_json(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-App-Header", "kept")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.send_json(self.hello_body())

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/hello":
            self.send_json(self.hello_body())
        elif url.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/big":
            n = int(parse_qs(url.query)["n"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = b"x" * 65536
            left = n
            while left > 0:
                k = min(left, len(block))
                self.wfile.write(block[:k])
                left -= k
        elif url.path == "/empty":
            self.send_response(204)
            self.end_headers()
        elif url.path == "/cached":
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
        elif url.path == "/status":
            code = int(parse_qs(url.query)["code"][0])
            self.send_json(b'{"status": %d}' % code, code)
        elif url.path == "/close":
            body = self.hello_body()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        else:
            self.send_json(b'{"error": "not found"}', 404)

    def read_body(self):
        """Yields the request body as it arrives."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left > 0:
                    data = self.rfile.read(min(left, 1 << 16))
                    if not data:
                        return
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left > 0:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    return
                left -= len(data)
                yield data

    def do_POST(self):
        h = hashlib.sha256()
        n = 0
        for data in self.read_body():
            h.update(data)
            n += len(data)
        self.send_json(json.dumps({"bytes": n, "sha256": h.hexdigest()}).encode())

    do_PUT = do_POST


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
