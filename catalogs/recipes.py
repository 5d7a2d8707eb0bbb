"""Sensor recipes: how a collection's assets become the model's 3-channel float input and a valid-data mask.

A recipe is data, one YAML file per collection family under ``catalogs/collections/`` (package data). Sensors differ
only in values: which assets hold which band, how DN become physical values (``linear``: ``DN * scale + offset``;
``db``: ``10 log10`` of that), which band (or band difference) feeds each channel, and how each channel is stretched
to [0, 1] (a fixed range, or percentiles computed once per scene from an overview so neighbouring tiles look alike).

Example (Sentinel-1 RTC)::

    collections: [sentinel-1-rtc]
    sensor: sar
    reference_band: vv
    bands:
      vv: {assets: [vv], transform: db, nodata: -32768}
      vh: {assets: [vh], transform: db, nodata: -32768}
    channels:
      - {band: vv, range: [-25.0, 0.0]}
      - {band: vh, range: [-32.0, -5.0]}
      - {band: vv, minus: vh, range: [0.0, 15.0]}
    stretch: {method: fixed}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from catalogs.errors import AllNodata, UnknownCollection

SensorKind = Literal["optical", "sar", "thermal"]
SENSORS: tuple[str, ...] = ("optical", "sar", "thermal")

# Channel values of one scene's stretch: (low, high) per output channel.
Stretch = tuple[tuple[float, float], ...]


class BandSpec(BaseModel):
    """One logical band of a recipe.

    Attributes:
        assets: Asset keys that may hold the band, first match wins (catalogs name them differently).
        transform: ``linear`` (``DN * scale + offset``) or ``db`` (``10 log10(linear)``, for SAR power).
        scale: Default scale when the item's ``raster:bands`` gives none.
        offset: Default offset when the item's ``raster:bands`` gives none.
        nodata: Default nodata when neither the item nor the raster header gives one.
        required: Whether a scene without this band is an error (``MissingAsset``); optional bands are read only
            when a channel uses them.
        db_floor: Smallest linear value before the dB conversion (zero power would be -inf dB).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    assets: tuple[str, ...]
    transform: Literal["linear", "db"] = "linear"
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    required: bool = True
    db_floor: float = 1e-6


class ChannelSpec(BaseModel):
    """One output channel: a band, or the difference of two bands (a ratio when both are in dB).

    Attributes:
        band: The band name.
        minus: Optional band subtracted from ``band``.
        range: Fixed (low, high) mapped to (0, 1); required when the recipe's stretch method is ``fixed``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    band: str
    minus: str | None = None
    range: tuple[float, float] | None = None


class StretchSpec(BaseModel):
    """How channels without a fixed range are stretched to [0, 1].

    Attributes:
        method: ``percentile`` (per scene, from an overview) or ``fixed`` (every channel has ``range``).
        low: Lower percentile.
        high: Upper percentile.
        overview_size: Longest side (pixels) of the overview the percentiles are computed from.
        min_span: Smallest ``high - low`` in physical units: a uniform scene (open sea, desert) is not stretched
            until its noise fills the range, and a dark scene does not blow its few bright surfaces to white.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["percentile", "fixed"] = "percentile"
    low: float = 2.0
    high: float = 98.0
    overview_size: int = 256
    min_span: float = 0.0


@dataclass(frozen=True)
class RecipeOutput:
    """A window rendered by a recipe.

    Attributes:
        image: ``(3, H, W)`` float32 in [0, 1]; invalid pixels are 0.
        valid: ``(H, W)`` bool, True where every band the recipe uses holds data.
        valid_fraction: Share of valid pixels in the window.
    """

    image: np.ndarray
    valid: np.ndarray
    valid_fraction: float


class Recipe(BaseModel):
    """How one collection's assets become the model input. See the module docstring for the YAML layout.

    Attributes:
        collections: STAC collection ids this recipe serves.
        sensor: ``optical``, ``sar`` or ``thermal`` (chooses the prompt wording in the pipeline).
        description: One line for humans.
        reference_band: The band whose grid the others are resampled onto (the finest one).
        bands: Logical bands by name.
        channels: Exactly three output channels.
        stretch: How channels without a fixed range are stretched.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    collections: tuple[str, ...]
    sensor: SensorKind
    description: str = ""
    reference_band: str
    bands: dict[str, BandSpec]
    channels: tuple[ChannelSpec, ChannelSpec, ChannelSpec]
    stretch: StretchSpec = Field(default_factory=StretchSpec)

    @model_validator(mode="after")
    def _check_names(self) -> Recipe:
        if self.reference_band not in self.bands:
            raise ValueError(f"reference_band {self.reference_band!r} is not one of the bands {list(self.bands)}")
        for ch in self.channels:
            for name in (ch.band, ch.minus):
                if name is not None and name not in self.bands:
                    raise ValueError(f"channel uses unknown band {name!r}")
            if self.stretch.method == "fixed" and ch.range is None:
                raise ValueError("stretch method 'fixed' needs a range on every channel")
        return self

    @property
    def used_bands(self) -> tuple[str, ...]:
        """Bands the channels read, reference band first, each once."""
        names = [self.reference_band]
        for ch in self.channels:
            for name in (ch.band, ch.minus):
                if name is not None and name not in names:
                    names.append(name)
        return tuple(names)

    def decode(
        self, band: str, data: np.ndarray, *, scale: float, offset: float, nodata: float | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Turn raw DN of one band into physical values and a validity mask.

        Args:
            band: The band name.
            data: Raw values as read from the raster.
            scale: Scale of the asset (item ``raster:bands`` or the recipe default).
            offset: Offset of the asset.
            nodata: Nodata value, or None.

        Returns:
            ``(values, valid)``: float32 values (dB for ``db`` bands) and a bool mask.
        """
        spec = self.bands[band]
        raw = np.asarray(data)
        valid = np.ones(raw.shape, dtype=bool)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            valid &= raw != nodata
        values = raw.astype(np.float32)
        if scale != 1.0 or offset != 0.0:
            values = values * np.float32(scale) + np.float32(offset)
        valid &= np.isfinite(values)
        if spec.transform == "db":
            floor = np.float32(spec.db_floor)
            values[~valid] = floor
            values = np.float32(10.0) * np.log10(np.maximum(values, floor))
        values[~valid] = 0.0
        return values.astype(np.float32, copy=False), valid

    def channel_values(self, values: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The three channels before stretching (a band, or a band difference)."""
        out = []
        for ch in self.channels:
            v = values[ch.band]
            if ch.minus is not None:
                v = v - values[ch.minus]
            out.append(v)
        return out

    def compute_stretch(self, values: Mapping[str, np.ndarray], valid: np.ndarray) -> Stretch:
        """Per-scene (low, high) for each channel, from physical values of an overview.

        Args:
            values: Decoded band values of the whole scene at overview resolution.
            valid: Validity mask of that overview.

        Returns:
            One (low, high) pair per channel (fixed ranges where the recipe gives them).

        Raises:
            AllNodata: If the overview has no valid pixel and some channel needs percentiles.
        """
        pairs: list[tuple[float, float]] = []
        chans = self.channel_values(values)
        for ch, v in zip(self.channels, chans, strict=True):
            if ch.range is not None:
                pairs.append((float(ch.range[0]), float(ch.range[1])))
                continue
            sample = v[valid]
            if sample.size == 0:
                raise AllNodata("the scene overview holds no valid pixel; cannot compute the stretch", stage="stretch")
            lo, hi = np.percentile(sample, [self.stretch.low, self.stretch.high])
            hi = max(hi, lo + self.stretch.min_span)
            if not hi > lo:
                hi = lo + 1e-6
            pairs.append((float(lo), float(hi)))
        return tuple(pairs)

    def render(self, values: Mapping[str, np.ndarray], valid: np.ndarray, stretch: Stretch) -> RecipeOutput:
        """Stretch decoded bands of one window into the model input.

        Args:
            values: Decoded band values on the reference grid (from :meth:`decode`).
            valid: Combined validity mask of the used bands.
            stretch: The scene's stretch (from :meth:`compute_stretch`).

        Returns:
            The ``(3, H, W)`` image in [0, 1], the mask and the valid fraction.
        """
        chans = self.channel_values(values)
        image = np.empty((3, *valid.shape), dtype=np.float32)
        for i, (v, (lo, hi)) in enumerate(zip(chans, stretch, strict=True)):
            np.clip((v - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, out=image[i])
        image[:, ~valid] = 0.0
        fraction = float(valid.mean()) if valid.size else 0.0
        return RecipeOutput(image=image, valid=valid, valid_fraction=fraction)


def load_recipe(path: str | Path) -> Recipe:
    """Parse one recipe YAML file.

    Args:
        path: The file.

    Returns:
        The validated recipe.
    """
    with open(path, encoding="utf-8") as fh:
        return Recipe.model_validate(yaml.safe_load(fh))


def _package_recipe_files() -> list[Path]:
    folder = resources.files("catalogs") / "collections"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith((".yaml", ".yml")))


@functools.cache
def builtin_recipes() -> dict[str, Recipe]:
    """Recipes shipped with the package, keyed by collection id."""
    return _index(load_recipe(p) for p in _package_recipe_files())


def _index(recipes: Iterable[Recipe]) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for recipe in recipes:
        for cid in recipe.collections:
            out[cid] = recipe
    return out


def load_recipes(*dirs: str | Path) -> dict[str, Recipe]:
    """The built-in recipes plus those in ``dirs`` (later files override earlier ones for the same collection).

    Args:
        dirs: Folders holding ``*.yaml`` recipe files.

    Returns:
        Recipes keyed by collection id.
    """
    out = dict(builtin_recipes())
    for d in dirs:
        out.update(_index(load_recipe(p) for p in sorted(Path(d).glob("*.y*ml"))))
    return out


def recipe_for(collection: str | None, recipes: Mapping[str, Recipe] | None = None) -> Recipe:
    """The recipe for a collection id.

    Args:
        collection: The STAC collection id.
        recipes: A recipe table (default: the built-in ones).

    Returns:
        The recipe.

    Raises:
        UnknownCollection: If no recipe serves the collection.
    """
    table = builtin_recipes() if recipes is None else recipes
    if collection is None or collection not in table:
        raise UnknownCollection(
            f"no sensor recipe for collection {collection!r} (known: {sorted(table)}); "
            "add a YAML file under catalogs/collections/ or pass recipe_dirs",
        )
    return table[collection]
