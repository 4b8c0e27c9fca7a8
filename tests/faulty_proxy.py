"""A reverse proxy in front of a real server that fails chosen requests: a server that answers 5xx
for a while, or for good, without mocking the client that talks to it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "host"}


class FaultyProxy:
    """Forwards every request to `upstream`; a request whose path contains a fragment given to
    `fail` gets `status` instead, `times` times (forever when None). `seen` lists
    (method, path, status) of every request answered."""

    def __init__(self, upstream: str):
        self.upstream = httpx.Client(base_url=upstream, timeout=60)
        self.faults: dict[str, list] = {}
        self.seen: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, fragment: str, times: int | None = None, status: int = 503) -> None:
        with self._lock:
            self.faults[fragment] = [times, status]

    def statuses(self, fragment: str) -> list[int]:
        return [status for _, path, status in self.seen if fragment in path]

    def _fault(self, path: str) -> int | None:
        with self._lock:
            for fragment, fault in self.faults.items():
                if fragment in path and fault[0] != 0:
                    if fault[0] is not None:
                        fault[0] -= 1
                    return fault[1]
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = proxy._fault(self.path)
                if status is not None:
                    payload, headers = (b'{"error_code": "TEMPORARILY_UNAVAILABLE"}',
                                        {"Content-Type": "application/json"})
                else:
                    answer = proxy.upstream.request(self.command, self.path, content=body, headers={
                        key: value for key, value in self.headers.items() if key.lower() not in _HOP_BY_HOP})
                    status, payload = answer.status_code, answer.content
                    headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
                proxy.seen.append((self.command, self.path, status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.upstream.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
