"""Loopback servers for the access tests: a file server that honours HTTP Range, and a SAS token endpoint.

:class:`RangeServer` serves bytes from memory under URL paths, answers ``Range: bytes=a-b`` (and ``a-``, ``-n``) with
206 and ``Content-Range`` as object stores do (GDAL's ``/vsicurl/`` reads COGs by ranges; python's ``http.server``
has no ranges), records every request, and can require a valid SAS signature (403 otherwise), like Azure blob storage.
:class:`TokenServer` answers ``GET /{account}/{container}`` the way the Planetary Computer SAS endpoint does
(``{"msft:expiry": ..., "token": ...}``) and counts requests per container.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import secrets
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Request:
    path: str
    query: dict[str, list[str]]
    range: str | None
    status: int


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a certificate + key for 127.0.0.1 (valid one day) and return their paths; the certificate is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "loopback.crt", folder / "loopback.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: tuple[Path, Path] | None = None) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class TokenServer(_Server):
    """A Planetary-Computer-style SAS token endpoint: ``GET /{account}/{container}``.

    Args:
        ttl_s: Lifetime of each token it issues.
    """

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = ttl_s
        self.requests: list[str] = []
        self.request_times: list[float] = []  # time.monotonic() of each request
        self.tokens: dict[str, tuple[str, dt.datetime]] = {}  # sig -> (container path, expiry)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path.strip("/")
                server.requests.append(path)
                server.request_times.append(time.monotonic())
                expiry = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=server.ttl_s)
                sig = secrets.token_urlsafe(16)
                server.tokens[sig] = (path, expiry)
                se = expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
                body = json.dumps({
                    "msft:expiry": expiry.isoformat().replace("+00:00", "Z"),
                    "token": f"st=2024-01-01T00%3A00%3A00Z&se={se}&sp=rl&sv=2021-06-08&sr=c&skoid=x&sig={sig}",
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)

    def valid(self, path: str, query: dict[str, list[str]]) -> bool:
        """Whether ``query`` carries a live token issued for the container ``path`` lies in (``/account/container/..``)."""
        sig = (query.get("sig") or [""])[0]
        if sig not in self.tokens:
            return False
        container, expiry = self.tokens[sig]
        return path.strip("/").startswith(container + "/") and dt.datetime.now(dt.timezone.utc) < expiry


class RangeServer(_Server):
    """Serve in-memory files with HTTP Range support.

    Args:
        files: URL path (``/host/key``) -> bytes; more can be added to ``self.files`` later.
        tokens: When given, a request must carry a SAS signature this token server issued for its container.
        tls: ``(certificate, key)`` paths to serve HTTPS instead of HTTP.
    """

    def __init__(self, files: dict[str, bytes] | None = None, tokens: TokenServer | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[Request] = []
        self.tokens = tokens
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, head: bool) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                rng = self.headers.get("Range")
                data = server.files.get(parts.path)
                if server.tokens is not None and not server.tokens.valid(parts.path, query):
                    status, body, extra = 403, b"<Error><Code>AuthenticationFailed</Code></Error>", {}
                elif data is None:
                    status, body, extra = 404, b"<Error><Code>BlobNotFound</Code></Error>", {}
                elif rng and (m := _RANGE.match(rng.strip())):
                    size = len(data)
                    if m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                    else:
                        start, end = max(0, size - int(m.group(2))), size - 1
                    if start >= size:
                        status, body, extra = 416, b"", {"Content-Range": f"bytes */{size}"}
                    else:
                        status, body = 206, data[start:end + 1]
                        extra = {"Content-Range": f"bytes {start}-{end}/{size}"}
                else:
                    status, body, extra = 200, data, {}
                server.requests.append(Request(parts.path, query, rng, status))
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(head=False)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(head=True)

        super().__init__(Handler, tls)
