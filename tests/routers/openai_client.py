"""Drives the official OpenAI Python SDK through the agent, for the
token-budget suite (tests/tests/tokens.rs): what a real client sees of the
rate-limit headers, of a streamed answer (with and without usage) and of a
429.

    python openai_client.py BASE_URL MODE [API_KEY]

BASE_URL is like http://127.0.0.1:PORT/api/v1. MODE is one of:

- plain: one chat completion; prints {"status", "content", "usage",
  "headers"}.
- stream: one streamed chat completion without stream_options; prints
  {"status", "content", "chunks", "usage_chunks", "empty_choice_chunks",
  "headers"}.
- stream_usage: the same with stream_options={"include_usage": True}, and
  "usage", the usage of the chunk that had one.
- limited: one chat completion expected to be refused; prints
  {"status", "body", "raw_body", "headers"} of the error ("body" is the
  SDK's e.body: the "error" member of a JSON body that has one, else the
  whole parsed body; "raw_body" is the whole parsed body), or {"status": 200}.

"headers" holds, lowercased, every response header whose name starts with
x-ratelimit or ratelimit, or is retry-after. One JSON line is printed; an
unexpected exception exits non-zero.
"""

import json
import sys

import openai

MESSAGES = [{"role": "user", "content": "Say hi"}]


def limit_headers(headers):
    found = {}
    for name, value in headers.items():
        name = name.lower()
        if name.startswith(("x-ratelimit", "ratelimit")) or name == "retry-after":
            found[name] = value
    return found


def plain(client):
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=20)
    completion = raw.parse()
    return {
        "status": raw.status_code,
        "content": completion.choices[0].message.content,
        "usage": completion.usage.model_dump(exclude_unset=True) if completion.usage is not None else None,
        "headers": limit_headers(raw.headers),
    }


def stream(client, include_usage):
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=20, stream=True, **extra)
    content = []
    chunks = usage_chunks = empty_choice_chunks = 0
    usage = None
    for chunk in raw.parse():
        chunks += 1
        if chunk.usage is not None:
            usage_chunks += 1
            usage = chunk.usage.model_dump(exclude_unset=True)
        if chunk.choices == []:
            empty_choice_chunks += 1
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                content.append(choice.delta.content)
    result = {
        "status": raw.status_code,
        "content": "".join(content),
        "chunks": chunks,
        "usage_chunks": usage_chunks,
        "empty_choice_chunks": empty_choice_chunks,
        "headers": limit_headers(raw.headers),
    }
    if include_usage:
        result["usage"] = usage
    return result


def limited(client):
    try:
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=20)
    except openai.APIStatusError as e:
        try:
            raw_body = e.response.json()
        except ValueError:
            raw_body = e.response.text
        return {
            "status": e.status_code,
            "body": e.body,
            "raw_body": raw_body,
            "headers": limit_headers(e.response.headers),
        }
    return {"status": 200}


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: openai_client.py BASE_URL plain|stream|stream_usage|limited [API_KEY]")
    base_url, mode = sys.argv[1], sys.argv[2]
    api_key = sys.argv[3] if len(sys.argv) == 4 and sys.argv[3] else "sk-test"
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    if mode == "plain":
        result = plain(client)
    elif mode == "stream":
        result = stream(client, include_usage=False)
    elif mode == "stream_usage":
        result = stream(client, include_usage=True)
    elif mode == "limited":
        result = limited(client)
    else:
        sys.exit(f"unknown mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
