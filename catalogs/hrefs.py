"""Asset href safety and the mapping of hrefs to paths GDAL opens.

A STAC catalog is untrusted input: an item may point an asset at ``file:///etc/shadow``, at another tenant's bucket,
or at a GDAL virtual path (``/vsicurl/...``). :class:`HrefPolicy` resolves every href to a normalised URL and refuses
it unless its scheme is allowed and, when prefixes are configured, it lies under one of them (on a path boundary,
after ``..`` segments are collapsed). Local files are refused unless a local prefix is configured.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalogs.errors import HrefNotAllowed

_REMOTE_SCHEMES = ("s3", "https", "http", "gs", "az")


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
    if href.startswith("/vsi"):
        raise HrefNotAllowed(f"GDAL virtual paths are not accepted as hrefs: {href!r}", stage="scene", href=href)
    parts = urlsplit(href)
    scheme = parts.scheme.lower()
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a local path
        return "file://" + Path(os.path.normpath(os.path.abspath(href))).as_posix()
    if scheme == "file":
        path = posixpath.normpath(unquote(parts.path)) if parts.path else "/"
        return "file://" + path
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
        try:
            url = normalize_href(href)
        except HrefNotAllowed as exc:
            raise HrefNotAllowed(exc.message, item_id=item_id, asset=asset, href=href) from None
        scheme = urlsplit(url).scheme
        if scheme not in self.allowed_schemes:
            raise HrefNotAllowed(
                f"scheme {scheme!r} not allowed (allowed: {sorted(self.allowed_schemes)})",
                item_id=item_id, asset=asset, href=href,
            )
        if scheme == "file" and not any(p.startswith("file://") for p in self.allowed_prefixes):
            raise HrefNotAllowed(
                "local files are only read under a configured prefix", item_id=item_id, asset=asset, href=href
            )
        if self.allowed_prefixes and not any(url.startswith(p) for p in self.allowed_prefixes):
            raise HrefNotAllowed(
                f"href outside the allowed prefixes {list(self.allowed_prefixes)}",
                item_id=item_id, asset=asset, href=href,
            )
        return url


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
