"""Raster window IO: GDAL cloud settings, typed open errors, and :class:`SceneReader`.

A :class:`SceneReader` opens each band dataset of one scene once (read the header once), computes the scene's stretch
once from an overview, then reads windows of the reference grid: bands of the same grid are read directly (a
block-aligned window is one range request per band on S3), coarser bands are resampled onto the reference window.
Local paths and ``s3://`` hrefs (read through GDAL ``/vsis3/``) go through the same code, so both give the same bits.
Each band's href is resolved by :func:`catalogs.access.resolve_access` when the reader opens (Planetary Computer SAS
signing, per-store S3 endpoint, credentials and requester-pays); store options are set only around that band's
opens and reads, thread-locally.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window, from_bounds
from rasterio.windows import bounds as window_bounds

from catalogs.access import AssetAccess, resolve_access
from catalogs.errors import (
    AllNodata,
    AssetAccessDenied,
    AssetNotFound,
    BandShapeMismatch,
    CorruptRaster,
    NetworkError,
    NoGeoreference,
    SceneError,
    UnsupportedDataType,
    UnsupportedGeoreference,
)
from catalogs.recipes import RecipeOutput, Stretch

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

    from catalogs.scene import Scene

log = logging.getLogger(__name__)

# GDAL's defaults are tuned for local files; these are the usual settings for COGs in object storage. Environment
# variables already set by the user win (os.environ.setdefault), so a deployment can override any of them.
GDAL_CLOUD_DEFAULTS: dict[str, str] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no LIST request per open
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # one request for adjacent blocks
    "GDAL_HTTP_MULTIPLEX": "YES",
    # no VSI_CACHE: /vsicurl/ and /vsis3/ keep their own block cache, and VSI_CACHE's 32 KiB read-ahead costs a
    # second ranged GET per file at open (measured against moto)
    "GDAL_CACHEMAX": "256",  # MiB of block cache per process
    "GDAL_HTTP_MAX_RETRY": "4",  # retries on 429/502/503/504
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "CPL_VSIL_CURL_USE_HEAD": "NO",  # the first ranged GET tells the size; a HEAD is one request more
}

_MAX_DECIMATION = 16  # a whole-scene read decimated more than this, with no overviews, is sampled instead
_SAMPLES_PER_SIDE = 4
SUPPORTED_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64"})

def configure_gdal(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Apply GDAL's cloud settings to this process (idempotent: call it at a job's entry point).

    Settings go into ``os.environ`` (GDAL reads config options from the environment, and worker processes inherit
    it), without replacing variables the user already set; ``overrides`` replace them.

    Args:
        overrides: Settings that replace both the defaults and the current environment.

    Returns:
        The settings now in effect for the keys of :data:`GDAL_CLOUD_DEFAULTS` and ``overrides``.
    """
    for key, value in GDAL_CLOUD_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if overrides:
        os.environ.update(overrides)
    keys = set(GDAL_CLOUD_DEFAULTS) | set(overrides or {})
    return {k: os.environ[k] for k in sorted(keys)}


_HTTP_CODE = re.compile(r"HTTP (?:response )?code:?\s*(\d{3})", re.IGNORECASE)
# curl's and GDAL's words for a failure to reach the server (not a property of the file)
_NETWORK = re.compile(
    r"Could not resolve host|Couldn't resolve|Could not connect|Failed to connect|Connection (?:refused|reset|timed "
    r"out)|Operation timed out|timed out|SSL connect error|Empty reply from server|Recv failure|Send failure",
    re.IGNORECASE,
)
NETWORK_RETRIES = 3  # further attempts after a network failure, GDAL's own HTTP retries aside
NETWORK_BACKOFF_S = 0.5  # sleeps 0.5, 1, 2 s between them


def _error_text(exc: BaseException) -> str:
    """The exception's message with the GDAL messages rasterio chains under it ("Read failed. See previous
    exception for details." alone names no cause)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 5:
        text = str(seen).strip()
        if text and text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return ": ".join(parts)


def classify_raster_error(
    exc: Exception, *, item_id: str | None, asset: str | None, href: str | None, stage: str
) -> SceneError:
    """Map a rasterio/GDAL exception to the typed error a job records.

    Args:
        exc: The exception rasterio raised.
        item_id: The scene's item id.
        asset: The asset key.
        href: The href or GDAL path.
        stage: ``open`` or ``read``.

    Returns:
        ``NetworkError`` (DNS, connection, timeout, 5xx/429), ``AssetNotFound`` (404, no such file/key),
        ``AssetAccessDenied`` (401/403, permission), or ``CorruptRaster``; the message keeps GDAL's cause.
    """
    text = _error_text(exc)
    if href and href not in text:  # S3 says "The specified key does not exist." without naming it
        text = f"{href}: {text}"
    code = _HTTP_CODE.search(text)
    kw: dict[str, Any] = {"item_id": item_id, "asset": asset, "href": href, "stage": stage}
    if _NETWORK.search(text) or (code and (code.group(1).startswith("5") or code.group(1) == "429")):
        return NetworkError(f"network failure: {text}", **kw)
    if code and code.group(1) in ("401", "403") or "Access Denied" in text or "Permission denied" in text:
        return AssetAccessDenied(f"access denied: {text}", **kw)
    if (code and code.group(1) == "404") or "No such file" in text or "does not exist" in text:
        return AssetNotFound(f"not found: {text}", **kw)
    return CorruptRaster(f"unreadable raster: {text}", **kw)


@dataclass(frozen=True)
class RasterHeader:
    """What a raster's header says about its grid."""

    crs: str | None
    transform: tuple[float, float, float, float, float, float] | None
    shape: tuple[int, int]
    dtype: str
    count: int
    nodata: float | None
    block_shape: tuple[int, int]
    overviews: tuple[int, ...]
    scale: float = 1.0
    offset: float = 0.0
    tiff_datetime: str | None = None
    has_gcps: bool = False


def _header_of(ds: DatasetReader) -> RasterHeader:
    has_transform = ds.transform != Affine.identity()
    return RasterHeader(
        crs=ds.crs.to_string() if ds.crs else None,
        transform=tuple(ds.transform)[:6] if has_transform else None,  # type: ignore[arg-type]
        shape=(ds.height, ds.width),
        dtype=ds.dtypes[0],
        count=ds.count,
        nodata=ds.nodata,
        block_shape=tuple(ds.block_shapes[0]),  # type: ignore[arg-type]
        overviews=tuple(ds.overviews(1)),
        scale=float(ds.scales[0]),
        offset=float(ds.offsets[0]),
        tiff_datetime=ds.tags().get("TIFFTAG_DATETIME"),
        has_gcps=bool(ds.gcps[0]),
    )


def open_raster(path: str, *, item_id: str | None = None, asset: str | None = None) -> DatasetReader:
    """Open a raster with typed errors.

    Args:
        path: Local path or GDAL virtual path (see :func:`catalogs.hrefs.to_gdal_path`).
        item_id: For errors.
        asset: For errors.

    Returns:
        The open dataset.

    Raises:
        AssetNotFound, AssetAccessDenied, CorruptRaster: When the file cannot be opened.
    """
    configure_gdal()
    return _with_network_retries(lambda: rasterio.open(path), item_id=item_id, asset=asset, href=path, stage="open")


def _with_network_retries(call: Any, *, item_id: str | None, asset: str | None, href: str | None, stage: str) -> Any:
    """Run a GDAL call; retry it with exponential backoff while it fails for network reasons, then raise the typed
    error (a DNS hiccup is not a property of the file)."""
    import time

    for attempt in range(NETWORK_RETRIES + 1):
        # GDAL remembers a failed /vsicurl/ or /vsis3/ path as missing: a retry must bypass that cache
        prefix = href.split("/", 2)[1] if href and href.startswith("/vsi") else ""
        retry_env = rasterio.Env(CPL_VSIL_CURL_NON_CACHED=f"/{prefix}/") if attempt and prefix else None
        try:
            with retry_env or contextlib.nullcontext():
                return call()
        except RasterioError as exc:
            error = classify_raster_error(exc, item_id=item_id, asset=asset, href=href, stage=stage)
            if not isinstance(error, NetworkError) or attempt == NETWORK_RETRIES:
                if isinstance(error, NetworkError):
                    error.message += f" (after {attempt + 1} attempts)"
                raise error from exc
            log.info("%s: %s; retrying in %.1f s", href, error.message, NETWORK_BACKOFF_S * 2**attempt)
            time.sleep(NETWORK_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def read_header(path: str, *, item_id: str | None = None, asset: str | None = None) -> RasterHeader:
    """Read only the header of a raster (CRS, transform, shape, dtype, blocks, overviews).

    Args:
        path: Local path or GDAL virtual path.
        item_id: For errors.
        asset: For errors.

    Returns:
        The header.
    """
    with open_raster(path, item_id=item_id, asset=asset) as ds:
        return _header_of(ds)


@dataclass(frozen=True)
class TileImage:
    """One window read through the scene's recipe.

    Attributes:
        image: ``(3, H, W)`` float32 in [0, 1]; 0 where invalid.
        valid: ``(H, W)`` bool mask.
        valid_fraction: Share of valid pixels.
        window: The window on the reference grid.
        transform: Affine transform of the window (pixel → scene CRS).
    """

    image: np.ndarray
    valid: np.ndarray
    valid_fraction: float
    window: Window
    transform: Affine


@dataclass
class _Band:
    name: str
    ds: DatasetReader
    scale: float
    offset: float
    nodata: float | None
    same_grid: bool
    access: AssetAccess | None = None


class SceneReader:
    """Read windows of one scene through its recipe, with every band dataset opened once.

    Use as a context manager; keep it open for all the tiles of a scene (or a batch)::

        with SceneReader(scene) as reader:
            for tile in plan_tiles(*reader.shape, size=448, overlap=32):
                out = reader.read(tile.window)

    Args:
        scene: The scene (its bands' hrefs were checked against an href policy when it was built).
        stretch: A precomputed stretch (e.g. from an earlier reader of the same scene); computed once from an
            overview on first use otherwise.
        resampling: Resampling for bands coarser than the reference band.
    """

    def __init__(
        self, scene: Scene, *, stretch: Stretch | None = None, resampling: Resampling = Resampling.bilinear
    ) -> None:
        self.scene = scene
        self.recipe = scene.recipe
        self._stretch = stretch
        self._resampling = resampling
        self._bands: dict[str, _Band] = {}
        self.crs: str | None = None
        self.transform: Affine = Affine.identity()
        self.shape: tuple[int, int] = (0, 0)
        self.block_shape: tuple[int, int] = (0, 0)

    # -- opening ----------------------------------------------------------------------------------------------------

    def __enter__(self) -> SceneReader:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open the datasets of the recipe's bands and check that they share one georeferenced grid.

        Raises:
            AssetNotFound, AssetAccessDenied, CorruptRaster, UnsupportedDataType, NoGeoreference,
            BandShapeMismatch: As the first failing band dictates (all datasets are closed again).
        """
        if self._bands:
            return
        try:
            self._open_bands()
        except BaseException:
            self.close()
            raise

    def _open_bands(self) -> None:
        scene = self.scene
        ref_name = self.recipe.reference_band
        names = [n for n in self.recipe.used_bands if n in scene.bands]
        ref_ds: DatasetReader | None = None
        for name in names:
            asset = scene.bands[name]
            access = resolve_access(asset.href, item_id=scene.id, asset=asset.key)
            with access.env():
                ds = open_raster(access.path, item_id=scene.id, asset=asset.key)
            self._bands[name] = _Band(name, ds, asset.scale, asset.offset, asset.nodata, True, access)
            dtype = ds.dtypes[0]
            if dtype not in SUPPORTED_DTYPES:
                raise UnsupportedDataType(
                    f"data type {dtype} is not supported (supported: {sorted(SUPPORTED_DTYPES)})",
                    item_id=scene.id, asset=asset.key, href=asset.href,
                )
            if asset.nodata is None:
                nodata = ds.nodata if ds.nodata is not None else self.recipe.bands[name].nodata
                self._bands[name].nodata = nodata
            if name == ref_name:
                ref_ds = ds
                self._set_grid(ds)
        assert ref_ds is not None  # Scene.from_item guarantees the reference band
        ref_bounds = ref_ds.bounds
        ref_res = max(abs(self.transform.a), abs(self.transform.e))
        for name in names:
            band = self._bands[name]
            if band.ds is ref_ds:
                continue
            ds = band.ds
            asset = scene.bands[name]
            if ds.crs and self.crs and ds.crs.to_string() != self.crs:
                raise BandShapeMismatch(
                    f"band {name} is in {ds.crs.to_string()}, the reference band in {self.crs}",
                    item_id=scene.id, asset=asset.key, href=asset.href,
                )
            band.same_grid = ds.shape == self.shape and ds.transform.almost_equals(self.transform)
            if band.same_grid:
                continue
            tol = max(ref_res, abs(ds.transform.a), abs(ds.transform.e))
            off = max(abs(a - b) for a, b in zip(ds.bounds, ref_bounds, strict=True))
            if off > tol or ds.transform == Affine.identity():
                raise BandShapeMismatch(
                    f"band {name} ({ds.height}x{ds.width}, bounds {tuple(ds.bounds)}) does not cover the reference "
                    f"grid ({self.shape[0]}x{self.shape[1]}, bounds {tuple(ref_bounds)})",
                    item_id=scene.id, asset=asset.key, href=asset.href,
                )

    def _set_grid(self, ds: DatasetReader) -> None:
        scene = self.scene
        asset = scene.bands[self.recipe.reference_band]
        header_ok = ds.crs is not None and ds.transform != Affine.identity()
        if header_ok:
            self.crs, self.transform = ds.crs.to_string(), ds.transform
        elif scene.crs and scene.transform:
            self.crs, self.transform = scene.crs, Affine(*scene.transform)
            log.info("%s: raster header has no georeference; using the item's proj:* fields", scene.id)
        elif ds.gcps[0]:
            raise UnsupportedGeoreference(
                f"item {scene.id!r}: the raster is georeferenced only by ground control points (radar geometry); "
                "it is not read. Use a terrain-corrected collection (e.g. 'sentinel-1-rtc') instead",
                item_id=scene.id, asset=asset.key, href=asset.href,
            )
        else:
            raise NoGeoreference(
                "neither the raster header nor the item (proj:*) gives a CRS and geotransform",
                item_id=scene.id, asset=asset.key, href=asset.href,
            )
        self.shape = (ds.height, ds.width)
        self.block_shape = tuple(ds.block_shapes[0])  # type: ignore[assignment]

    def close(self) -> None:
        """Close every open dataset."""
        for band in self._bands.values():
            band.ds.close()
        self._bands.clear()

    # -- reading ----------------------------------------------------------------------------------------------------

    @property
    def stretch(self) -> Stretch:
        """The scene's stretch, computed once from an overview on first access."""
        if self._stretch is None:
            self._stretch = self._compute_stretch()
        return self._stretch

    def _compute_stretch(self) -> Stretch:
        spec = self.recipe.stretch
        if all(ch.range is not None for ch in self.recipe.channels):  # fixed ranges: no overview read needed
            return tuple((float(ch.range[0]), float(ch.range[1])) for ch in self.recipe.channels if ch.range)
        h, w = self.shape
        factor = max(1, math.ceil(max(h, w) / spec.overview_size))
        out_shape = (max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor)))
        ref = self._bands.get(self.recipe.reference_band)
        if factor > _MAX_DECIMATION and ref is not None and not ref.ds.overviews(1):
            values, valid = self._sampled_values(spec.overview_size)
        else:
            values, valid = self._read_decoded(Window(0, 0, w, h), out_shape=out_shape,
                                               resampling=Resampling.nearest)
        try:
            return self.recipe.compute_stretch(values, valid)
        except AllNodata as exc:
            exc.item_id = self.scene.id
            raise

    def _sampled_values(self, overview_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Band values from a grid of small windows spread over the scene, side by side in one row.

        A large raster without overviews (not a COG) would have every block read by a decimated whole-scene read
        (a header claiming 200,000 x 200,000 pixels: ~10^10 pixels); the sample costs ``overview_size``² pixels.
        """
        h, w = self.shape
        side = max(1, overview_size // _SAMPLES_PER_SIDE)
        rows = np.linspace(0, max(0, h - side), _SAMPLES_PER_SIDE).astype(int)
        cols = np.linspace(0, max(0, w - side), _SAMPLES_PER_SIDE).astype(int)
        parts = [self._read_decoded(Window(int(c), int(r), min(side, w), min(side, h)),
                                    out_shape=(min(side, h), min(side, w))) for r in rows for c in cols]
        values = {name: np.concatenate([v[name].reshape(1, -1) for v, _ in parts], axis=1) for name in parts[0][0]}
        valid = np.concatenate([ok.reshape(1, -1) for _, ok in parts], axis=1)
        return values, valid

    def _read_band(
        self, band: _Band, window: Window, out_shape: tuple[int, int], resampling: Resampling
    ) -> np.ndarray:
        """Read one band over a reference-grid window lying inside the scene, as stored."""
        ds = band.ds

        def read() -> np.ndarray:
            env = band.access.env() if band.access is not None else contextlib.nullcontext()
            with env:
                if band.same_grid:
                    return ds.read(1, window=window, out_shape=out_shape, resampling=resampling)
                bounds = window_bounds(window, self.transform)
                src = from_bounds(*bounds, transform=ds.transform)
                return ds.read(1, window=src, out_shape=out_shape, resampling=self._resampling, boundless=False)

        asset = self.scene.bands[band.name]
        data: np.ndarray = _with_network_retries(read, item_id=self.scene.id, asset=asset.key, href=asset.href,
                                                 stage="read")
        return data

    def _read_decoded(
        self, window: Window, *, out_shape: tuple[int, int], resampling: Resampling = Resampling.nearest
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        values: dict[str, np.ndarray] = {}
        valid = np.ones(out_shape, dtype=bool)
        for name, band in self._bands.items():
            data = self._read_band(band, window, out_shape, resampling)
            v, ok = self.recipe.decode(name, data, scale=band.scale, offset=band.offset, nodata=band.nodata)
            values[name] = v
            valid &= ok
        return values, valid

    def read_bands(self, window: Window) -> dict[str, np.ndarray]:
        """Raw band values (as stored) for a window inside the scene, on the reference grid.

        Args:
            window: A window lying inside the scene.

        Returns:
            Band name → 2-D array in the raster's data type.
        """
        self._require_open()
        win = self._clip(window)
        shape = (int(win.height), int(win.width))
        return {name: self._read_band(b, win, shape, Resampling.nearest) for name, b in self._bands.items()}

    @property
    def band_nodata(self) -> dict[str, float | None]:
        """The nodata value in effect for each open band (item, else raster header, else recipe)."""
        return {name: band.nodata for name, band in self._bands.items()}

    def read_physical(self, window: Window) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Physical values (reflectance, dB, K... as the recipe's units say) of each band over a window in the scene.

        Args:
            window: A window lying inside the scene.

        Returns:
            ``(values, valid)``: band name → float32 array on the reference grid, and the combined validity mask.
        """
        self._require_open()
        win = self._clip(window)
        return self._read_decoded(win, out_shape=(int(win.height), int(win.width)))

    def read(self, window: Window, *, allow_empty: bool = False) -> TileImage:
        """Read one window through the recipe.

        Parts of the window outside the scene (small scenes, see :mod:`catalogs.tiling`) are padded as invalid.

        Args:
            window: Window on the reference grid, integer offsets and size.
            allow_empty: Return an all-invalid tile instead of raising ``AllNodata``.

        Returns:
            The tile image, mask, valid fraction, window and transform.

        Raises:
            AllNodata: If no pixel of the window is valid (unless ``allow_empty``).
            AssetNotFound, AssetAccessDenied, CorruptRaster: If a read fails (e.g. a truncated file).
        """
        self._require_open()
        height, width = int(window.height), int(window.width)
        inner = self._clip(window)
        values = {n: np.zeros((height, width), dtype=np.float32) for n in self._bands}
        valid = np.zeros((height, width), dtype=bool)
        if inner.width > 0 and inner.height > 0:
            shape = (int(inner.height), int(inner.width))
            v, ok = self._read_decoded(inner, out_shape=shape)
            r0, c0 = int(inner.row_off - window.row_off), int(inner.col_off - window.col_off)
            sl = (slice(r0, r0 + shape[0]), slice(c0, c0 + shape[1]))
            for name in values:
                values[name][sl] = v[name]
            valid[sl] = ok
        if not valid.any() and not allow_empty:
            raise AllNodata(f"window {window!r} holds no valid pixel", item_id=self.scene.id)
        out: RecipeOutput = self.recipe.render(values, valid, self.stretch if valid.any() else self._fallback_stretch())
        return TileImage(
            image=out.image,
            valid=out.valid,
            valid_fraction=out.valid_fraction,
            window=window,
            transform=rasterio.windows.transform(window, self.transform),
        )

    def read_overview(self, max_side: int) -> TileImage:
        """The whole scene through the recipe, decimated so that its longer side is at most ``max_side`` pixels.

        A decimated read is served from the COG's overviews, so this costs about ``max_side``² pixels per band
        however large the scene is (for pictures of whole scenes).

        Args:
            max_side: Longest side of the result in pixels.

        Returns:
            The image (``window`` is the whole scene; ``transform`` maps the decimated pixels to the scene CRS).
        """
        self._require_open()
        h, w = self.shape
        factor = max(1.0, max(h, w) / max(1, int(max_side)))
        out_shape = (max(1, round(h / factor)), max(1, round(w / factor)))
        window = Window(0, 0, w, h)
        values, valid = self._read_decoded(window, out_shape=out_shape, resampling=Resampling.nearest)
        out = self.recipe.render(values, valid, self.stretch if valid.any() else self._fallback_stretch())
        scale = Affine.scale(w / out_shape[1], h / out_shape[0])
        return TileImage(image=out.image, valid=out.valid, valid_fraction=out.valid_fraction, window=window,
                         transform=self.transform * scale)

    def _fallback_stretch(self) -> Stretch:
        return self._stretch or tuple((0.0, 1.0) for _ in self.recipe.channels)

    def _clip(self, window: Window) -> Window:
        h, w = self.shape
        r0, c0 = max(0, int(window.row_off)), max(0, int(window.col_off))
        r1 = min(h, int(window.row_off + window.height))
        c1 = min(w, int(window.col_off + window.width))
        return Window(c0, r0, max(0, c1 - c0), max(0, r1 - r0))

    def _require_open(self) -> None:
        if not self._bands:
            raise RuntimeError("SceneReader is not open; use it as a context manager")
