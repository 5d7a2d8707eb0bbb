"""Check a catalog before a nightly job: fetch a few items, build scenes, read one window from each.

:func:`check_catalog` is what ``earthgpt catalog check URL --collection C`` runs. Each item gives a
:class:`CheckResult` with what was seen (grid, bands with units and radiometry, the store each asset is read from,
the physical values of one window) or the typed error a job would record for it; the check never stops at a bad item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rasterio.windows import Window

from catalogs.access import describe_access
from catalogs.errors import SceneError
from catalogs.hrefs import HrefPolicy
from catalogs.recipes import Recipe
from catalogs.scene import Scene


@dataclass
class BandSeen:
    """One band of a checked scene: where it came from and what one window held (physical units)."""

    name: str
    key: str
    unit: str | None
    scale: float
    offset: float
    nodata: float | None
    store: str | None
    via: str
    p2: float | None = None
    median: float | None = None
    p98: float | None = None


@dataclass
class CheckResult:
    """What the check saw for one item (``error`` set when the item failed)."""

    item_id: str
    collection: str | None
    crs: str | None = None
    shape: tuple[int, int] | None = None
    resolution: float | None = None
    window: tuple[int, int, int, int] | None = None  # col, row, width, height
    valid_fraction: float | None = None
    bands: list[BandSeen] = field(default_factory=list)
    error: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def check_items(
    items: Sequence[Mapping[str, Any]],
    *,
    href_policy: HrefPolicy | None = None,
    recipes: Mapping[str, Recipe] | None = None,
    window_size: int = 256,
) -> list[CheckResult]:
    """Build a scene from each item and read the window at its centre.

    Args:
        items: STAC item dicts.
        href_policy: Which hrefs may be read (default ``HrefPolicy()``).
        recipes: Recipe table (default: built-in).
        window_size: Side of the window read from each scene.

    Returns:
        One result per item, in order.
    """
    from catalogs.io import SceneReader, configure_gdal

    configure_gdal()
    results = []
    for item in items:
        result = CheckResult(item_id=str(item.get("id")), collection=item.get("collection"))
        try:
            scene = Scene.from_item(item, href_policy=href_policy, recipes=recipes)
            result.crs = scene.crs
            result.resolution = abs(scene.transform[0]) if scene.transform else None
            with SceneReader(scene) as reader:
                h, w = reader.shape
                if scene.shape is not None and scene.shape != reader.shape:
                    result.notes.append(f"the raster is {h}x{w}, the item's proj:shape says "
                                        f"{scene.shape[0]}x{scene.shape[1]}")
                result.shape = reader.shape
                size = min(window_size, h, w)
                window = Window((w - size) // 2, (h - size) // 2, size, size)
                values, valid = reader.read_physical(window)
                nodata = reader.band_nodata
            result.window = (int(window.col_off), int(window.row_off), size, size)
            result.valid_fraction = float(valid.mean())
            for name, asset in scene.bands.items():
                access = describe_access(asset.href)
                seen = BandSeen(name, asset.key, asset.unit, asset.scale, asset.offset, nodata.get(name, asset.nodata),
                                access["store"], access["via"])
                if name in values and valid.any():
                    p2, med, p98 = np.percentile(values[name][valid], [2, 50, 98])
                    seen.p2, seen.median, seen.p98 = float(p2), float(med), float(p98)
                result.bands.append(seen)
        except SceneError as exc:
            exc.item_id = exc.item_id or result.item_id
            result.error = exc.record()
        results.append(result)
    return results
