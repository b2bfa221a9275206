"""Flask (its own Werkzeug server) as an upstream of the path-spelling
differential suite (tests/tests/paths.rs): one handler per tier of the
reference table, each answering which route matched. Usage: python flask_app.py PORT"""

import logging
import sys

from flask import Flask
from werkzeug.serving import WSGIRequestHandler

ROUTES = [
    ("health", "/api/health"),
    ("completions", "/api/v1/chat/completions"),
    ("media", "/api/v1/media/<path:rest>"),
    ("vision", "/api/v1/vision"),
    ("run", "/api/v1/fashion/run"),
    ("subscribe", "/api/v1/fashion/subscribe"),
    ("status", "/api/v1/fashion/status/<id>"),
    ("chat", "/api/chat"),
]



class Handler(WSGIRequestHandler):
    # Headers and body go out in separate writes: without this, Nagle's algorithm and
    # delayed ACKs hold each answer back ~10 ms, and the suite sends thousands.
    disable_nagle_algorithm = True


def handler(name):
    def endpoint(**_params):
        return f"route={name}\n", 200, {"Content-Type": "text/plain"}

    return endpoint


app = Flask(__name__)
for name, path in ROUTES:
    app.add_url_rule(path, name, handler(name))

if __name__ == "__main__":
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True, request_handler=Handler)
