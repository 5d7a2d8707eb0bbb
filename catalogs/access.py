"""How an asset href is read: which object store it lives in, how it is signed, which GDAL options it needs.

Object stores are data (``catalogs/stores.yaml``, plus the user's own files): each store matches hrefs by glob
pattern and says how to read them:

- ``sign: planetary-computer``: Azure blob URLs get a SAS token from the Planetary Computer token endpoint through
  the ``planetary-computer`` package (one token per storage container, cached until a minute before it expires, then
  fetched again). ``PC_SDK_SAS_URL`` / ``PC_SDK_SUBSCRIPTION_KEY`` configure the package as usual.
- ``s3``: endpoint, HTTPS, path-style addressing, requester-pays (``AWS_REQUEST_PAYER=requester``), unsigned
  requests for public buckets, and credentials from environment variables named by a prefix
  (``{PREFIX}_ACCESS_KEY_ID``, ``{PREFIX}_SECRET_ACCESS_KEY``, ``{PREFIX}_SESSION_TOKEN``) or a named profile
  (``{PREFIX}_PROFILE``); never from a config file.
- ``endpoint_env``: an environment variable that, when set, redirects the store's hrefs to another endpoint (a
  private mirror, an Azure/S3 emulator).

Hrefs no store matches are read as before: ``s3://`` through ``/vsis3/`` with the process-wide AWS settings,
``http(s)://`` through ``/vsicurl/`` (GDAL's retry and caching settings come from :func:`catalogs.io.configure_gdal`).
The redirects of an ``http(s)`` URL no store matches are checked before GDAL opens it
(:func:`catalogs.hrefs.check_redirects`): a redirect to another host is refused as ``HrefNotAllowed``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict

from catalogs.errors import AssetAccessDenied
from catalogs.hrefs import check_redirects, redact_text, redact_url, to_gdal_path


class S3Options(BaseModel):
    """How GDAL reaches one S3-compatible store.

    Attributes:
        endpoint: ``host[:port]`` of the endpoint (None: the process-wide ``AWS_S3_ENDPOINT`` or AWS).
        endpoint_env: Environment variable that overrides ``endpoint`` when set.
        https: Whether the endpoint speaks HTTPS.
        virtual_hosting: Bucket in the host name (AWS) or in the path (most S3-compatible stores).
        requester_pays: Send ``x-amz-request-payer: requester`` (the reader's account pays for the transfer).
        unsigned: Public bucket: send unsigned requests (no credentials needed).
        credentials_env: Prefix of the environment variables holding this store's credentials or profile.
        region: AWS region, if the store needs one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str | None = None
    endpoint_env: str | None = None
    https: bool = True
    virtual_hosting: bool | None = None
    requester_pays: bool = False
    unsigned: bool = False
    credentials_env: str | None = None
    region: str | None = None


class Store(BaseModel):
    """One object store the job knows how to read.

    Attributes:
        name: Short name, shown by ``earthgpt catalog check``.
        description: One line for humans.
        match: Glob patterns on normalised hrefs (``s3://eodata/*``, ``https://*.blob.core.windows.net/*``).
        sign: ``planetary-computer`` to SAS-sign Azure blob URLs.
        s3: S3 settings for ``s3://`` hrefs.
        endpoint_env: For ``http(s)://`` hrefs: environment variable that, when set, replaces
            ``scheme://account.host/`` with ``$VALUE/account/`` (path-style, as blob and S3 emulators serve).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    match: tuple[str, ...]
    sign: Literal["planetary-computer"] | None = None
    s3: S3Options | None = None
    endpoint_env: str | None = None

    def matches(self, href: str) -> bool:
        """Whether the (normalised) href belongs to this store."""
        return any(fnmatch.fnmatchcase(href, pattern) for pattern in self.match)


@dataclass(frozen=True)
class AssetAccess:
    """What it takes to open one asset.

    Attributes:
        path: The path GDAL opens (signed, redirected).
        store: The matching store's name, or None.
        options: GDAL config options to set while opening and reading (thread-local, via ``rasterio.Env``).
        credentials: AWS credentials for this store only (never written to the process environment).
        profile: Named AWS profile for this store.
    """

    path: str
    store: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    profile: str | None = None

    @property
    def needs_env(self) -> bool:
        """Whether reads need a ``rasterio.Env`` (the common case, a plain href, needs none)."""
        return bool(self.options or self.credentials or self.profile)

    @contextlib.contextmanager
    def env(self) -> Iterator[None]:
        """Set this asset's GDAL options (and store credentials) for the block; a no-op when there are none."""
        if not self.needs_env:
            yield
            return
        import rasterio
        from rasterio.session import AWSSession

        session = None
        if self.credentials or self.profile:
            session = AWSSession(
                aws_access_key_id=self.credentials.get("key"),
                aws_secret_access_key=self.credentials.get("secret"),
                aws_session_token=self.credentials.get("token"),
                profile_name=self.profile,
                endpoint_url=self.options.get("AWS_S3_ENDPOINT"),
                requester_pays=self.options.get("AWS_REQUEST_PAYER") == "requester",
            )
        with rasterio.Env(session=session, **self.options):
            yield


def load_stores(path: str | Path) -> tuple[Store, ...]:
    """Parse a stores YAML file (``stores: [...]``).

    Args:
        path: The file.

    Returns:
        The stores, in file order (the first matching store wins).
    """
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    return tuple(Store.model_validate(s) for s in data.get("stores", []))


@functools.cache
def builtin_stores() -> tuple[Store, ...]:
    """The stores shipped with the package (``catalogs/stores.yaml``)."""
    return load_stores(Path(str(resources.files("catalogs") / "stores.yaml")))


def _extra_stores() -> tuple[Store, ...]:
    # a deployment adds its own stores (its pgstac's bucket, a mirror) without code: EARTHGPT_STORES=a.yaml:b.yaml
    paths = [p for p in os.environ.get("EARTHGPT_STORES", "").split(os.pathsep) if p]
    return tuple(s for p in paths for s in _load_stores_cached(p))


@functools.cache
def _load_stores_cached(path: str) -> tuple[Store, ...]:
    return load_stores(path)


def store_for(href: str, stores: tuple[Store, ...] | None = None) -> Store | None:
    """The first store (user stores first, then built-in ones) whose patterns match ``href``."""
    table = stores if stores is not None else _extra_stores() + builtin_stores()
    return next((s for s in table if s.matches(href)), None)


def resolve_access(
    href: str, *, item_id: str | None = None, asset: str | None = None, stores: tuple[Store, ...] | None = None
) -> AssetAccess:
    """Resolve a normalised asset href to the path GDAL opens and the options it needs.

    Args:
        href: A normalised, policy-checked href (:class:`catalogs.scene.BandAsset.href`).
        item_id: For errors.
        asset: For errors.
        stores: Store table (default: ``EARTHGPT_STORES`` files, then the built-in stores).

    Returns:
        The access recipe: path, store name, options, credentials.

    Raises:
        AssetAccessDenied: If signing fails (token endpoint unreachable or refusing).
    """
    store = store_for(href, stores)
    if store is None:
        return AssetAccess(path=to_gdal_path(check_redirects(href, item_id=item_id, asset=asset)))
    url = href
    if store.sign == "planetary-computer":
        url = _sign_planetary_computer(url, item_id=item_id, asset=asset)
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https") and store.endpoint_env and os.environ.get(store.endpoint_env):
        url = _redirect(url, os.environ[store.endpoint_env])
    if scheme != "s3" or store.s3 is None:
        # a known store's hosts are configuration, not catalog input: its URLs are opened without a redirect probe
        return AssetAccess(path=to_gdal_path(url), store=store.name)
    return _s3_access(url, store)


def _redirect(url: str, endpoint: str) -> str:
    parts = urlsplit(url)
    account = parts.netloc.split(".", 1)[0]
    query = f"?{parts.query}" if parts.query else ""
    return f"{endpoint.rstrip('/')}/{account}{parts.path}{query}"


def _s3_access(url: str, store: Store) -> AssetAccess:
    s3 = store.s3
    assert s3 is not None
    options: dict[str, str] = {}
    endpoint = (os.environ.get(s3.endpoint_env) if s3.endpoint_env else None) or s3.endpoint
    if endpoint:
        if "://" in endpoint:  # accept a URL too: the scheme says HTTPS or not
            scheme, endpoint = endpoint.split("://", 1)
            https = scheme == "https"
        else:
            https = s3.https
        options["AWS_S3_ENDPOINT"] = endpoint.rstrip("/")
        options["AWS_HTTPS"] = "YES" if https else "NO"
    if s3.virtual_hosting is not None:
        options["AWS_VIRTUAL_HOSTING"] = "TRUE" if s3.virtual_hosting else "FALSE"
    if s3.requester_pays:
        options["AWS_REQUEST_PAYER"] = "requester"
    if s3.unsigned:
        options["AWS_NO_SIGN_REQUEST"] = "YES"
    if s3.region:
        options["AWS_REGION"] = s3.region
    credentials: dict[str, str] = {}
    profile = None
    if s3.credentials_env and not s3.unsigned:
        prefix = s3.credentials_env
        key, secret = os.environ.get(f"{prefix}_ACCESS_KEY_ID"), os.environ.get(f"{prefix}_SECRET_ACCESS_KEY")
        if key and secret:
            credentials = {"key": key, "secret": secret}
            if os.environ.get(f"{prefix}_SESSION_TOKEN"):
                credentials["token"] = os.environ[f"{prefix}_SESSION_TOKEN"]
        else:
            profile = os.environ.get(f"{prefix}_PROFILE")
    return AssetAccess(path=to_gdal_path(url), store=store.name, options=options, credentials=credentials,
                       profile=profile)


def _sign_planetary_computer(url: str, *, item_id: str | None, asset: str | None) -> str:
    try:
        import planetary_computer
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise AssetAccessDenied(
            "Planetary Computer assets need the 'planetary-computer' package to be signed", item_id=item_id,
            asset=asset, href=url,
        ) from exc
    try:
        # the package caches one token per storage account/container and renews it a minute before expiry
        return str(planetary_computer.sign_url(url))
    except Exception as exc:
        raise AssetAccessDenied(
            f"could not get a Planetary Computer SAS token: {redact_text(str(exc))}", item_id=item_id, asset=asset,
            href=redact_url(url),
        ) from exc


def describe_access(href: str) -> dict[str, Any]:
    """A short description of how ``href`` is read, without signing it (for ``earthgpt catalog check``)."""
    store = store_for(href)
    if store is None:
        return {"store": None, "via": to_gdal_path(href).split("/", 2)[1] if href.startswith(("s3", "http")) else "file"}
    return {"store": store.name, "via": "signed https" if store.sign else ("s3" if store.s3 else "https")}
