"""A scene: one STAC item plus the recipe that turns its assets into the model's input.

:meth:`Scene.from_item` reads the shapes public catalogs publish: the projection extension at item or asset level
(``proj:code`` or the older ``proj:epsg``, ``proj:wkt2``, ``proj:projjson``; ``proj:shape``, ``proj:transform``),
per-asset ``raster:bands`` (STAC 1.0) or ``bands`` with ``raster:*`` fields (STAC 1.1) for scale, offset, nodata,
data type. Items without ``proj:*`` fields fall back to reading the reference asset's header.

Assets are found by key first (``red``, ``B04``), then by band name (``eo:bands[].name``/``common_name`` or STAC 1.1
``bands[].name``/``eo:common_name``; the finest single-band asset wins, e.g. CDSE's ``B04_10m`` over ``B04_20m``).
Radiometry is resolved per field, most specific first: the matching ``bands[]`` entry, the asset's own ``raster:*``
fields (STAC 1.1 inheritance), STAC 1.0 ``raster:bands``, the collection's documented rule (e.g. Sentinel-2
processing baseline >= 04.00: offset -0.1), then the recipe default.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import pystac
from pydantic import BaseModel, ConfigDict
from pyproj import CRS

from catalogs.errors import MissingAsset, NoGeoreference, SceneError, UnsupportedGeoreference
from catalogs.hrefs import HrefPolicy, to_gdal_path
from catalogs.recipes import Recipe, SensorKind, recipe_for


class BandAsset(BaseModel):
    """Where one logical band of a scene lives and how to decode it.

    Attributes:
        key: The STAC asset key (e.g. ``red`` or ``B04``).
        href: The normalised, policy-checked URL.
        scale: DN scale (item ``raster:bands`` or the recipe default).
        offset: DN offset.
        nodata: Nodata from the item; None means "ask the raster header, then the recipe".
        data_type: Data type from the item, if given.
        shape: ``proj:shape`` of the asset, if given.
        transform: ``proj:transform`` of the asset (6 terms), if given.
        unit: Physical unit of the decoded values (from the recipe), e.g. ``reflectance``, ``dB``, ``K``.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    href: str
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    data_type: str | None = None
    shape: tuple[int, int] | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    unit: str | None = None

    @property
    def gdal_path(self) -> str:
        """The path GDAL opens (``/vsis3/...`` for ``s3://``)."""
        return to_gdal_path(self.href)


class Scene(BaseModel):
    """One STAC item ready to be read: grid, bands and recipe.

    Attributes:
        id: STAC item id.
        collection: STAC collection id.
        sensor: ``optical``, ``sar`` or ``thermal`` (from the recipe).
        datetime: Acquisition time (``datetime`` or ``start_datetime``), UTC.
        updated: The item's ``updated`` timestamp (for incremental runs), if any.
        geometry: Footprint as GeoJSON in WGS84.
        bbox: WGS84 bounding box.
        crs: CRS of the reference grid (``EPSG:…`` or WKT).
        transform: Affine transform of the reference grid (6 terms).
        shape: ``(height, width)`` of the reference grid.
        bands: Logical band → asset.
        recipe: The collection's sensor recipe.
        cloud_cover: ``eo:cloud_cover`` if given.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    collection: str
    sensor: SensorKind
    datetime: dt.datetime | None
    updated: dt.datetime | None = None
    geometry: dict[str, Any] | None = None
    bbox: tuple[float, ...] | None = None
    crs: str | None = None
    transform: tuple[float, float, float, float, float, float] | None = None
    shape: tuple[int, int] | None = None
    bands: dict[str, BandAsset]
    recipe: Recipe
    cloud_cover: float | None = None

    @classmethod
    def from_item(
        cls,
        item: pystac.Item | Mapping[str, Any],
        *,
        recipes: Mapping[str, Recipe] | None = None,
        href_policy: HrefPolicy | None = None,
        read_header_if_missing: bool = True,
    ) -> Scene:
        """Build a scene from a STAC item.

        Args:
            item: A pystac item or its dict.
            recipes: Recipe table (default: the built-in recipes).
            href_policy: Which hrefs may be opened (default ``HrefPolicy()``: remote ``s3``/``https`` only).
            read_header_if_missing: When the item has no ``proj:*`` grid, read it from the reference asset's header.

        Returns:
            The scene.

        Raises:
            UnknownCollection: No recipe for the collection.
            MissingAsset: A band the recipe needs has no asset.
            HrefNotAllowed: An asset href is outside the policy.
            NoGeoreference: No grid in the item and none could be read (or reading was disabled).
        """
        if not isinstance(item, pystac.Item):
            item = pystac.Item.from_dict(dict(item), preserve_dict=True)
        policy = href_policy or HrefPolicy()
        try:
            return cls._from_item(item, recipes, policy, read_header_if_missing)
        except SceneError as exc:
            exc.item_id = exc.item_id or item.id
            raise

    @classmethod
    def _from_item(
        cls, item: pystac.Item, recipes: Mapping[str, Recipe] | None, policy: HrefPolicy, read_header: bool
    ) -> Scene:
        recipe = recipe_for(item.collection_id, recipes)
        props = item.properties
        if recipe.refuse is not None:
            instead = f"; use {' or '.join(repr(c) for c in recipe.refuse.suggest)} instead" if recipe.refuse.suggest else ""
            raise UnsupportedGeoreference(
                f"item {item.id!r} of collection {item.collection_id!r} is refused: {recipe.refuse.reason}{instead}",
                item_id=item.id,
            )
        rules = [r for r in recipe.radiometry_rules if r.applies(props)]
        bands: dict[str, BandAsset] = {}
        used = set(recipe.used_bands)
        for name, spec in recipe.bands.items():
            key = _find_asset(item, spec.assets, spec.names)
            if key is None:
                if spec.required or name in used:
                    raise MissingAsset(
                        f"item has no asset for band {name!r} (looked for keys {list(spec.assets)} and band names "
                        f"{list(spec.names)}; has {sorted(item.assets)})",
                        asset=(spec.assets or spec.names)[0],
                    )
                continue
            asset = item.assets[key]
            href = policy.check(_chosen_href(asset, recipe.prefer_alternates), item_id=item.id, asset=key)
            fields = asset.extra_fields
            radio = _radiometry(fields, spec.names)
            scale, offset = radio.get("scale"), radio.get("offset")
            for rule in rules:
                if name in rule.bands:
                    scale = rule.scale if scale is None and rule.scale is not None else scale
                    offset = rule.offset if offset is None and rule.offset is not None else offset
            bands[name] = BandAsset(
                key=key,
                href=href,
                scale=float(scale) if scale is not None else spec.scale,
                offset=float(offset) if offset is not None else spec.offset,
                nodata=_nodata(radio.get("nodata")),
                data_type=radio.get("data_type"),
                shape=_shape(fields.get("proj:shape", props.get("proj:shape"))),
                transform=_transform(fields.get("proj:transform", props.get("proj:transform")))
                or _transform_from_bbox(fields.get("proj:bbox", props.get("proj:bbox")),
                                        fields.get("proj:shape", props.get("proj:shape"))),
                unit=spec.units,
            )
        ref = bands[recipe.reference_band]
        ref_fields = item.assets[ref.key].extra_fields
        crs = _crs(ref_fields) or _crs(props)
        shape, transform = ref.shape, ref.transform
        if (crs is None or shape is None or transform is None) and read_header:
            from catalogs.access import resolve_access
            from catalogs.io import read_header as _read_header

            access = resolve_access(ref.href, item_id=item.id, asset=ref.key)
            with access.env():
                header = _read_header(access.path, item_id=item.id, asset=ref.key)
            if header.transform is None and header.has_gcps:
                raise UnsupportedGeoreference(
                    f"item {item.id!r}: asset {ref.key!r} is georeferenced only by ground control points (radar "
                    "geometry) and the item has no proj:* grid; it is not read. Use a terrain-corrected collection "
                    "(e.g. 'sentinel-1-rtc') instead",
                    asset=ref.key, href=ref.href,
                )
            crs = crs or header.crs
            shape = shape or header.shape
            transform = transform or header.transform
        if crs is None or transform is None:
            raise NoGeoreference(
                "item has no proj:* grid and the raster header gives no CRS/transform", asset=ref.key, href=ref.href
            )
        start = item.datetime or item.common_metadata.start_datetime
        return cls(
            id=item.id,
            collection=item.collection_id or "",
            sensor=recipe.sensor,
            datetime=_utc(start),
            updated=_utc(item.common_metadata.updated),
            geometry=item.geometry,
            bbox=tuple(item.bbox) if item.bbox else None,
            crs=crs,
            transform=transform,
            shape=shape,
            bands=bands,
            recipe=recipe,
            cloud_cover=_float(props.get("eo:cloud_cover")),
        )

    @property
    def height(self) -> int:
        """Rows of the reference grid."""
        if self.shape is None:
            raise NoGeoreference("scene has no grid shape", item_id=self.id)
        return self.shape[0]

    @property
    def width(self) -> int:
        """Columns of the reference grid."""
        if self.shape is None:
            raise NoGeoreference("scene has no grid shape", item_id=self.id)
        return self.shape[1]


def _absolute_href(asset: pystac.Asset) -> str:
    """The asset href; only relative references are resolved against the item's self link.

    An absolute path stays a local path: resolving ``/data/x.tif`` against ``http://api/items/1`` (as RFC 3986
    would) gives a URL nobody meant.
    """
    raw = asset.href
    if "://" in raw or raw.startswith("/"):
        return raw
    return asset.get_absolute_href() or raw


def _asset_bands(fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Band objects of an asset: STAC 1.1 ``bands``, else STAC 1.0 ``eo:bands`` (names only)."""
    for key in ("bands", "eo:bands"):
        value = fields.get(key)
        if isinstance(value, list):
            return [dict(b) for b in value if isinstance(b, dict)]
    return []


def _band_names(band: Mapping[str, Any]) -> set[str]:
    return {str(band[k]) for k in ("name", "common_name", "eo:common_name") if band.get(k)}


def _find_asset(item: pystac.Item, keys: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The asset holding a band: the first listed key present, else the finest single-band asset named so."""
    for key in keys:
        if key in item.assets:
            return key
    if not names:
        return None
    wanted = set(names)
    candidates = []
    for order, (key, asset) in enumerate(item.assets.items()):
        fields = asset.extra_fields
        roles = set(asset.roles or ())
        if roles and not roles & {"data", "reflectance", "temperature", "backscatter", "gamma0", "sigma0"}:
            continue
        own = _asset_bands(fields)
        if len(own) == 1 and _band_names(own[0]) & wanted:
            candidates.append((_resolution(fields), order, key))
    return min(candidates)[2] if candidates else None


def _resolution(fields: Mapping[str, Any]) -> float:
    gsd = fields.get("gsd")
    if gsd:
        return float(gsd)
    transform = fields.get("proj:transform")
    if transform:
        return abs(float(transform[0]))
    return float("inf")


def _radiometry(fields: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Scale, offset, nodata and data type of an asset's band, each from the most specific place that has it.

    Order: the matching STAC 1.1 ``bands[]`` entry (``raster:scale``...), the asset's own fields (STAC 1.1 puts
    values shared by all bands there), then STAC 1.0 ``raster:bands`` (the entry at the matching ``eo:bands`` index).
    """
    out: dict[str, Any] = {}
    layers: list[Mapping[str, Any]] = []
    bands = fields.get("bands")
    if isinstance(bands, list) and bands and isinstance(bands[0], dict):
        layers.append(bands[_band_index(bands, names)])
    layers.append(fields)
    rbands = fields.get("raster:bands")
    if isinstance(rbands, list) and rbands and isinstance(rbands[0], dict):
        eo = fields.get("eo:bands")
        index = _band_index(eo, names) if isinstance(eo, list) and len(eo) == len(rbands) else 0
        layers.append(rbands[index])
    for out_key, keys in (("scale", ("raster:scale", "scale")), ("offset", ("raster:offset", "offset")),
                          ("nodata", ("nodata", "raster:nodata")), ("data_type", ("data_type", "raster:data_type"))):
        for layer in layers:
            value = next((layer[k] for k in keys if layer.get(k) is not None), None)
            if value is not None:
                out[out_key] = value
                break
    return out


def _band_index(bands: list[Any], names: tuple[str, ...]) -> int:
    wanted = set(names)
    for i, band in enumerate(bands):
        if isinstance(band, dict) and _band_names(band) & wanted:
            return i
    return 0


def _chosen_href(asset: pystac.Asset, prefer: tuple[str, ...]) -> str:
    alternates = asset.extra_fields.get("alternate")
    if isinstance(alternates, dict):
        for name in prefer:
            alt = alternates.get(name)
            if isinstance(alt, dict) and alt.get("href"):
                return str(alt["href"])
    return _absolute_href(asset)


def _transform_from_bbox(bbox: Any, shape: Any) -> tuple[float, float, float, float, float, float] | None:
    """``proj:transform`` from ``proj:bbox`` (in the item's CRS) and ``proj:shape`` for items that give only those."""
    if not bbox or not shape or len(bbox) != 4:
        return None
    xmin, ymin, xmax, ymax = (float(v) for v in bbox)
    rows, cols = int(shape[0]), int(shape[1])
    return (xmax - xmin) / cols, 0.0, xmin, 0.0, -(ymax - ymin) / rows, ymax


def _crs(fields: Mapping[str, Any]) -> str | None:
    code = fields.get("proj:code")
    epsg = fields.get("proj:epsg")
    wkt = fields.get("proj:wkt2")
    projjson = fields.get("proj:projjson")
    for value in (code, f"EPSG:{epsg}" if epsg else None, wkt, projjson):
        if value:
            return str(CRS.from_user_input(value).to_string())
    return None


def _shape(value: Any) -> tuple[int, int] | None:
    if not value:
        return None
    return int(value[0]), int(value[1])


def _transform(value: Any) -> tuple[float, float, float, float, float, float] | None:
    if not value or len(value) < 6:
        return None
    a, b, c, d, e, f = (float(v) for v in value[:6])
    return a, b, c, d, e, f


def _nodata(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # STAC allows "nan", "inf", "-inf"
        return float(value)
    return float(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
