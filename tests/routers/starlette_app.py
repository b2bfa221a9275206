"""Starlette (under uvicorn) as an upstream of the path-spelling differential
suite (tests/tests/paths.rs): one handler per tier of the reference table, each
answering which route matched. Usage: python starlette_app.py PORT"""

import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

ROUTES = [
    ("health", "/api/health"),
    ("completions", "/api/v1/chat/completions"),
    ("media", "/api/v1/media/{rest:path}"),
    ("vision", "/api/v1/vision"),
    ("run", "/api/v1/fashion/run"),
    ("subscribe", "/api/v1/fashion/subscribe"),
    ("status", "/api/v1/fashion/status/{id}"),
    ("chat", "/api/chat"),
]


def handler(name):
    async def endpoint(_request):
        return PlainTextResponse(f"route={name}\n")

    return endpoint


app = Starlette(routes=[Route(path, handler(name)) for name, path in ROUTES])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
