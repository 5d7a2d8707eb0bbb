"""Fault injection for the chaos suite: an HTTP proxy on 127.0.0.1 that answers chosen requests with an error status
(S3's ``503 SlowDown``), drops the connection before or after forwarding, or holds a request until the test lets it
go; and a way to find (and kill) the process on the other end of a held request.

It forwards everything else, byte for byte, to a real server (moto S3, a STAC API): the job under test talks to the
proxy as it would to the server. A STAC API's own URL in response bodies is rewritten to the proxy's, so ``next``
links keep going through it.
"""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your '
             b"request rate.</Message><RequestId>chaos</RequestId></Error>")


@dataclass(frozen=True)
class Request:
    """What a fault plan sees of a request: its number (from 0), method, path (with query), body and headers."""

    n: int
    method: str
    path: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


# A plan maps a request to an action: "pass", "503" (SlowDown), "drop" (close before forwarding), "drop_after"
# (forward, then close without answering: the request took effect, its response is lost), "hold" (keep it open
# until :meth:`FaultProxy.release`, then close).
Plan = Callable[[Request], str]


class FaultProxy:
    """A fault-injecting HTTP proxy in front of ``upstream``.

    Args:
        upstream: The real server's base URL.
        plan: Decides each request's fate.
        rewrite: Replace the upstream URL by the proxy's in response bodies (STAC ``next`` links).
    """

    def __init__(self, upstream: str, plan: Plan, *, rewrite: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        parts = urlsplit(self.upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self.plan = plan
        self.rewrite = rewrite
        self.actions: Counter[str] = Counter()
        self.log: list[tuple[int, str, str, str]] = []  # (n, method, path, action)
        self.bytes_up = 0  # request bodies forwarded
        self.bytes_down = 0  # response bodies sent back
        self.held = threading.Event()
        self.held_client_port: int | None = None
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._n = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` (S3 clients wait for it before a body)

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                with proxy._lock:
                    n = proxy._n
                    proxy._n += 1
                action = proxy.plan(Request(n, self.command, self.path, body, dict(self.headers.items())))
                with proxy._lock:
                    proxy.actions[action] += 1
                    proxy.log.append((n, self.command, self.path, action))
                    proxy.bytes_up += len(body)
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "hold":
                    proxy.held_client_port = self.client_address[1]
                    proxy.held.set()
                    proxy._release.wait(timeout=120)
                    self.close_connection = True
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if action == "drop_after":
                    self.close_connection = True
                    return
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in {"transfer-encoding", "connection", "content-length", "keep-alive"}:
                        self.send_header(key, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", dict((k.lower(), v) for k, v in headers)
                                     .get("content-length", "0"))
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.bytes_down += len(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.host_port = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def _forward(self, method: str, path: str, headers: object, body: bytes) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            out = {k: v for k, v in headers.items()  # type: ignore[attr-defined]
                   if k.lower() not in {"transfer-encoding", "content-length", "connection", "keep-alive"}}
            if method in {"PUT", "POST"} or body:
                out["Content-Length"] = str(len(body))
            conn.request(method, path, body=body or None, headers=out)
            resp = conn.getresponse()
            data = resp.read()
            if self.rewrite:
                data = data.replace(self.upstream.encode(), self.url.encode())
            return resp.status, resp.getheaders(), data
        finally:
            conn.close()

    def release(self) -> None:
        """Let a held request go (its connection is closed without an answer)."""
        self._release.set()

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def pid_on_port(port: int) -> int | None:
    """The process (other than this one) whose TCP connection has local port ``port`` (the client of a held
    request)."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid and conn.pid != os.getpid():
            return int(conn.pid)
    return None


def kill(pid: int) -> None:
    """SIGKILL: the process gets no chance to clean up (a preempted machine, the OOM killer)."""
    os.kill(pid, signal.SIGKILL)


def delayed_s3_stores(bucket: str, latencies_ms: list[float],
                      mib_per_s: float | None = None) -> Iterator[tuple[float, Any, FaultProxy]]:
    """For the benchmarks: a real S3-compatible server (moto) and, for each delay, a proxy adding it to every
    request (an object store's round trip) and an output store under ``s3://<bucket>/lat<ms>`` reached through it.
    With ``mib_per_s``, a GET with a ``Range`` header is also held for the time its bytes take on a link of that
    rate shared by all requests (a worker's bandwidth: concurrent transfers queue for it; a GET without a range is
    not held, its size not being known beforehand).

    Yields:
        ``(latency_ms, store, proxy)``; ``proxy.log`` counts the requests. The proxy stops before the next delay,
        the server once the loop ends (or breaks off); then the environment is as it was, and no cached s3fs
        filesystem is left pointing at the stopped server (a test session's own S3 server goes on serving).
    """
    import logging

    import s3fs

    from tests.harness.servers import env_vars, start_s3

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's line per request
    s3 = start_s3()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with env_vars(s3.env):  # the server's credentials and endpoint
            yield from _delayed(s3, bucket, latencies_ms, mib_per_s)
    finally:
        s3.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def _ranged_bytes(req: Request) -> int:
    """Bytes a ranged GET asks for (``bytes=a-b``), 0 for any other request."""
    spec = next((v for k, v in req.headers.items() if k.lower() == "range"), "")
    if req.method != "GET" or not spec.startswith("bytes="):
        return 0
    first, _, last = spec.removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1 if first and last else 0


def _delayed(s3: Any, bucket: str, latencies_ms: list[float],
             mib_per_s: float | None = None) -> Iterator[tuple[float, Any, FaultProxy]]:
    from pipelines.archive.store import OutputStore

    name = s3.make_bucket(bucket)
    link = threading.Lock()  # one transfer at a time at the full rate: a shared link
    for latency in latencies_ms:

        def delay(req: Request, latency: float = latency) -> str:
            time.sleep(latency / 1000)
            transfer = _ranged_bytes(req) / (mib_per_s * 2**20) if mib_per_s else 0.0
            if transfer:
                with link:
                    time.sleep(transfer)
            return "pass"

        proxy = FaultProxy(s3.endpoint_url, delay)
        try:
            yield latency, OutputStore(f"s3://{name}/lat{int(latency)}", {"endpoint_url": proxy.url}), proxy
        finally:
            proxy.stop()
