#!/usr/bin/env python3
"""A tiny OAuth 2.0 token endpoint for the data-path benchmark.

POST /token answers every request with a fresh bearer token valid for an hour
(RFC 6749 §5.1 shape). It does not validate the client: the benchmark measures
the data path, where the token is already cached by the gateway. GET /stats
returns how many tokens were issued. Listens on 127.0.0.1 only.
"""
import argparse
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_counter = itertools.count(1)
_issued = 0
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("cache-control", "no-store")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        global _issued
        # Drain the form body so the connection stays usable for keep-alive.
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.split("?")[0] != "/token":
            return self._send(404, {"error": "not_found"})
        with _lock:
            _issued += 1
            n = next(_counter)
        self._send(200, {"access_token": f"bench-token-{n}", "token_type": "Bearer", "expires_in": 3600})

    def do_GET(self):
        if self.path == "/stats":
            return self._send(200, {"issued": _issued})
        self._send(404, {"error": "not_found"})

    def log_message(self, *args):  # keep the benchmark's output quiet
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
