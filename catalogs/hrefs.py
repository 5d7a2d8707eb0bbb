"""Asset href safety, the mapping of hrefs to paths GDAL opens, and redaction of credentials in URLs and text.

A STAC catalog is untrusted input: an item may point an asset at ``file:///etc/shadow``, at another tenant's bucket,
or at a GDAL virtual path (``/vsicurl/...``). :class:`HrefPolicy` resolves every href to a normalised URL and refuses
it unless its scheme is allowed and, when prefixes are configured, it lies under one of them (on a path boundary,
after ``..`` segments are collapsed). Local files are refused unless a local prefix is configured, and a local file
is checked where it really is (symlinks resolved), so a link inside an allowed folder cannot lead out of it. Hrefs
that carry credentials in their user-info part, GDAL virtual paths in any form, and percent-encoded ``.``/``/`` in
remote paths (which a server may decode into a ``..`` the check never saw) are refused.

An asset server may still answer with an HTTP redirect; GDAL follows redirects, so :func:`check_redirects` asks the
server first (redirects not followed) and refuses a redirect whose target the policy does not allow.

Hrefs may carry signatures in their query (pre-signed S3 URLs, Azure SAS tokens): :func:`redact_url` and
:func:`redact_text` blank user-info and query values, and the values of credential environment variables, wherever
a URL or a message is logged or recorded.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalogs.errors import HrefNotAllowed

_REMOTE_SCHEMES = ("s3", "https", "http", "gs", "az")
# GDAL's virtual file systems (/vsicurl/, /vsis3/, /vsizip/, /vsimem/, ...): never accepted from a catalog
_VSI = re.compile(r"(^|/)vsi[a-z0-9_]*(/|\?|$)", re.IGNORECASE)
# percent-encoded "." or "/" in a remote path: a server may decode them into a ".." segment after our check
_ENCODED_DOT_OR_SLASH = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def _refuse_vsi(path: str, href: str) -> None:
    if _VSI.search(path.lstrip("/").split("/", 1)[0] + "/"):
        raise HrefNotAllowed(f"GDAL virtual paths are not accepted as hrefs: {redact_url(href)!r}", stage="scene",
                             href=redact_url(href))


def normalize_href(href: str) -> str:
    """Return ``href`` as a normalised URL: ``scheme://netloc/path`` with ``.``/``..`` collapsed.

    Local paths (absolute or relative) become ``file://`` URLs of their absolute path.

    Args:
        href: A URL (``s3://b/k``, ``https://h/p``, ``file:///p``) or a local path.

    Returns:
        The normalised URL.

    Raises:
        HrefNotAllowed: For GDAL virtual paths (``/vsi...``) and empty hrefs.
    """
    if not href:
        raise HrefNotAllowed("empty asset href", stage="scene")
    parts = urlsplit(href)
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a local path
        _refuse_vsi(href, href)
        path = Path(os.path.normpath(os.path.abspath(href))).as_posix()
        _refuse_vsi(path, href)
        return "file://" + path
    if scheme == "file":
        path = posixpath.normpath(unquote(parts.path)) if parts.path else "/"
        _refuse_vsi(path, href)
        return "file://" + path
    if parts.username is not None or parts.password is not None:
        raise HrefNotAllowed(f"credentials in an href are not accepted: {redact_url(href)!r} (configure the "
                             "store's credentials instead)", stage="scene", href=redact_url(href))
    if _ENCODED_DOT_OR_SLASH.search(parts.path):
        raise HrefNotAllowed(f"percent-encoded '.', '/' or '\\' in the path of {redact_url(href)!r}",
                             stage="scene", href=redact_url(href))
    path = posixpath.normpath(parts.path) if parts.path not in ("", "/") else parts.path
    if parts.path.endswith("/") and not path.endswith("/"):
        path += "/"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{parts.netloc}{path}{query}"


class HrefPolicy(BaseModel):
    """Which asset hrefs may be opened.

    Attributes:
        allowed_schemes: URL schemes that may be opened. ``file`` covers local paths.
        allowed_prefixes: If non-empty, a normalised href must start with one of these (on a ``/`` boundary).
            Local files are only ever allowed under a ``file://`` prefix (or a plain absolute path given here).
    """

    model_config = ConfigDict(frozen=True)

    allowed_schemes: frozenset[str] = Field(default=frozenset({"s3", "https", "file"}))
    allowed_prefixes: tuple[str, ...] = ()

    @field_validator("allowed_schemes", mode="before")
    @classmethod
    def _lower_schemes(cls, value: Iterable[str]) -> frozenset[str]:
        return frozenset(s.lower() for s in value)

    @field_validator("allowed_prefixes", mode="before")
    @classmethod
    def _normalize_prefixes(cls, value: Iterable[str]) -> tuple[str, ...]:
        out = []
        for prefix in value:
            norm = normalize_href(str(prefix))
            out.append(norm if norm.endswith("/") else norm + "/")
        return tuple(out)

    @classmethod
    def for_roots(cls, *roots: str | Path, schemes: Iterable[str] | None = None) -> HrefPolicy:
        """A policy that allows exactly the given roots (local folders, ``s3://bucket/prefix``...).

        Args:
            roots: Folders or URL prefixes under which assets may live.
            schemes: Allowed schemes; by default those of the roots.

        Returns:
            The policy.
        """
        prefixes = [str(r) for r in roots]
        if schemes is None:
            schemes = {urlsplit(normalize_href(p)).scheme for p in prefixes}
        return cls(allowed_schemes=frozenset(schemes), allowed_prefixes=tuple(prefixes))

    def check(self, href: str, *, item_id: str | None = None, asset: str | None = None) -> str:
        """Return the normalised href if it is allowed.

        Args:
            href: The asset href (absolute; resolve relative hrefs against the item first).
            item_id: For the error message.
            asset: For the error message.

        Returns:
            The normalised URL.

        Raises:
            HrefNotAllowed: If the scheme or prefix is not allowed.
        """
        shown = redact_url(href)  # an href may carry a signature: never recorded as it is
        try:
            url = normalize_href(href)
        except HrefNotAllowed as exc:
            raise HrefNotAllowed(exc.message, item_id=item_id, asset=asset, href=shown) from None
        scheme = urlsplit(url).scheme
        if scheme not in self.allowed_schemes:
            raise HrefNotAllowed(
                f"scheme {scheme!r} not allowed (allowed: {sorted(self.allowed_schemes)})",
                item_id=item_id, asset=asset, href=shown,
            )
        if scheme == "file" and not any(p.startswith("file://") for p in self.allowed_prefixes):
            raise HrefNotAllowed(
                "local files are only read under a configured prefix", item_id=item_id, asset=asset, href=shown
            )
        if self.allowed_prefixes and not any(url.startswith(p) for p in self.allowed_prefixes):
            raise HrefNotAllowed(
                f"href outside the allowed prefixes {list(self.allowed_prefixes)}",
                item_id=item_id, asset=asset, href=shown,
            )
        if scheme == "file":
            # where the file really is: a symlink inside an allowed folder must not lead out of it
            real = "file://" + Path(os.path.realpath(unquote(urlsplit(url).path))).as_posix()
            roots = [_real_prefix(p) for p in self.allowed_prefixes if p.startswith("file://")]
            if not any(real.startswith(r) for r in roots):
                raise HrefNotAllowed(
                    f"href resolves (through a symlink) outside the allowed prefixes to {real!r}",
                    item_id=item_id, asset=asset, href=shown,
                )
        return url

    def allows(self, href: str) -> bool:
        """Whether :meth:`check` accepts ``href``."""
        try:
            self.check(href)
        except HrefNotAllowed:
            return False
        return True


def _real_prefix(prefix: str) -> str:
    real = Path(os.path.realpath(unquote(urlsplit(prefix).path))).as_posix()
    return "file://" + real.rstrip("/") + "/"


def to_gdal_path(url: str) -> str:
    """Map a normalised URL to the path GDAL opens: ``s3://b/k`` → ``/vsis3/b/k``, ``file:///p`` → ``/p``.

    Args:
        url: A URL as returned by :meth:`HrefPolicy.check` or :func:`normalize_href`.

    Returns:
        A local path or a GDAL virtual file system path.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return unquote(parts.path)
    if scheme == "s3":
        return f"/vsis3/{parts.netloc}{parts.path}"
    if scheme == "gs":
        return f"/vsigs/{parts.netloc}{parts.path}"
    if scheme == "az":
        return f"/vsiaz/{parts.netloc}{parts.path}"
    if scheme in ("http", "https"):
        return f"/vsicurl/{url}"
    if len(scheme) <= 1:
        return url
    raise HrefNotAllowed(f"no GDAL path for scheme {scheme!r}", href=url)


# ------------------------------------------------------------------------------------------------------- redirects

MAX_REDIRECTS = 5
REDIRECT_HOSTS_ENV = "EARTHGPT_REDIRECT_HOSTS"


class _NoRedirect:
    @staticmethod
    def opener(cafile: str | None) -> Any:
        import ssl
        import urllib.request

        class Handler(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None  # report the 3xx instead of following it

        # trust what GDAL trusts (a private CA bundle configured for it)
        context = ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)
        return urllib.request.build_opener(Handler, urllib.request.HTTPSHandler(context=context))


def check_redirects(url: str, *, allowed_hosts: Iterable[str] = (), timeout: float = 10.0,
                    item_id: str | None = None, asset: str | None = None) -> str:
    """Follow an ``http(s)`` asset URL's redirects here, refusing one that leaves its host, before GDAL opens it.

    GDAL's ``/vsicurl/`` follows redirects by itself (libcurl, up to 10) and has no setting to refuse them, so an
    allowed host could send the reader anywhere. This asks the server first, with a one-byte ranged GET and
    redirects not followed: every ``Location`` must stay on the URL's own host (scheme and port included), or on one
    of ``allowed_hosts`` / ``$EARTHGPT_REDIRECT_HOSTS`` (comma-separated ``host[:port]``), and never go from
    ``https`` to ``http``. The URL GDAL then opens is the final one, so GDAL has no redirect left to follow (a server
    that answers differently the second time is not covered: use a prefix allow-list of hosts you trust).

    Network and HTTP errors are not judged here: the URL is returned unchanged and GDAL's own error is recorded.

    Args:
        url: An ``http(s)`` URL (other schemes are returned unchanged).
        allowed_hosts: Other hosts a redirect may go to.
        timeout: Seconds per request.
        item_id: For the error.
        asset: For the error.

    Returns:
        The URL after the allowed redirects.

    Raises:
        HrefNotAllowed: A redirect to another host, a downgrade to ``http``, or more than ``MAX_REDIRECTS`` hops.
    """
    import urllib.error
    import urllib.parse
    import urllib.request

    first = urlsplit(url)
    if first.scheme not in ("http", "https"):
        return url
    hosts = {h.strip().lower() for h in (*allowed_hosts, *os.environ.get(REDIRECT_HOSTS_ENV, "").split(","))
             if h.strip()}
    opener = _NoRedirect.opener(os.environ.get("GDAL_CURL_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"))
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        request = urllib.request.Request(current, headers={"Range": "bytes=0-0"})
        try:
            with opener.open(request, timeout=timeout):
                return current
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location") if 300 <= exc.code < 400 else None
            if not location:
                return current  # 4xx/5xx: GDAL reports it
        except (OSError, ValueError):
            return current  # network trouble: GDAL reports it
        target = urllib.parse.urljoin(current, location)
        parts = urlsplit(target)
        host = (parts.hostname or "").lower()
        same = host == (first.hostname or "").lower()
        if not same and host not in hosts and parts.netloc.lower() not in hosts:
            raise HrefNotAllowed(
                f"{redact_url(current)} redirects to another host ({redact_url(target)}); allowed: its own host"
                + (f" and {sorted(hosts)}" if hosts else ""),
                item_id=item_id, asset=asset, href=redact_url(url), stage="open",
            )
        if first.scheme == "https" and parts.scheme != "https":
            raise HrefNotAllowed(f"{redact_url(current)} redirects from https to {parts.scheme}",
                                 item_id=item_id, asset=asset, href=redact_url(url), stage="open")
        current = target
    raise HrefNotAllowed(f"more than {MAX_REDIRECTS} redirects from {redact_url(url)}", item_id=item_id,
                         asset=asset, href=redact_url(url), stage="open")


# ------------------------------------------------------------------------------------------------------- redaction

REDACTED = "***"
# environment variables whose values are secrets: any name containing one of these words
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|SUBSCRIPTION_KEY|ACCESS_KEY|PRIVATE_KEY|API_KEY",
                          re.IGNORECASE)
_SCHEME_FIRST = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_MIN_SECRET_LEN = 6  # shorter values ("1", "YES") would blank ordinary words


def redact_url(url: str | None) -> str | None:
    """``url`` with its user-info and every query value replaced by ``***`` (names kept: ``?sig=***&se=***``).

    Pre-signed S3 URLs, Azure SAS tokens and API keys travel in the query; ``user:password@`` in the user-info.
    Anything that is not a URL is returned unchanged.
    """
    if not url or "://" not in url:
        return url
    if not _SCHEME_FIRST.match(url):  # a GDAL path (/vsicurl/https://...) or text around a URL
        return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)) or "", url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        query = parts.query
        if query:
            query = "&".join(f"{kv.split('=', 1)[0]}={REDACTED}" if "=" in kv else REDACTED
                             for kv in query.split("&"))
    except ValueError:
        return REDACTED
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables that hold secrets (``*SECRET*``, ``*TOKEN*``, ``*PASSWORD*``...)."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}, key=len,
                  reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every URL redacted (:func:`redact_url`) and the values of secret environment variables blanked.

    For messages that quote a URL or an error from a library (GDAL names the ``/vsicurl/`` URL it failed on, with
    its signature), before they are logged or written to a table.
    """
    if not text:
        return text
    out = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)) or "", text)
    for value in secret_values(environ):
        out = out.replace(value, REDACTED)
    return out
