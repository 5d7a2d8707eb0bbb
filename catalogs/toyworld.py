"""The toy world: a deterministic, seeded, small multi-sensor archive with planted objects of known classes.

``generate_toyworld(out, scenes=6, seed=0)`` writes::

    out/cogs/{scene_id}_{band}.tif        real COGs (UTM, internal tiles, overviews), one file per band
    out/stac/collections/{collection}.json
    out/stac/items.ndjson                 items with projection/raster/eo|sar extensions, created/updated
    out/ground_truth.parquet              GeoParquet 1.1: scene_id, label, pixel box, CRS box, WGS84 polygon
    out/chips/{sensor}/{scene_id}_{k}.png 8-bit RGB chips cut through the same sensor recipe the pipeline uses
    out/annotations.jsonl                 one record per chip: objects (chip pixel boxes, each with a region
                                          caption), scene class, a one-sentence caption, split
    out/preview.png                       (preview=True) one chip per sensor with its ground-truth boxes

Sensors and what they show (scene ``i`` gets sensor ``("optical", "sar", "thermal")[i % 3]``):

- **optical** (``toyworld-optical``; S2-like assets ``blue``, ``green``, ``red``, ``nir``; uint16 reflectance, scale
  1e-4; 10 m): ships on water; buildings in residential and industrial districts; airplanes on airport aprons.
- **sar** (``toyworld-sar``; S1-RTC-like ``vv``, ``vh``; float32 linear power with gamma speckle; 10 m): ships on
  water (bright on dark sea), bright urban areas, fields.
- **thermal** (``toyworld-thermal``; Landsat-like ``lwir11``; uint16 Kelvin with scale 0.00341802, offset 149;
  30 m): warm vehicles on roads, warm industry, cool fields.

A scene is a grid of 128-px land-use cells (``harbor``, ``open sea``, ``airport``, ``residential``, ``industrial``,
``farmland``, ``road``); a chip's ``scene_class`` is the class covering most of it. Objects are 6-20 px, high
contrast, 0 to a handful per cell, never overlapping and never on nodata. Pixel boxes are ``[x1, y1, x2, y2]`` in
pixel-edge coordinates (``x2``/``y2`` exclusive: width = ``x2 - x1``). Sites lie in several UTM zones, some in the
southern hemisphere. Captions are written from a chip's truth (see :func:`chip_caption`): sensor, scene class, object
counts and coarse positions in one sentence, wording drawn from a few templates; each object also gets a region
caption (:func:`region_caption`). ``eo:cloud_cover`` is metadata only (no clouds are drawn): even-numbered scenes of a sensor get
less than 20 %, odd-numbered ones more, so filters have something to select.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image, ImageDraw
from pyproj import Transformer
from rasterio.transform import from_origin
from rasterio.windows import Window

from catalogs.hrefs import HrefPolicy
from catalogs.ingest import CollectionExtent, build_collection, build_item
from catalogs.io import SceneReader
from catalogs.recipes import SensorKind, builtin_recipes
from catalogs.scene import Scene

SENSORS: tuple[SensorKind, ...] = ("optical", "sar", "thermal")
COLLECTIONS: dict[str, str] = {"optical": "toyworld-optical", "sar": "toyworld-sar", "thermal": "toyworld-thermal"}
BANDS: dict[str, tuple[str, ...]] = {"optical": ("red", "green", "blue", "nir"), "sar": ("vv", "vh"),
                                     "thermal": ("lwir11",)}
RESOLUTION: dict[str, float] = {"optical": 10.0, "sar": 10.0, "thermal": 30.0}
LABELS: tuple[str, ...] = ("ship", "building", "airplane", "vehicle")
CELL = 128
OPTICAL_SCALE = 1e-4
THERMAL_SCALE, THERMAL_OFFSET = 0.00341802, 149.0
SAR_NODATA = -32768.0


@dataclass(frozen=True)
class Site:
    """Where a scene's upper-left corner lies: a UTM zone (EPSG code) and easting/northing."""

    name: str
    epsg: int
    easting: float
    northing: float


# Two UTM zones per sensor, one of them in the southern hemisphere (EPSG 327xx).
SITES: dict[str, tuple[Site, ...]] = {
    "optical": (Site("genoa", 32632, 492_000, 4_920_000), Site("sydney", 32756, 334_000, 6_254_000)),
    "sar": (Site("rotterdam", 32631, 588_000, 5_754_000), Site("cape-town", 32734, 262_000, 6_242_000)),
    "thermal": (Site("phoenix", 32612, 398_000, 3_710_000), Site("santiago", 32719, 344_000, 6_302_000)),
}

WATER_CLASSES = ("open sea", "harbor")
LAND_CLASSES: dict[str, tuple[str, ...]] = {
    "optical": ("residential", "industrial", "airport", "farmland"),
    "sar": ("farmland", "residential"),
    "thermal": ("road", "farmland", "industrial", "residential"),
}
LAND_WEIGHTS: dict[str, tuple[float, ...]] = {
    "optical": (0.35, 0.25, 0.2, 0.2),
    "sar": (0.5, 0.5),
    "thermal": (0.4, 0.2, 0.2, 0.2),
}
CLASS_NAMES: tuple[str, ...] = ("open sea", "harbor", "airport", "residential", "industrial", "farmland", "road")
_CLS = {name: i for i, name in enumerate(CLASS_NAMES)}

# What each (sensor, class) cell plants: (label, min count, max count, min size, max size, surface it must sit on).
PLANTS: dict[tuple[str, str], tuple[str, int, int, int, int, str]] = {
    ("optical", "open sea"): ("ship", 0, 3, 10, 20, "water"),
    ("optical", "harbor"): ("ship", 1, 5, 10, 20, "water"),
    ("optical", "airport"): ("airplane", 1, 4, 12, 20, "tarmac"),
    ("optical", "residential"): ("building", 2, 7, 6, 12, "ground"),
    ("optical", "industrial"): ("building", 1, 3, 12, 20, "ground"),
    ("sar", "open sea"): ("ship", 0, 3, 10, 20, "water"),
    ("sar", "harbor"): ("ship", 1, 5, 10, 20, "water"),
    ("thermal", "road"): ("vehicle", 1, 5, 6, 14, "road"),
}
_SURFACE = {"water": 0, "ground": 1, "road": 2, "tarmac": 3, "structure": 4}


@dataclass(frozen=True)
class PlantedObject:
    """One planted object in scene pixels (``x2``/``y2`` exclusive)."""

    label: str
    x1: int
    y1: int
    x2: int
    y2: int


@dataclass
class ToyScene:
    """One generated scene before it is written."""

    scene_id: str
    sensor: SensorKind
    site: Site
    height: int
    width: int
    datetime: dt.datetime
    cloud_cover: float | None
    class_map: np.ndarray
    objects: list[PlantedObject]
    bands: dict[str, np.ndarray]
    nodata: np.ndarray
    split: str = "train"

    @property
    def transform(self) -> rasterio.Affine:
        """Affine transform of the scene grid."""
        res = RESOLUTION[self.sensor]
        return from_origin(self.site.easting, self.site.northing, res, res)

    @property
    def crs(self) -> str:
        """The scene CRS (``EPSG:326xx``/``EPSG:327xx``)."""
        return f"EPSG:{self.site.epsg}"


@dataclass
class ToyWorld:
    """Paths and counts of a generated toy world."""

    root: Path
    items_path: Path
    collection_paths: dict[str, Path]
    ground_truth_path: Path
    annotations_path: Path
    chips_dir: Path
    preview_path: Path | None
    scene_ids: list[str]
    n_objects: int
    n_chips: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def href_policy(self) -> HrefPolicy:
        """A policy that allows reading this world's local COGs."""
        return HrefPolicy.for_roots(self.root / "cogs")


# ------------------------------------------------------------------------------------------------------- rendering


def _smooth(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth noise (about N(0, 1)) with features of ``cell`` pixels: bilinear upsampling of a coarse grid."""
    h, w = shape
    gh, gw = h // cell + 2, w // cell + 2
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((gw * cell, gh * cell), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)[:h, :w]


def _layout(rng: np.random.Generator, sensor: str, h: int, w: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Cell classes: a coast (water on one side) for optical/SAR, all land for thermal."""
    rows, cols = math.ceil(h / CELL), math.ceil(w / CELL)
    water = np.zeros((rows, cols), dtype=bool)
    if sensor in ("optical", "sar"):
        side = rng.choice(["left", "right", "top", "bottom"])
        n = cols if side in ("left", "right") else rows
        depth = int(rng.integers(1, n))  # at least one water and one land line of cells
        idx = np.arange(n)
        line = idx < depth if side in ("left", "top") else idx >= n - depth
        if side in ("left", "right"):
            water[:, line] = True
        else:
            water[line, :] = True
    cells: list[tuple[int, int, str]] = []
    land = LAND_CLASSES[sensor]
    for r in range(rows):
        for c in range(cols):
            if water[r, c]:
                coast = any(
                    0 <= r + dr < rows and 0 <= c + dc < cols and not water[r + dr, c + dc]
                    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))
                )
                name = "harbor" if coast and rng.random() < 0.75 else "open sea"
            else:
                name = str(rng.choice(land, p=LAND_WEIGHTS[sensor]))
            cells.append((r, c, name))
    class_map = np.zeros((h, w), dtype=np.uint8)
    for r, c, name in cells:
        class_map[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = _CLS[name]
    return class_map, cells


def _shape_mask(rng: np.random.Generator, label: str, lo: int, hi: int) -> np.ndarray:
    """A boolean mask whose bounding box is the whole array (so the box is exact)."""
    if label == "ship":
        length, beam = int(rng.integers(lo, hi + 1)), int(rng.integers(6, 9))
        m = np.ones((beam, length), dtype=bool)
        bow = beam // 2
        for k in range(bow):  # taper the bow
            cut = bow - k
            m[:cut, length - 1 - k] = False
            m[beam - cut:, length - 1 - k] = False
        m[:, length - 1] |= np.arange(beam) == beam // 2
    elif label == "airplane":
        length, span = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        m = np.zeros((span, length), dtype=bool)
        mid = span // 2
        m[mid - 1:mid + 2, :] = True  # fuselage
        wing = int(length * 0.4)
        m[:, wing:wing + 3] = True  # wings
        m[mid - span // 4:mid + span // 4 + 1, :2] = True  # tail
    elif label == "vehicle":
        m = np.ones((int(rng.integers(6, 9)), int(rng.integers(max(lo, 8), hi + 1))), dtype=bool)
    else:  # building
        m = np.ones((int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))), dtype=bool)
    if rng.random() < 0.5:
        m = m.T
    if rng.random() < 0.5:
        m = m[:, ::-1]
    if rng.random() < 0.5:
        m = m[::-1, :]
    return np.ascontiguousarray(m)


def _structures(rng: np.random.Generator, sensor: str, cells: list[tuple[int, int, str]], h: int, w: int,
                ) -> np.ndarray:
    """Surface map: water, ground, road (thermal roads, residential streets), tarmac (aprons), structure (piers)."""
    surface = np.full((h, w), _SURFACE["ground"], dtype=np.uint8)
    for r, c, name in cells:
        y0, x0 = r * CELL, c * CELL
        sl = (slice(y0, min(h, y0 + CELL)), slice(x0, min(w, x0 + CELL)))
        view = surface[sl]
        if name in WATER_CLASSES:
            view[:] = _SURFACE["water"]
            if name == "harbor":
                for _ in range(int(rng.integers(1, 3))):  # piers
                    p = int(rng.integers(10, CELL - 12))
                    if rng.random() < 0.5:
                        view[p:p + 3, : int(rng.integers(30, 80))] = _SURFACE["structure"]
                    else:
                        view[: int(rng.integers(30, 80)), p:p + 3] = _SURFACE["structure"]
        elif name == "airport":
            view[8:-8, 8:-8] = _SURFACE["tarmac"]
        elif name == "road" or (name == "residential" and sensor == "optical"):
            width = int(rng.integers(10, 15)) if name == "road" else 4
            p = int(rng.integers(20, CELL - 20 - width))
            if rng.random() < 0.5:
                view[p:p + width, :] = _SURFACE["road"]
            else:
                view[:, p:p + width] = _SURFACE["road"]
    return surface


def _plant(rng: np.random.Generator, sensor: str, cells: list[tuple[int, int, str]], surface: np.ndarray,
           nodata: np.ndarray) -> list[tuple[PlantedObject, np.ndarray]]:
    h, w = surface.shape
    taken = np.zeros((h, w), dtype=bool)
    planted: list[tuple[PlantedObject, np.ndarray]] = []
    for r, c, name in cells:
        rule = PLANTS.get((sensor, name))
        if rule is None:
            continue
        label, nmin, nmax, lo, hi, on = rule
        want = int(rng.integers(nmin, nmax + 1))
        y0, x0 = r * CELL, c * CELL
        y1, x1 = min(h, y0 + CELL), min(w, x0 + CELL)
        got, tries = 0, 0
        while got < want and tries < 60:
            tries += 1
            mask = _shape_mask(rng, label, lo, hi)
            mh, mw = mask.shape
            if y1 - y0 - 4 < mh or x1 - x0 - 4 < mw:
                continue
            py = int(rng.integers(y0 + 2, y1 - 2 - mh + 1))
            px = int(rng.integers(x0 + 2, x1 - 2 - mw + 1))
            box = (slice(py, py + mh), slice(px, px + mw))
            pad = (slice(max(0, py - 3), py + mh + 3), slice(max(0, px - 3), px + mw + 3))
            if taken[pad].any() or nodata[pad].any():
                continue
            under = surface[box][mask]
            # vehicles ride on roads; others sit wholly on their surface
            if not (under == _SURFACE[on]).all():
                continue
            taken[pad] = True
            planted.append((PlantedObject(label, px, py, px + mw, py + mh), mask))
            got += 1
    return planted


def _nodata_corner(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Half the scenes get a nodata triangle in one corner, as at the edge of a satellite track."""
    if rng.random() < 0.5:
        return np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = xx / w, yy / h
    corner = int(rng.integers(4))
    if corner & 1:
        u = 1 - u
    if corner & 2:
        v = 1 - v
    return (u + v) < rng.uniform(0.15, 0.35)


def _render_optical(rng: np.random.Generator, class_map: np.ndarray, surface: np.ndarray,
                    planted: list[tuple[PlantedObject, np.ndarray]]) -> dict[str, np.ndarray]:
    h, w = class_map.shape
    # reflectance per band (red, green, blue, nir)
    refl = np.zeros((4, h, w), dtype=np.float32)
    base = {
        "open sea": (0.030, 0.045, 0.050, 0.020), "harbor": (0.045, 0.060, 0.060, 0.030),
        "airport": (0.050, 0.075, 0.040, 0.300), "residential": (0.050, 0.070, 0.045, 0.280),
        "industrial": (0.110, 0.115, 0.120, 0.150), "farmland": (0.050, 0.080, 0.040, 0.350),
        "road": (0.090, 0.090, 0.095, 0.100),
    }
    for name, vals in base.items():
        m = class_map == _CLS[name]
        if m.any():
            refl[:, m] = np.asarray(vals, dtype=np.float32)[:, None]
    # farmland: stripes of crops and bare soil
    crops = np.asarray([(0.04, 0.08, 0.05, 0.38), (0.13, 0.11, 0.08, 0.22), (0.10, 0.11, 0.06, 0.30),
                        (0.06, 0.09, 0.05, 0.33)], dtype=np.float32)
    vertical = rng.random() < 0.5
    edges = np.cumsum(rng.integers(12, 30, size=max(h, w) // 12 + 2))
    stripe = np.searchsorted(edges, np.arange(w if vertical else h), side="right") % len(crops)
    stripe_map = np.broadcast_to(stripe[None, :] if vertical else stripe[:, None], (h, w))
    farm = class_map == _CLS["farmland"]
    refl[:, farm] = crops[stripe_map[farm]].T
    # asphalt is dark (about 0.09), so the white airplanes and bright roofs stand out after the stretch
    surf_vals = {"road": (0.09, 0.09, 0.095, 0.10), "tarmac": (0.09, 0.09, 0.095, 0.10),
                 "structure": (0.22, 0.22, 0.21, 0.25)}
    for name, vals in surf_vals.items():
        m = surface == _SURFACE[name]
        refl[:, m] = np.asarray(vals, dtype=np.float32)[:, None]
    refl *= (1.0 + 0.08 * _smooth(rng, (h, w), 48))[None]
    colours = {
        "ship": [(0.40, 0.40, 0.40, 0.38), (0.45, 0.30, 0.28, 0.35), (0.48, 0.48, 0.50, 0.42)],
        "airplane": [(0.55, 0.55, 0.56, 0.50)],
        "building": [(0.32, 0.12, 0.09, 0.30), (0.36, 0.36, 0.36, 0.34), (0.44, 0.46, 0.48, 0.42),
                     (0.24, 0.30, 0.40, 0.30)],
    }
    for obj, mask in planted:
        sl = (slice(obj.y1, obj.y2), slice(obj.x1, obj.x2))
        if obj.label == "building":  # a shadow to the south-east, not part of the box
            sh = (slice(obj.y1 + 2, obj.y2 + 2), slice(obj.x1 + 2, obj.x2 + 2))
            refl[(slice(None), *sh)] *= 0.45
        palette = colours[obj.label]
        col = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32)
        view = refl[(slice(None), *sl)]
        view[:, mask] = col[:, None] * rng.uniform(0.9, 1.1)
    refl += rng.normal(0.0, 0.004, size=refl.shape).astype(np.float32)
    dn = np.clip(np.rint(refl / OPTICAL_SCALE), 1, 65535).astype(np.uint16)
    return {"red": dn[0], "green": dn[1], "blue": dn[2], "nir": dn[3]}


def _render_sar(rng: np.random.Generator, class_map: np.ndarray, surface: np.ndarray,
                planted: list[tuple[PlantedObject, np.ndarray]]) -> dict[str, np.ndarray]:
    h, w = class_map.shape
    vv_db = np.full((h, w), -11.0, dtype=np.float32)
    cross = np.full((h, w), 6.0, dtype=np.float32)  # VV - VH in dB
    water = surface == _SURFACE["water"]
    vv_db[water] = -22.0 + 2.0 * _smooth(rng, (h, w), 64)[water]  # wind on the sea
    cross[water] = 7.5
    farm = class_map == _CLS["farmland"]
    fields = _smooth(rng, (h, w), 24)
    vv_db[farm] = -11.0 + 2.5 * fields[farm]
    urban = class_map == _CLS["residential"]
    vv_db[urban] = -6.0 + 1.5 * fields[urban]
    cross[urban] = 8.0
    points = urban & (rng.random((h, w)) < 0.02)
    vv_db[points] += 8.0
    vv_db[surface == _SURFACE["structure"]] = -2.0
    for obj, mask in planted:
        view = vv_db[obj.y1:obj.y2, obj.x1:obj.x2]
        view[mask] = rng.uniform(2.0, 7.0)
        cross[obj.y1:obj.y2, obj.x1:obj.x2][mask] = 5.0
    looks = rng.uniform(3.0, 6.0)
    vv = (10 ** (vv_db / 10)) * rng.gamma(looks, 1.0 / looks, size=(h, w))
    vh = (10 ** ((vv_db - cross) / 10)) * rng.gamma(looks, 1.0 / looks, size=(h, w))
    return {"vv": vv.astype(np.float32), "vh": vh.astype(np.float32)}


def _render_thermal(rng: np.random.Generator, class_map: np.ndarray, surface: np.ndarray,
                    planted: list[tuple[PlantedObject, np.ndarray]]) -> dict[str, np.ndarray]:
    h, w = class_map.shape
    kelvin = np.full((h, w), 297.0, dtype=np.float32)
    for name, t in (("farmland", 294.0), ("residential", 300.0), ("industrial", 304.0), ("road", 297.0)):
        kelvin[class_map == _CLS[name]] = t
    kelvin += 1.5 * _smooth(rng, (h, w), 32)
    ind = class_map == _CLS["industrial"]
    blocks = _smooth(rng, (h, w), 16) > 0.8
    kelvin[ind & blocks] += 3.0
    # roads are warm but well below the 98th percentile, so the hot vehicles on them keep their contrast
    kelvin[surface == _SURFACE["road"]] = 299.0 + rng.uniform(-1, 1)
    for obj, mask in planted:
        kelvin[obj.y1:obj.y2, obj.x1:obj.x2][mask] = rng.uniform(320.0, 330.0)
    kelvin += rng.normal(0.0, 0.3, size=(h, w)).astype(np.float32)
    dn = np.clip(np.rint((kelvin - THERMAL_OFFSET) / THERMAL_SCALE), 1, 65535).astype(np.uint16)
    return {"lwir11": dn}


_RENDER = {"optical": _render_optical, "sar": _render_sar, "thermal": _render_thermal}


def make_scene(index: int, seed: int, *, n_sensor_index: int, size: int | None = None) -> ToyScene:
    """Generate scene ``index`` of the world with ``seed`` (pure: the same arguments give the same arrays).

    Args:
        index: Scene index in the world (chooses the sensor: ``SENSORS[index % 3]``).
        seed: World seed.
        n_sensor_index: Index of this scene among the scenes of its sensor (chooses the site, cloud cover).
        size: Side in pixels (default: 384, 448 or 512, drawn from the seed).

    Returns:
        The scene, not yet written.
    """
    sensor = SENSORS[index % len(SENSORS)]
    rng = np.random.default_rng([seed, index])
    side = size or int(rng.choice([384, 448, 512]))
    h = w = side
    sites = SITES[sensor]
    base = sites[n_sensor_index % len(sites)]
    shift = (n_sensor_index // len(sites)) * side * RESOLUTION[sensor]  # repeated sites move east
    site = Site(base.name, base.epsg, base.easting + shift, base.northing)
    class_map, cells = _layout(rng, sensor, h, w)
    surface = _structures(rng, sensor, cells, h, w)
    nodata = _nodata_corner(rng, h, w)
    planted = _plant(rng, sensor, cells, surface, nodata)
    bands = _RENDER[sensor](rng, class_map, surface, planted)
    fill = SAR_NODATA if sensor == "sar" else 0
    for arr in bands.values():
        arr[nodata] = fill
    when = dt.datetime(2024, 5, 1, 10, 30, tzinfo=dt.timezone.utc) + dt.timedelta(days=7 * index + n_sensor_index)
    cloud = None
    if sensor != "sar":
        cloud = round(float(rng.uniform(1, 15) if n_sensor_index % 2 == 0 else rng.uniform(25, 60)), 2)
    scene_id = f"toy-{sensor}-{n_sensor_index:03d}-s{seed}"
    return ToyScene(
        scene_id=scene_id, sensor=sensor, site=site, height=h, width=w, datetime=when, cloud_cover=cloud,
        class_map=class_map, objects=[o for o, _ in planted], bands=bands, nodata=nodata,
    )


# ---------------------------------------------------------------------------------------------------------- output


def write_cogs(scene: ToyScene, cog_dir: Path, blocksize: int = 128) -> dict[str, Path]:
    """Write one COG per band (deflate, internal tiles, average overviews, scale/offset and datetime tags).

    Args:
        scene: The scene.
        cog_dir: Output folder.
        blocksize: Internal tile size.

    Returns:
        Band → path.
    """
    cog_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for band in BANDS[scene.sensor]:
        arr = scene.bands[band]
        path = cog_dir / f"{scene.scene_id}_{band}.tif"
        nodata = SAR_NODATA if scene.sensor == "sar" else 0
        profile = {
            "driver": "COG", "width": scene.width, "height": scene.height, "count": 1, "dtype": arr.dtype.name,
            "crs": scene.crs, "transform": scene.transform, "nodata": nodata, "blocksize": blocksize,
            "compress": "deflate", "overview_resampling": "average", "bigtiff": "NO",
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(arr, 1)
            if scene.sensor == "optical":
                dst.scales, dst.offsets = (OPTICAL_SCALE,), (0.0,)
            elif scene.sensor == "thermal":
                dst.scales, dst.offsets = (THERMAL_SCALE,), (THERMAL_OFFSET,)
            dst.update_tags(TIFFTAG_DATETIME=scene.datetime.strftime("%Y:%m:%d %H:%M:%S"))
            dst.set_band_description(1, band)
        paths[band] = path
    return paths


def _ground_truth_rows(scene: ToyScene) -> list[dict[str, Any]]:
    from shapely.geometry import Polygon

    t = scene.transform
    to_wgs84 = Transformer.from_crs(scene.crs, "EPSG:4326", always_xy=True)
    rows = []
    for obj in scene.objects:
        xs, ys = zip(*(t @ (x, y) for x, y in ((obj.x1, obj.y1), (obj.x2, obj.y1), (obj.x2, obj.y2),
                                                  (obj.x1, obj.y2))), strict=True)
        lon, lat = to_wgs84.transform(xs, ys)
        rows.append({
            "scene_id": scene.scene_id, "collection": COLLECTIONS[scene.sensor], "sensor": scene.sensor,
            "split": scene.split, "label": obj.label,
            "pixel_box": [obj.x1, obj.y1, obj.x2, obj.y2],
            "crs": scene.crs, "crs_box": [min(xs), min(ys), max(xs), max(ys)],
            "geometry": Polygon(zip(lon, lat, strict=True)),
        })
    return rows


def write_ground_truth(rows: list[dict[str, Any]], path: Path) -> None:
    """Write object footprints as GeoParquet 1.1 (WGS84 polygons; pixel and CRS boxes as columns)."""
    import geopandas as gpd

    columns = ["scene_id", "collection", "sensor", "split", "label", "pixel_box", "crs", "crs_box", "geometry"]
    gdf = gpd.GeoDataFrame(rows, columns=columns, geometry="geometry", crs="EPSG:4326")
    gdf.to_parquet(path, index=False, schema_version="1.1.0", write_covering_bbox=True)


@dataclass(frozen=True)
class Chip:
    """A chip cut from a scene: window, class, objects in chip pixels."""

    x: int
    y: int
    scene_class: str
    objects: list[tuple[str, list[int]]]


def sample_chips(
    rng: np.random.Generator, scene: ToyScene, valid: np.ndarray, n: int, size: int, positive_fraction: float,
) -> list[Chip]:
    """Choose ``n`` chip windows: a share centred near objects, the rest anywhere.

    Chips that cut an object so that less than 60 % of it shows are redrawn (up to 20 times), so labels match what
    is visible; objects showing at least 60 % keep a clipped box. Chips with nodata are redrawn too.

    Args:
        rng: Random generator.
        scene: The scene.
        valid: The scene's valid mask (from the recipe).
        n: Number of chips.
        size: Chip side.
        positive_fraction: Share of chips placed around a random object.

    Returns:
        The chips.
    """
    h, w = scene.height, scene.width
    boxes = np.asarray([[o.x1, o.y1, o.x2, o.y2] for o in scene.objects], dtype=np.int64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    labels = [o.label for o in scene.objects]
    chips: list[Chip] = []
    for _ in range(n):
        for attempt in range(20):
            if len(boxes) and rng.random() < positive_fraction:
                x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))]
                x = int(rng.integers(max(0, x2 - size), min(w - size, x1) + 1))
                y = int(rng.integers(max(0, y2 - size), min(h - size, y1) + 1))
            else:
                x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
            if not valid[y:y + size, x:x + size].all() and attempt < 19:
                continue
            cx1 = np.clip(boxes[:, 0] - x, 0, size)
            cy1 = np.clip(boxes[:, 1] - y, 0, size)
            cx2 = np.clip(boxes[:, 2] - x, 0, size)
            cy2 = np.clip(boxes[:, 3] - y, 0, size)
            visible = (cx2 - cx1) * (cy2 - cy1) / np.maximum(areas, 1)
            if ((visible > 0) & (visible < 0.6)).any() and attempt < 19:
                continue
            break
        keep = np.flatnonzero(visible >= 0.6)
        objs = sorted(
            ((labels[i], [int(cx1[i]), int(cy1[i]), int(cx2[i]), int(cy2[i])]) for i in keep),
            key=lambda o: (o[1][1], o[1][0]),
        )
        classes = np.bincount(scene.class_map[y:y + size, x:x + size].ravel(), minlength=len(CLASS_NAMES))
        chips.append(Chip(x=x, y=y, scene_class=CLASS_NAMES[int(classes.argmax())], objects=objs))
    return chips


# -------------------------------------------------------------------------------------------------------- captions

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_SENSOR_PHRASES: dict[str, tuple[str, str]] = {
    # sensor -> (with article, bare): "An infrared image", "infrared image"
    "optical": ("An optical image", "optical image"),
    "sar": ("A SAR image", "SAR image"),
    "thermal": ("An infrared image", "infrared image"),
}
_SCENE_PHRASES: dict[str, str] = {
    "open sea": "open sea", "harbor": "a harbor", "airport": "an airport", "residential": "a residential area",
    "industrial": "an industrial area", "farmland": "farmland", "road": "a road",
}  # fmt: skip
_POSITIONS = (("upper left", "top", "upper right"), ("left", "centre", "right"), ("lower left", "bottom",
                                                                                   "lower right"))
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{Sensor} of {scene} with {objects}.",
    "{Sensor} showing {scene}, with {objects}.",
    "{Scene} seen in {a_sensor}, with {objects}.",
    "This {sensor} shows {scene} with {objects}.",
)
"""Chip caption wordings; ``{objects}`` lists each class's count and where it lies ("two ships in the upper left")."""

EMPTY_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{Sensor} of {scene} with no objects.",
    "{Sensor} showing {scene}; no objects are visible.",
    "{Scene} seen in {a_sensor}, without any objects.",
    "This {sensor} shows {scene} and no objects.",
)
"""Chip caption wordings for chips without objects."""

REGION_TEMPLATES: tuple[str, ...] = (
    "A {size}{label} in the {position} of the image.",
    "A {size}{label}, {where}.",
    "There is a {size}{label} {where}.",
)
"""Region caption wordings for one object."""


def number_word(n: int) -> str:
    """``0`` -> ``"no"``, ``2`` -> ``"two"``; digits beyond twelve."""
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def coarse_position(box: Sequence[float], size: int) -> str:
    """Where a box's centre lies on a 3 x 3 grid of the chip: ``"upper left"``, ``"top"``, ..., ``"centre"``.

    Args:
        box: ``[x1, y1, x2, y2]`` in chip pixels.
        size: Chip side.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(2, max(0, int(3 * cx / size)))
    row = min(2, max(0, int(3 * cy / size)))
    return _POSITIONS[row][col]


def _where(position: str) -> str:
    return "in the centre" if position == "centre" else f"at the {position}" if position in ("top", "bottom") \
        else f"on the {position}" if position in ("left", "right") else f"in the {position}"


def _group_phrase(label: str, positions: list[str]) -> str:
    """``"two ships in the upper left"``, ``"three buildings across the image"``."""
    n = len(positions)
    noun = label if n == 1 else label + "s"
    head = f"{'a' if n == 1 and label[0] not in 'aeiou' else 'an' if n == 1 else number_word(n)} {noun}"
    distinct = sorted(set(positions), key=positions.index)
    if len(distinct) == 1:
        return f"{head} {_where(distinct[0])}"
    if len(distinct) == 2:
        return f"{head} {_where(distinct[0])} and {_where(distinct[1]).split(' ', 1)[1]}" \
            if _where(distinct[0]).split(" ", 1)[0] == _where(distinct[1]).split(" ", 1)[0] \
            else f"{head} {_where(distinct[0])} and {_where(distinct[1])}"
    return f"{head} spread across the image"


def chip_caption(
    sensor: str,
    scene_class: str,
    objects: Sequence[tuple[str, Sequence[float]]],
    size: int,
    rng: np.random.Generator,
) -> str:
    """One sentence describing a chip from its truth: sensor, scene class, object counts and coarse positions.

    E.g. ``"A SAR image of open sea with two ships in the upper left."``. Classes are listed in alphabetical order,
    positions in the order the objects are sorted (top to bottom); three or more positions of one class read
    "spread across the image". The wording is one of :data:`CAPTION_TEMPLATES` (or
    :data:`EMPTY_CAPTION_TEMPLATES`), drawn with ``rng``.

    Args:
        sensor: ``optical``, ``sar`` or ``thermal``.
        scene_class: One of :data:`CLASS_NAMES`.
        objects: ``(label, [x1, y1, x2, y2])`` in chip pixels.
        size: Chip side.
        rng: Chooses the template.

    Returns:
        The caption.

    Raises:
        ValueError: an unknown sensor or scene class.
    """
    if sensor not in _SENSOR_PHRASES:
        raise ValueError(f"unknown sensor {sensor!r}; expected one of {SENSORS}")
    if scene_class not in _SCENE_PHRASES:
        raise ValueError(f"unknown scene_class {scene_class!r}; expected one of {CLASS_NAMES}")
    groups: dict[str, list[str]] = {}
    for label, box in objects:
        groups.setdefault(label, []).append(coarse_position(box, size))
    parts = [_group_phrase(label, groups[label]) for label in sorted(groups)]
    templates = CAPTION_TEMPLATES if parts else EMPTY_CAPTION_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    article, bare = _SENSOR_PHRASES[sensor]
    scene = _SCENE_PHRASES[scene_class]
    return template.format(
        Sensor=article, sensor=bare, a_sensor=article[0].lower() + article[1:], scene=scene,
        Scene=scene[0].upper() + scene[1:], objects=" and ".join(parts),
    )  # fmt: skip


def region_caption(label: str, box: Sequence[float], size: int, rng: np.random.Generator) -> str:
    """One sentence describing one object's region: size (relative to its class), class and coarse position.

    E.g. ``"A large ship in the upper left of the image."``; wording from :data:`REGION_TEMPLATES`.

    Args:
        label: The object's class.
        box: ``[x1, y1, x2, y2]`` in chip pixels.
        size: Chip side.
        rng: Chooses the template.

    Returns:
        The caption.
    """
    position = coarse_position(box, size)
    longest = max(box[2] - box[0], box[3] - box[1])
    lo, hi = min(rule[3] for rule in PLANTS.values() if rule[0] == label), max(
        rule[4] for rule in PLANTS.values() if rule[0] == label)
    third = (hi - lo) / 3
    size_word = "small " if longest < lo + third else "large " if longest > hi - third else ""
    template = REGION_TEMPLATES[int(rng.integers(len(REGION_TEMPLATES)))]
    return template.format(size=size_word, label=label, position=position, where=_where(position))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` float in [0, 1] → ``(H, W, 3)`` uint8."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)


def write_preview(records: list[dict[str, Any]], root: Path, path: Path, scale: int = 4) -> Path:
    """Draw one chip per sensor (the first with the most objects) with its ground-truth boxes.

    Args:
        records: Annotation records.
        root: The toy world root (chip paths are relative to it).
        path: The PNG to write.
        scale: Upscaling factor.

    Returns:
        ``path``.
    """
    picks = []
    for sensor in SENSORS:
        recs = [r for r in records if r["sensor"] == sensor]
        if recs:
            picks.append(max(recs, key=lambda r: len(r["objects"])))
    tiles = []
    colours = {"ship": "cyan", "building": "orange", "airplane": "magenta", "vehicle": "red"}
    for rec in picks:
        chip = Image.open(root / rec["image"]).convert("RGB")
        big = chip.resize((chip.width * scale, chip.height * scale), Image.Resampling.NEAREST)
        canvas = Image.new("RGB", (big.width, big.height + 16), "white")
        canvas.paste(big, (0, 16))
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 2), f"{rec['sensor']}: {rec['scene_class']}", fill="black")
        for obj in rec["objects"]:
            x1, y1, x2, y2 = (v * scale for v in obj["box"])
            colour = colours.get(obj["label"], "yellow")
            draw.rectangle([x1, y1 + 16, x2 - 1, y2 - 1 + 16], outline=colour, width=2)
            draw.text((x1 + 2, y1 + 17), obj["label"], fill=colour)
        tiles.append(canvas)
    width = sum(t.width for t in tiles) + 8 * max(0, len(tiles) - 1)
    out = Image.new("RGB", (max(width, 1), max((t.height for t in tiles), default=1)), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 8
    out.save(path)
    return path


def generate_toyworld(
    out_dir: str | Path,
    *,
    scenes: int = 6,
    seed: int = 0,
    chips_per_scene: int = 400,
    val_chips_per_scene: int | None = None,
    val_scenes_per_sensor: int = 1,
    chip_size: int = 64,
    positive_fraction: float = 0.6,
    blocksize: int = 128,
    href_base: str | None = None,
    preview: bool = False,
    created: dt.datetime | None = None,
) -> ToyWorld:
    """Generate the toy world under ``out_dir`` (see the module docstring for the layout).

    Args:
        out_dir: Output folder (created).
        scenes: Number of scenes; sensors take turns (optical, sar, thermal, optical, ...).
        seed: World seed; the same seed gives the same files.
        chips_per_scene: Chips cut from each training scene.
        val_chips_per_scene: Chips cut from each validation scene (default: a quarter of ``chips_per_scene``).
        val_scenes_per_sensor: Whole scenes per sensor held out for validation (the last ones of the sensor),
            only for sensors with more scenes than that.
        chip_size: Chip side in pixels (the demo model's input size).
        positive_fraction: Share of chips placed around an object.
        blocksize: COG internal tile size.
        href_base: If given, item asset hrefs are ``{href_base}/cogs/{file}`` (e.g. ``s3://bucket/world`` once the
            ``cogs/`` folder is uploaded there) instead of local absolute paths.
        preview: Also write ``preview.png`` (one chip per sensor with boxes).
        created: ``created``/``updated`` of the items (default: a fixed time, so output is reproducible).

    Returns:
        Paths, counts and timings.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    root = Path(out_dir).absolute()
    cog_dir, chips_dir, stac_dir = root / "cogs", root / "chips", root / "stac"
    for d in (cog_dir, chips_dir, stac_dir / "collections"):
        d.mkdir(parents=True, exist_ok=True)
    created = created or dt.datetime(2024, 9, 1, tzinfo=dt.timezone.utc)
    recipes = builtin_recipes()
    policy = HrefPolicy.for_roots(cog_dir)
    per_sensor = {s: sum(1 for i in range(scenes) if SENSORS[i % 3] == s) for s in SENSORS}
    counters = dict.fromkeys(SENSORS, 0)
    extents = {s: CollectionExtent() for s in SENSORS}
    gt_rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    scene_ids: list[str] = []
    n_objects = 0
    val_n = chips_per_scene // 4 if val_chips_per_scene is None else val_chips_per_scene
    tick = time.perf_counter()
    with open(stac_dir / "items.ndjson", "w", encoding="utf-8") as items_fh:
        for index in range(scenes):
            sensor = SENSORS[index % 3]
            k = counters[sensor]
            counters[sensor] += 1
            t0 = time.perf_counter()
            scene = make_scene(index, seed, n_sensor_index=k)
            if per_sensor[sensor] > val_scenes_per_sensor and k >= per_sensor[sensor] - val_scenes_per_sensor:
                scene.split = "val"
            timings["render"] = timings.get("render", 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            paths = write_cogs(scene, cog_dir, blocksize=blocksize)
            timings["cogs"] = timings.get("cogs", 0.0) + time.perf_counter() - t0
            ref = recipes[COLLECTIONS[sensor]].reference_band
            ordered = {ref: paths[ref], **{b: p for b, p in paths.items() if b != ref}}
            props: dict[str, Any] = {"platform": f"toyworld-{sensor}", "constellation": "toyworld",
                                     "toyworld:split": scene.split}
            if scene.cloud_cover is not None:
                props["eo:cloud_cover"] = scene.cloud_cover
            item = build_item(
                scene.scene_id, {b: p.as_uri() for b, p in ordered.items()}, collection=COLLECTIONS[sensor],
                sensor=sensor, datetime=scene.datetime, properties=props, created=created, updated=created,
            )
            extents[sensor].add(item)
            # chips go through the same recipe and reader the pipeline uses
            t0 = time.perf_counter()
            local = Scene.from_item(item, recipes=recipes, href_policy=policy)
            with SceneReader(local) as reader:
                tile = reader.read(Window(0, 0, scene.width, scene.height))
            rgb = _to_uint8(tile.image)
            chip_rng = np.random.default_rng([seed, index, 1])
            n = val_n if scene.split == "val" else chips_per_scene
            sensor_dir = chips_dir / sensor
            sensor_dir.mkdir(exist_ok=True)
            caption_rng = np.random.default_rng([seed, index, 2])  # own stream: chips stay as they were
            for j, chip in enumerate(sample_chips(chip_rng, scene, tile.valid, n, chip_size, positive_fraction)):
                rel = f"chips/{sensor}/{scene.scene_id}_{j:04d}.png"
                Image.fromarray(rgb[chip.y:chip.y + chip_size, chip.x:chip.x + chip_size]).save(
                    root / rel, compress_level=1
                )
                records.append({
                    "image": rel, "sensor": sensor, "scene_id": scene.scene_id, "collection": COLLECTIONS[sensor],
                    "split": scene.split, "size": [chip_size, chip_size], "scene_class": chip.scene_class,
                    "window": [chip.x, chip.y, chip_size, chip_size],
                    "caption": chip_caption(sensor, chip.scene_class, chip.objects, chip_size, caption_rng),
                    "objects": [{"label": lab, "box": box,
                                 "caption": region_caption(lab, box, chip_size, caption_rng)}
                                for lab, box in chip.objects],
                })  # fmt: skip
            timings["chips"] = timings.get("chips", 0.0) + time.perf_counter() - t0
            if href_base:
                for asset in item.assets.values():
                    asset.href = f"{href_base.rstrip('/')}/cogs/{Path(asset.href).name}"
            items_fh.write(json.dumps(item.to_dict(include_self_link=False)) + "\n")
            gt_rows.extend(_ground_truth_rows(scene))
            n_objects += len(scene.objects)
            scene_ids.append(scene.scene_id)
    timings["total_scenes"] = time.perf_counter() - tick
    collection_paths: dict[str, Path] = {}
    for sensor in SENSORS:
        if not extents[sensor].count:
            continue
        cid = COLLECTIONS[sensor]
        coll = build_collection(cid, extents[sensor], sensor=sensor, description=recipes[cid].description)
        path = stac_dir / "collections" / f"{cid}.json"
        path.write_text(json.dumps(coll.to_dict(include_self_link=False), indent=2))
        collection_paths[sensor] = path
    t0 = time.perf_counter()
    write_ground_truth(gt_rows, root / "ground_truth.parquet")
    timings["ground_truth"] = time.perf_counter() - t0
    annotations = root / "annotations.jsonl"
    with open(annotations, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    preview_path = write_preview(records, root, root / "preview.png") if preview else None
    return ToyWorld(
        root=root, items_path=stac_dir / "items.ndjson", collection_paths=collection_paths,
        ground_truth_path=root / "ground_truth.parquet", annotations_path=annotations, chips_dir=chips_dir,
        preview_path=preview_path, scene_ids=scene_ids, n_objects=n_objects, n_chips=len(records),
        seconds=time.perf_counter() - t_start, timings=timings,
    )


def load_items(path: str | Path) -> list[dict[str, Any]]:
    """Read a (small) toy-world ``items.ndjson`` into a list, e.g. to load it into a test server.

    Args:
        path: The NDJSON file.

    Returns:
        Item dicts.
    """
    from catalogs.ingest import read_ndjson

    return list(read_ndjson(path))


def scene_classes() -> Sequence[str]:
    """All chip scene classes, in a fixed order."""
    return CLASS_NAMES


def replicate_items(
    items: Sequence[dict[str, Any]],
    n: int,
    *,
    prefix: str = "copy",
    start: dt.datetime | None = None,
    every: dt.timedelta | None = None,
) -> list[dict[str, Any]]:
    """``n`` items cycling over ``items`` under new ids, all pointing at the same COGs: a large catalog for
    planning and listing tests without writing more rasters.

    Args:
        items: Template items (e.g. :func:`load_items` of a toy world).
        n: How many items.
        prefix: New ids are ``<prefix>-<k:05d>``.
        start: With ``every``: item ``k`` is acquired at ``start + k * every`` and ``updated`` a day later (an
            archive whose items arrived over time); without: times are the templates'.
        every: Spacing of the acquisition times.

    Returns:
        New item dicts (deep copies).
    """
    import copy

    out = []
    for k in range(n):
        item = copy.deepcopy(items[k % len(items)])
        item["id"] = f"{prefix}-{k:05d}"
        if start is not None and every is not None:
            t = start + every * k
            item["properties"]["datetime"] = t.strftime("%Y-%m-%dT%H:%M:%SZ")
            item["properties"]["updated"] = (t + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.append(item)
    return out


def changed_items(
    items: Sequence[dict[str, Any]], indices: Sequence[int], *, new: int = 0, prefix: str = "new",
    updated: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """A night's changes to a catalog: ``items[k]`` for each ``k`` in ``indices`` updated, plus ``new`` new items
    (copies of the first items under ids ``<first id's prefix>-<prefix>-<j>``), all with ``updated`` set to
    ``updated`` (default now).

    Returns:
        The changed and new item dicts (deep copies), to load into the catalog.
    """
    import copy

    stamp = (updated or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [copy.deepcopy(items[k]) for k in indices]
    for j in range(new):
        item = copy.deepcopy(items[j % len(items)])
        item["id"] = f"{item['id'].split('-')[0]}-{prefix}-{j}"
        out.append(item)
    for item in out:
        item["properties"]["updated"] = stamp
    return out
