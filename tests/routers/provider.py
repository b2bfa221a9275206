"""A stand-in LLM provider that answers chat completions the way OpenAI does,
streamed or not, for the token-budget suite (tests/tests/tokens.rs).

    python3 provider.py PORT [--delay-ms D]

POST /v1/chat/completions and POST /api/v1/chat/completions read the JSON
request and answer like OpenAI's chat completions API:

- completion tokens C: the request header x-test-completion-tokens (an int),
  else 8, capped at the body's max_completion_tokens, else max_tokens (then
  finish_reason is "length", else "stop"). One choice is sent; usage counts
  C * n completion tokens.
- prompt tokens P: the whitespace-separated words of every message's string
  content, plus 4 per message, plus 3 (never more than the body's length).
- "stream": true answers text/event-stream, chunked by hand, one event a
  chunk, D ms (default 20) between events: a role chunk, a chunk per token,
  a finish chunk, then with "stream_options": {"include_usage": true} a
  usage chunk with "choices": [] (every chunk before it carries
  "usage": null), then "data: [DONE]".
- x-test-hold-ms: N sleeps N ms before the response head is sent, so the
  request stays in flight; x-test-cost: N answers the header
  x-request-cost: N.

GET /__stats (asked directly, not through the agent) answers
{"open": n, "peak": n, "requests": n, "tokens": n}: chat requests in flight
now (from the handler's start until the answer is fully written), the most
ever in flight at once, chat requests received, and the total_tokens of
their usage (counted when a request arrives, whether or not the usage is
sent to the client). POST /__reset zeroes peak (to open), requests and
tokens. Any other path answers {"path": path}.
"""

import argparse
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHAT_PATHS = ("/v1/chat/completions", "/api/v1/chat/completions")
DEFAULT_COMPLETION_TOKENS = 8

lock = threading.Lock()
counts = {"open": 0, "peak": 0, "requests": 0, "tokens": 0}
delay = 0.02


def compact(value):
    return json.dumps(value, separators=(",", ":"))


def prompt_tokens(request, body_len):
    messages = request.get("messages")
    if not isinstance(messages, list):
        messages = []
    words = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            words += len(content.split())
    return min(words + 4 * len(messages) + 3, body_len)


def completion_tokens(request, header):
    """(C, finish_reason) for one choice."""
    try:
        wanted = int(header) if header is not None else DEFAULT_COMPLETION_TOKENS
    except ValueError:
        wanted = DEFAULT_COMPLETION_TOKENS
    wanted = max(wanted, 0)
    cap = request.get("max_completion_tokens")
    if cap is None:
        cap = request.get("max_tokens")
    if isinstance(cap, int) and not isinstance(cap, bool) and wanted > cap:
        return max(cap, 0), "length"
    return wanted, "stop"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    # -- plumbing ---------------------------------------------------------

    def read_body(self):
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length", "0") or "0")
        return self.rfile.read(length) if length > 0 else b""

    def send_json(self, status, value, extra_headers=()):
        body = compact(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, val in extra_headers:
            self.send_header(name, val)
        self.end_headers()
        self.wfile.write(body)

    def write_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def route(self):
        return self.path.split("?", 1)[0]

    # -- methods ----------------------------------------------------------

    def do_GET(self):
        self.read_body()
        path = self.route()
        try:
            if path == "/__stats":
                with lock:
                    stats = dict(counts)
                self.send_json(200, stats)
            else:
                self.send_json(200, {"path": path})
        except OSError:
            self.close_connection = True

    def do_POST(self):
        path = self.route()
        if path in CHAT_PATHS:
            self.chat()
            return
        self.read_body()
        try:
            if path == "/__reset":
                with lock:
                    counts["peak"] = counts["open"]
                    counts["requests"] = 0
                    counts["tokens"] = 0
                    stats = dict(counts)
                self.send_json(200, stats)
            else:
                self.send_json(200, {"path": path})
        except OSError:
            self.close_connection = True

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- chat completions -------------------------------------------------

    def chat(self):
        with lock:
            counts["open"] += 1
            counts["peak"] = max(counts["peak"], counts["open"])
        try:
            self.chat_answer()
        except OSError:
            # The client (or the agent) went away mid-answer: BrokenPipe,
            # ConnectionReset and the like.
            self.close_connection = True
        finally:
            with lock:
                counts["open"] -= 1

    def chat_answer(self):
        raw = self.read_body()
        try:
            request = json.loads(raw or b"{}")
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as err:
            self.send_json(400, {"error": {
                "message": f"We could not parse the JSON body of your request. ({err})",
                "type": "invalid_request_error", "param": None, "code": None}})
            return

        prompt = prompt_tokens(request, len(raw))
        completion, finish_reason = completion_tokens(
            request, self.headers.get("x-test-completion-tokens"))
        n = request.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion * n,
            "total_tokens": prompt + completion * n,
        }
        with lock:
            counts["requests"] += 1
            counts["tokens"] += usage["total_tokens"]

        try:
            hold = float(self.headers.get("x-test-hold-ms", "0"))
        except ValueError:
            hold = 0
        if hold > 0:
            time.sleep(hold / 1000)

        extra = []
        cost = self.headers.get("x-test-cost")
        if cost is not None:
            extra.append(("x-request-cost", cost))

        ident = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        model = request.get("model") or "demo"

        if request.get("stream") is True:
            options = request.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            self.stream(ident, created, model, completion, finish_reason, usage,
                        include_usage, extra)
            return

        self.send_json(200, {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": " ".join(f"tok{k}" for k in range(completion)),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
            "system_fingerprint": "fp_test",
        }, extra)

    def stream(self, ident, created, model, completion, finish_reason, usage,
               include_usage, extra):
        def chunk(choices, usage_value=None):
            event = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_test",
                "choices": choices,
            }
            if include_usage:
                event["usage"] = usage_value
            return event

        def choice(delta, finish=None):
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        events = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
        events += [chunk(choice({"content": f"tok{k} "})) for k in range(completion)]
        events.append(chunk(choice({}, finish_reason)))
        if include_usage:
            events.append(chunk([], usage))

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for name, val in extra:
            self.send_header(name, val)
        self.end_headers()

        for i, event in enumerate(events):
            if i:
                time.sleep(delay)
            self.write_chunk(b"data: " + compact(event).encode() + b"\n\n")
        time.sleep(delay)
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        # A client (the agent) closing a connection mid-answer is part of the
        # tests, not an error worth a traceback.
        pass


def main():
    global delay
    parser = argparse.ArgumentParser(description="A stand-in OpenAI-style provider.")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay-ms", type=float, default=20,
                        help="delay between stream events (default 20)")
    args = parser.parse_args()
    delay = max(args.delay_ms, 0) / 1000
    Server(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
