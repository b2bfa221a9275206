#!/usr/bin/env python3
"""Test client for Envoy's rate limit service gRPC API.

Calls ``envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`` over
plaintext gRPC (grpcio). The request and response messages are the
betterproto2 classes of the ``envoy-data-plane`` package, so the bytes on the
wire are produced and parsed by those types. The RLS suite
(tests/tests/rls.rs) runs this script as a subprocess.

Usage:
    rls_client.py TARGET

TARGET is host:port (plaintext, no TLS). Standard input holds ONE JSON
document:

    {"concurrency": 100,   # optional, default 1: number of calls in flight at once
     "timeout": 5.0,       # optional per-call deadline in seconds (default: none)
     "metadata": [["x-limiter-rls-secret", "..."]],  # optional, sent with every call
     "calls": [
       {"domain": "limiter",                   # optional, default ""
        "descriptors": [                       # optional, default []
          {"entries": [["path", "/api/v1/x"], ["remote_address", "10.0.0.1"]],
           "hits_addend": 3}],                 # optional; google.protobuf.UInt64Value,
                                               # so 0 is sent as set, null/absent as unset
        "hits_addend": 2},                     # optional uint32, default 0 (= not set)
       ...]}

All calls go through one shared channel, with at most ``concurrency`` of them
in flight at once. Standard output gets ONE JSON document: a list in the same
order as ``calls``, each item either a response

    {"overall_code": "OK" | "OVER_LIMIT" | "UNKNOWN",
     "statuses": [{"code": "OK" | "OVER_LIMIT" | "UNKNOWN",
                   "current_limit": null | {"name": str, "requests_per_unit": int,
                                            "unit": "SECOND" | "MINUTE" | "HOUR" | "DAY"
                                                    | "WEEK" | "MONTH" | "YEAR" | "UNKNOWN"},
                   "limit_remaining": int,
                   "duration_until_reset_ms": int | null}],   # truncated to whole ms
     "response_headers_to_add": [[name, value], ...],
     "request_headers_to_add": [[name, value], ...],
     "raw_body": str}                          # decoded as UTF-8

or, when the call failed,

    {"error": {"code": "UNAVAILABLE", "details": str}}

with ``code`` the name of the gRPC status code. Enum values are printed by
their proto names; a number the proto does not name is printed as an integer.
A header's ``raw_value`` is used (decoded as UTF-8) when its ``value`` is
empty.

Exit status: 0 when every call was made (even if some returned errors); 2 with
a message on standard error for bad usage or bad input.
"""

import datetime
import json
import sys
import threading

import grpc
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
)

METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


class BadInput(Exception):
    pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _descriptor(i, j, d):
    where = f"calls[{i}].descriptors[{j}]"
    if not isinstance(d, dict):
        raise BadInput(f"{where} must be an object")
    unknown = set(d) - {"entries", "hits_addend"}
    if unknown:
        raise BadInput(f"{where} has unknown keys {sorted(unknown)}")
    entries = d.get("entries", [])
    if not isinstance(entries, list):
        raise BadInput(f"{where}.entries must be a list")
    out = []
    for k, e in enumerate(entries):
        if not (isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e)):
            raise BadInput(f"{where}.entries[{k}] must be a [key, value] pair of strings")
        out.append(RateLimitDescriptorEntry(key=e[0], value=e[1]))
    hits = d.get("hits_addend")
    if hits is not None and not (_is_int(hits) and 0 <= hits < 2**64):
        raise BadInput(f"{where}.hits_addend must be null or an integer in [0, 2^64)")
    return RateLimitDescriptor(entries=out, hits_addend=hits)


def _request(i, call):
    where = f"calls[{i}]"
    if not isinstance(call, dict):
        raise BadInput(f"{where} must be an object")
    unknown = set(call) - {"domain", "descriptors", "hits_addend"}
    if unknown:
        raise BadInput(f"{where} has unknown keys {sorted(unknown)}")
    domain = call.get("domain", "")
    if not isinstance(domain, str):
        raise BadInput(f"{where}.domain must be a string")
    descriptors = call.get("descriptors", [])
    if not isinstance(descriptors, list):
        raise BadInput(f"{where}.descriptors must be a list")
    hits = call.get("hits_addend")
    if hits is None:
        hits = 0
    if not (_is_int(hits) and 0 <= hits < 2**32):
        raise BadInput(f"{where}.hits_addend must be an integer in [0, 2^32)")
    req = RateLimitRequest(
        domain=domain,
        descriptors=[_descriptor(i, j, d) for j, d in enumerate(descriptors)],
        hits_addend=hits,
    )
    req.SerializeToString()  # fail here, not inside grpc, if the package rejects it
    return req


def parse_input(text):
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise BadInput(f"stdin is not JSON: {e}")
    if not isinstance(doc, dict):
        raise BadInput("stdin must be a JSON object")
    unknown = set(doc) - {"concurrency", "timeout", "calls", "metadata"}
    if unknown:
        raise BadInput(f"unknown keys {sorted(unknown)}")
    concurrency = doc.get("concurrency", 1)
    if not (_is_int(concurrency) and concurrency >= 1):
        raise BadInput("concurrency must be an integer >= 1")
    timeout = doc.get("timeout")
    if timeout is not None and not (
        isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    ):
        raise BadInput("timeout must be a positive number")
    metadata = doc.get("metadata") or []
    if not (
        isinstance(metadata, list)
        and all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
            for m in metadata
        )
    ):
        raise BadInput("metadata must be a list of [key, value] strings")
    calls = doc.get("calls")
    if not isinstance(calls, list):
        raise BadInput("calls must be a list")
    requests = []
    for i, c in enumerate(calls):
        try:
            requests.append(_request(i, c))
        except BadInput:
            raise
        except Exception as e:  # pydantic validation of the package's types
            raise BadInput(f"calls[{i}] rejected by RateLimitRequest: {e}")
    timeout = None if timeout is None else float(timeout)
    return concurrency, timeout, [tuple(m) for m in metadata], requests


def _enum(v):
    return v.name if v.name else int(v)


def _headers(hs):
    out = []
    for h in hs:
        value = h.value if h.value else h.raw_value.decode("utf-8", "replace")
        out.append([h.key, value])
    return out


def response_json(resp):
    statuses = []
    for s in resp.statuses:
        limit = s.current_limit
        reset = s.duration_until_reset
        statuses.append(
            {
                "code": _enum(s.code),
                "current_limit": None
                if limit is None
                else {
                    "name": limit.name,
                    "requests_per_unit": limit.requests_per_unit,
                    "unit": _enum(limit.unit),
                },
                "limit_remaining": s.limit_remaining,
                "duration_until_reset_ms": None
                if reset is None
                else reset // datetime.timedelta(milliseconds=1),
            }
        )
    return {
        "overall_code": _enum(resp.overall_code),
        "statuses": statuses,
        "response_headers_to_add": _headers(resp.response_headers_to_add),
        "request_headers_to_add": _headers(resp.request_headers_to_add),
        "raw_body": resp.raw_body.decode("utf-8", "replace"),
    }


def error_json(err):
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else None
    return {
        "error": {
            "code": code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN",
            "details": details if details is not None else str(err),
        }
    }


def run(target, concurrency, timeout, metadata, requests):
    results = [None] * len(requests)
    slots = threading.BoundedSemaphore(concurrency)
    finished = threading.Event()
    lock = threading.Lock()
    remaining = [len(requests)]
    if not requests:
        finished.set()

    with grpc.insecure_channel(target) as channel:
        should_rate_limit = channel.unary_unary(
            METHOD,
            request_serializer=RateLimitRequest.SerializeToString,
            response_deserializer=RateLimitResponse.FromString,
        )

        def done(i, fut):
            try:
                results[i] = response_json(fut.result())
            except grpc.RpcError as e:
                results[i] = error_json(e)
            except Exception as e:  # e.g. a response the package could not map
                results[i] = {"error": {"code": "INTERNAL", "details": repr(e)}}
            slots.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()

        for i, req in enumerate(requests):
            slots.acquire()
            fut = should_rate_limit.future(req, timeout=timeout, metadata=metadata or None)
            fut.add_done_callback(lambda f, i=i: done(i, f))
        finished.wait()
    return results


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        print(f"usage: {argv[0]} HOST:PORT < calls.json", file=sys.stderr)
        return 2
    try:
        concurrency, timeout, metadata, requests = parse_input(sys.stdin.read())
    except BadInput as e:
        print(f"rls_client: bad input: {e}", file=sys.stderr)
        return 2
    results = run(argv[1], concurrency, timeout, metadata, requests)
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
