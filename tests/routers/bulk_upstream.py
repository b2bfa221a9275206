"""An upstream of large answers that counts its own connections, for the
suite of what a client can hold (tests/tests/holds.rs).

GET /api/bulk answers 1 MiB (/api/bulk/N: N MiB); any other path a small
JSON body. GET /__stats
(asked directly, not through the agent) answers {"open": n, "peak": n}: the
connections open now and the most ever open at once.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BULK = b"x" * (1024 * 1024)
lock = threading.Lock()
counts = {"open": 0, "peak": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        with lock:
            counts["open"] += 1
            counts["peak"] = max(counts["peak"], counts["open"])

    def finish(self):
        try:
            super().finish()
        finally:
            with lock:
                counts["open"] -= 1

    def do_GET(self):
        if self.path == "/__stats":
            with lock:
                body = json.dumps(counts).encode()
        elif self.path.startswith("/api/bulk"):
            tail = self.path[len("/api/bulk/"):]
            body = BULK * (int(tail) if tail.isdigit() else 1)
        else:
            body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        self.rfile.read(length)
        self.do_GET()

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client (the agent) closing a connection mid-answer is the point
        # of the tests, not an error worth a traceback.
        pass



Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
