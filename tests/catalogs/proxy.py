"""A real HTTP proxy for the search tests: counts requests and answers the first N with an error status.

It sits in front of a real STAC API (rustac or pgstac) and rewrites the upstream base URL in response bodies, so
``next`` links keep going through it. A status-only server (every request answered with one status) stands in for
object stores that refuse access (HTTP 403).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CountingProxy:
    """Forward requests to ``upstream``; fail the first ``fail_first`` with ``fail_status``; stall the first
    ``stall_first`` (after the failures) for ``stall_s`` seconds before answering."""

    def __init__(self, upstream: str, fail_first: int = 0, fail_status: int = 503, stall_first: int = 0,
                 stall_s: float = 0.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.stall_first = stall_first
        self.stall_s = stall_s
        self.requests: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if len(proxy.requests) < proxy.fail_first:
                    proxy.requests.append((self.command, self.path, proxy.fail_status))
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if len(proxy.requests) < proxy.fail_first + proxy.stall_first:
                    proxy.requests.append((self.command, self.path, 0))  # 0: the client gave up waiting
                    time.sleep(proxy.stall_s)
                    return
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for key in ("Content-Type", "Accept"):
                    if self.headers.get(key):
                        req.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
                except urllib.error.HTTPError as exc:
                    status, data, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
                data = data.replace(proxy.upstream.encode(), proxy.url.encode())
                proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _forward  # noqa: N815
            do_POST = _forward  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class StatusServer:
    """Answer every request with one status code (e.g. 403 for an object store that refuses access)."""

    def __init__(self, status: int) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.hits += 1
                body = b"<Error><Code>AccessDenied</Code></Error>"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET  # noqa: N815

        self.hits = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
