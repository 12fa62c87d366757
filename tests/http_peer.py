"""A tiny HTTP peer for guests, run inside a test's network namespace.

    python -m tests.http_peer ADDRESS PORT FILE

serves FILE at GET /file and, for POST /upload, prints the SHA-256 and size
of the body it received on stdout (one line: "upload <hex> <bytes>"), so a
test can compare what a guest sent with what it meant to send.  It prints
"ready" once it listens.
"""

from __future__ import annotations

import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    address, port, served = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/file":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            print(f"upload {hashlib.sha256(body).hexdigest()} {len(body)}", flush=True)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
