"""Build STAC items for COGs that have none, and load them into a STAC API.

An archive is a folder or an S3 prefix of COGs named ``{scene}_{band}.tif`` (the pattern is configurable: a regex
with named groups ``scene`` and ``band``, optionally ``date``). Files of one scene are adjacent in a sorted listing,
so scenes are grouped while the listing streams; no listing is held whole. Each scene becomes one item with the
projection, raster and eo (optical, thermal) or sar extensions, read from the COG headers; the items go to an NDJSON
file plus a collection JSON (for ``rustac serve``) and, optionally, into pgstac with pypgstac.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pystac
from pyproj import CRS, Transformer
from pystac.extensions.eo import EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.extensions.sar import SarExtension
from shapely.geometry import box, mapping
from shapely.ops import transform as shapely_transform

from catalogs.errors import SceneError
from catalogs.hrefs import normalize_href, to_gdal_path
from catalogs.io import RasterHeader, read_header
from catalogs.recipes import Recipe, SensorKind

log = logging.getLogger(__name__)

COG_MEDIA_TYPE = str(pystac.MediaType.COG)
DEFAULT_PATTERN = r"^(?P<scene>.+)_(?P<band>[A-Za-z0-9]+)\.tiff?$"

# eo:bands common names of the bands our recipes know (STAC eo extension vocabulary).
_COMMON_NAMES = {
    "coastal": "coastal", "blue": "blue", "green": "green", "red": "red", "nir": "nir", "nir08": "nir08",
    "swir16": "swir16", "swir22": "swir22", "lwir11": "lwir11", "lwir12": "lwir12", "lwir": "lwir",
    "B02": "blue", "B03": "green", "B04": "red", "B08": "nir",
}


def _header_datetime(header: RasterHeader) -> dt.datetime | None:
    if not header.tiff_datetime:
        return None
    return dt.datetime.strptime(header.tiff_datetime, "%Y:%m:%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)


def _parse_date(text: str) -> dt.datetime:
    for fmt in ("%Y%m%dT%H%M%S", "%Y%m%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.timezone.utc)
        except ValueError:
            continue
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def footprint(header: RasterHeader, densify: int = 8) -> dict[str, Any]:
    """The WGS84 footprint polygon of a raster grid (edges densified so UTM curvature is kept).

    Args:
        header: The raster header (CRS, transform, shape).
        densify: Extra points per edge.

    Returns:
        A GeoJSON polygon.
    """
    from affine import Affine

    assert header.crs and header.transform
    t = Affine(*header.transform)
    h, w = header.shape
    x0, y0 = t @ (0, 0)
    x1, y1 = t @ (w, h)
    poly = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    edge = max(abs(x1 - x0), abs(y1 - y0)) / (densify + 1)
    poly = poly.segmentize(edge)
    to_wgs84 = Transformer.from_crs(CRS.from_user_input(header.crs), "EPSG:4326", always_xy=True)
    return dict(mapping(shapely_transform(to_wgs84.transform, poly)))


def build_item(
    item_id: str,
    assets: Mapping[str, str],
    *,
    collection: str,
    sensor: SensorKind,
    datetime: dt.datetime | None = None,
    properties: Mapping[str, Any] | None = None,
    recipe: Recipe | None = None,
    created: dt.datetime | None = None,
    updated: dt.datetime | None = None,
    read_paths: Mapping[str, str] | None = None,
) -> pystac.Item:
    """Build one STAC item from the headers of its COG assets.

    Args:
        item_id: The item id.
        assets: Asset key → href (local path, ``s3://``...); the first asset is the reference grid.
        collection: Collection id.
        sensor: ``optical``/``thermal`` (eo extension) or ``sar`` (sar extension).
        datetime: Acquisition time; default: the reference COG's ``TIFFTAG_DATETIME``.
        properties: Extra properties (e.g. ``eo:cloud_cover``).
        recipe: If given, its band defaults fill scale/offset/nodata the headers lack.
        created: ``created`` timestamp (default: now).
        updated: ``updated`` timestamp (default: ``created``).
        read_paths: Asset key → path to read the header from, when the href is not readable from here yet.

    Returns:
        The item (projection, raster, eo or sar extensions; ``created``/``updated`` set).

    Raises:
        SceneError: If a header cannot be read (typed: not found, corrupt...), or no datetime is known.
    """
    headers: dict[str, RasterHeader] = {}
    for key, href in assets.items():
        path = (read_paths or {}).get(key) or to_gdal_path(normalize_href(href))
        headers[key] = read_header(path, item_id=item_id, asset=key)
    ref_key = next(iter(assets))
    ref = headers[ref_key]
    if ref.crs is None or ref.transform is None:
        from catalogs.errors import NoGeoreference

        raise NoGeoreference("COG has no CRS/transform", item_id=item_id, asset=ref_key, href=assets[ref_key],
                             stage="ingest")
    if datetime is None:
        datetime = _header_datetime(ref)
    if datetime is None:
        raise SceneError("no acquisition datetime: name it in the file pattern or pass one", item_id=item_id,
                         stage="ingest")
    geometry = footprint(ref)
    from shapely.geometry import shape as to_shape

    bbox = list(to_shape(geometry).bounds)
    created = created or dt.datetime.now(dt.timezone.utc)
    item = pystac.Item(
        id=item_id, geometry=geometry, bbox=bbox, datetime=datetime, properties=dict(properties or {}),
        collection=collection,
    )
    item.common_metadata.created = created
    item.common_metadata.updated = updated or created
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = ref.crs if ref.crs.startswith("EPSG:") else None
    if proj.code is None:
        proj.wkt2 = CRS.from_user_input(ref.crs).to_wkt()
    proj.shape = list(ref.shape)
    proj.transform = list(ref.transform)
    RasterExtension.add_to(item)
    if sensor == "sar":
        SarExtension.add_to(item)
        pols = [k.upper() for k in assets if k.lower() in ("vv", "vh", "hh", "hv")]
        item.properties.setdefault("sar:polarizations", pols)
        item.properties.setdefault("sar:instrument_mode", "IW")
        item.properties.setdefault("sar:frequency_band", "C")
        item.properties.setdefault("sar:product_type", "RTC")
    else:
        EOExtension.add_to(item)
    for key, href in assets.items():
        hdr = headers[key]
        spec = None
        if recipe is not None:
            spec = next((b for b in recipe.bands.values() if key in b.assets), None)
        band: dict[str, Any] = {"data_type": hdr.dtype}
        nodata = hdr.nodata if hdr.nodata is not None else (spec.nodata if spec else None)
        if nodata is not None:
            band["nodata"] = "nan" if nodata != nodata else nodata
        scale, offset = (hdr.scale, hdr.offset) if (hdr.scale, hdr.offset) != (1.0, 0.0) else (None, None)
        if scale is None and spec is not None and (spec.scale != 1.0 or spec.offset != 0.0):
            scale, offset = spec.scale, spec.offset
        if scale is not None:
            band["scale"], band["offset"] = scale, offset or 0.0
        if hdr.transform:
            band["spatial_resolution"] = abs(hdr.transform[0])
        extra: dict[str, Any] = {"raster:bands": [band]}
        if hdr.shape != ref.shape or hdr.transform != ref.transform:
            extra["proj:shape"] = list(hdr.shape)
            extra["proj:transform"] = list(hdr.transform or ())
        if sensor == "sar":
            extra["sar:polarizations"] = [key.upper()]
        else:
            extra["eo:bands"] = [{"name": key, **({"common_name": _COMMON_NAMES[key]} if key in _COMMON_NAMES else {})}]
        item.add_asset(
            key,
            pystac.Asset(href=href, media_type=COG_MEDIA_TYPE, roles=["data"], title=key, extra_fields=extra),
        )
    return item


@dataclass
class CollectionExtent:
    """Running spatial/temporal extent of the items written so far."""

    bbox: list[float] = field(default_factory=lambda: [180.0, 90.0, -180.0, -90.0])
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    count: int = 0

    def add(self, item: pystac.Item) -> None:
        """Grow the extent by one item."""
        if item.bbox:
            b = item.bbox
            self.bbox = [min(self.bbox[0], b[0]), min(self.bbox[1], b[1]), max(self.bbox[2], b[2]),
                         max(self.bbox[3], b[3])]
        when = item.datetime or item.common_metadata.start_datetime
        if when is not None:
            self.start = when if self.start is None else min(self.start, when)
            self.end = when if self.end is None else max(self.end, when)
        self.count += 1


def build_collection(
    collection_id: str, extent: CollectionExtent, *, sensor: SensorKind, description: str = "",
    extra: Mapping[str, Any] | None = None,
) -> pystac.Collection:
    """A STAC collection for items already built.

    Args:
        collection_id: The id.
        extent: Extent accumulated over the items.
        sensor: Sensor kind (recorded in ``summaries``).
        description: Description.
        extra: Extra top-level fields.

    Returns:
        The collection.
    """
    bbox = extent.bbox if extent.count else [-180.0, -90.0, 180.0, 90.0]
    coll = pystac.Collection(
        id=collection_id,
        description=description or f"{collection_id} ({sensor})",
        extent=pystac.Extent(
            pystac.SpatialExtent([bbox]), pystac.TemporalExtent([[extent.start, extent.end]])
        ),
        license="other",
        summaries=pystac.Summaries({"sensor": [sensor]}),
        extra_fields=dict(extra or {}),
    )
    return coll


def iter_cogs(source: str) -> Iterator[str]:
    """Yield the hrefs of ``.tif``/``.tiff`` files under a folder or ``s3://bucket/prefix``, sorted, lazily.

    Local folders are walked one directory at a time; S3 prefixes are listed one page (1000 keys) at a time.

    Args:
        source: Local folder or ``s3://bucket/prefix``.

    Yields:
        ``file://`` or ``s3://`` URLs (STAC hrefs are URIs: a bare path would resolve against the API's URL).
    """
    if source.startswith("s3://"):
        import boto3

        bucket, _, prefix = source[5:].partition("/")
        client = boto3.client("s3")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].lower().endswith((".tif", ".tiff")):
                    yield f"s3://{bucket}/{obj['Key']}"
        return
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith((".tif", ".tiff")):
                yield Path(os.path.abspath(os.path.join(root, name))).as_uri()


@dataclass(frozen=True)
class SceneFiles:
    """The COGs of one scene found by :func:`group_scenes`."""

    scene: str
    assets: dict[str, str]
    date: str | None = None


def group_scenes(hrefs: Iterable[str], pattern: str = DEFAULT_PATTERN) -> Iterator[SceneFiles]:
    """Group a sorted stream of COG hrefs into scenes by file name.

    Args:
        hrefs: Sorted hrefs (as from :func:`iter_cogs`).
        pattern: Regex on the file name with groups ``scene`` and ``band`` (optional ``date``).

    Yields:
        One :class:`SceneFiles` per run of files with the same scene (and folder).
    """
    regex = re.compile(pattern)

    def key(href: str) -> tuple[str, str]:
        folder, _, name = href.rpartition("/")
        m = regex.match(name)
        return (folder, m.group("scene")) if m else (folder, "")

    for (_, scene), group in itertools.groupby(hrefs, key=key):
        if not scene:
            for href in group:
                log.warning("skipping %s: file name does not match %s", href, pattern)
            continue
        assets: dict[str, str] = {}
        date = None
        for href in group:
            m = regex.match(href.rpartition("/")[2])
            assert m is not None
            assets[m.group("band")] = href
            date = m.groupdict().get("date") or date
        yield SceneFiles(scene=scene, assets=assets, date=date)


def _order_assets(assets: Mapping[str, str], recipe: Recipe | None) -> dict[str, str]:
    """Put the recipe's reference band first (it defines the item grid)."""
    if recipe is None:
        return dict(assets)
    ref = next((k for k in recipe.bands[recipe.reference_band].assets if k in assets), None)
    if ref is None:
        return dict(assets)
    return {ref: assets[ref], **{k: v for k, v in assets.items() if k != ref}}


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` wrote."""

    items_path: Path
    collection_path: Path
    count: int
    errors: list[dict[str, Any]]


def ingest(
    source: str,
    out_dir: str | Path,
    *,
    collection: str,
    sensor: SensorKind | None = None,
    recipe: Recipe | None = None,
    pattern: str = DEFAULT_PATTERN,
    datetime: dt.datetime | None = None,
    pgstac_dsn: str | None = None,
    properties: Mapping[str, Any] | None = None,
) -> IngestResult:
    """Build items for every scene under ``source``; write NDJSON + collection JSON; optionally load into pgstac.

    Args:
        source: Local folder or ``s3://bucket/prefix`` of COGs.
        out_dir: Where ``items.ndjson`` and ``collection.json`` go.
        collection: Collection id.
        sensor: Sensor kind; default from ``recipe``.
        recipe: The collection's recipe (band defaults, reference band); looked up by ``collection`` if None.
        pattern: File-name regex (groups ``scene``, ``band``, optional ``date``).
        datetime: Acquisition time for scenes without a date in the name or header.
        pgstac_dsn: If given, upsert the collection and items into this pgstac database.
        properties: Extra properties for every item.

    Returns:
        Paths written, item count, and error records of scenes that could not become items.
    """
    from catalogs.recipes import builtin_recipes

    recipe = recipe or builtin_recipes().get(collection)
    sensor = sensor or (recipe.sensor if recipe else None)
    if sensor is None:
        raise ValueError(f"no recipe for collection {collection!r}: pass sensor=")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items_path, collection_path = out / "items.ndjson", out / "collection.json"
    extent = CollectionExtent()
    errors: list[dict[str, Any]] = []
    with open(items_path, "w", encoding="utf-8") as fh:
        for files in group_scenes(iter_cogs(source), pattern):
            try:
                # the name's date, else the one given, else build_item reads TIFFTAG_DATETIME
                when = _parse_date(files.date) if files.date else datetime
                item = build_item(
                    files.scene, _order_assets(files.assets, recipe), collection=collection, sensor=sensor,
                    datetime=when, properties=properties, recipe=recipe,
                )
            except SceneError as exc:
                exc.stage = "ingest"
                log.warning("ingest: %s", exc)
                errors.append(exc.record())
                continue
            extent.add(item)
            fh.write(json.dumps(item.to_dict(include_self_link=False)) + "\n")
    coll = build_collection(collection, extent, sensor=sensor, description=recipe.description if recipe else "")
    collection_path.write_text(json.dumps(coll.to_dict(include_self_link=False), indent=2))
    if pgstac_dsn:
        load_into_pgstac(pgstac_dsn, [coll.to_dict(include_self_link=False)], items_path)
    return IngestResult(items_path=items_path, collection_path=collection_path, count=extent.count, errors=errors)


def read_ndjson(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of an NDJSON file, one line at a time.

    Args:
        path: The file.

    Yields:
        One dict per non-empty line.
    """
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_into_pgstac(
    dsn: str, collections: Sequence[Mapping[str, Any]], items: str | Path | Iterable[Mapping[str, Any]]
) -> None:
    """Upsert collections then items into a pgstac database with pypgstac.

    Args:
        dsn: PostgreSQL DSN of a pgstac database.
        collections: Collection dicts.
        items: Item dicts, or an NDJSON path (streamed).
    """
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods

    stream = read_ndjson(items) if isinstance(items, (str, Path)) else iter(items)
    with PgstacDB(dsn=dsn) as db:
        loader = Loader(db=db)
        loader.load_collections(iter([dict(c) for c in collections]), insert_mode=Methods.upsert)
        loader.load_items(stream, insert_mode=Methods.upsert)
