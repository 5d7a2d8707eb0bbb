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
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

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
        names: Band names (``eo:bands[].name``/``common_name``, STAC 1.1 ``bands[].name``/``eo:common_name``) that
            identify the band's asset when no key matches; among several single-band assets the finest wins.
        transform: ``linear`` (``DN * scale + offset``) or ``db`` (``10 log10(linear)``, for SAR power).
        scale: Default scale when the item's ``raster:bands`` gives none.
        offset: Default offset when the item's ``raster:bands`` gives none.
        nodata: Default nodata when neither the item nor the raster header gives one.
        required: Whether a scene without this band is an error (``MissingAsset``); optional bands are read only
            when a channel uses them.
        db_floor: Smallest linear value before the dB conversion (zero power would be -inf dB).
        units: Physical unit of the decoded values (``reflectance``, ``dB``, ``K``...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    assets: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    transform: Literal["linear", "db"] = "linear"
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    required: bool = True
    db_floor: float = 1e-6
    units: str | None = None

    @model_validator(mode="after")
    def _check_lookup(self) -> BandSpec:
        if not self.assets and not self.names:
            raise ValueError("a band needs asset keys ('assets') or band names ('names') to find its asset")
        return self


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


class RadiometryRule(BaseModel):
    """A documented per-collection radiometry rule for catalogs that omit scale/offset.

    The rule applies to the listed bands of an item whose version property (the first of ``properties`` present)
    is at least ``version_at_least``, and only where the item itself gives no value: the catalog always wins.
    Versions are ``NN.NN`` strings; a product id holding ``_NNNNN_`` after ``N`` (``..._N0509_...``) is read too.

    Attributes:
        description: Why the rule exists, with its source.
        properties: Item properties that carry the version, first present wins.
        version_at_least: Lowest version the rule applies to.
        bands: Band names the rule sets.
        scale: Scale to set, if any.
        offset: Offset to set, if any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = ""
    properties: tuple[str, ...]
    version_at_least: str
    bands: tuple[str, ...]
    scale: float | None = None
    offset: float | None = None

    def applies(self, properties: Mapping[str, Any]) -> bool:
        """Whether an item with these properties falls under the rule."""
        version = item_version(properties, self.properties)
        return version is not None and version >= _version_key(self.version_at_least)


_PRODUCT_BASELINE = re.compile(r"_N(\d{2})(\d{2})(?:_|$|\.)")


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def item_version(properties: Mapping[str, Any], keys: Iterable[str]) -> tuple[int, ...] | None:
    """The first version found in ``properties[keys...]`` as a tuple (``"05.09"`` → ``(5, 9)``), or None.

    Args:
        properties: Item properties.
        keys: Property names to look at, in order.

    Returns:
        The version tuple, or None when no listed property holds one.
    """
    for key in keys:
        value = properties.get(key)
        if value is None:
            continue
        text = str(value)
        m = _PRODUCT_BASELINE.search(text)
        if m:
            return int(m.group(1)), int(m.group(2))
        if re.fullmatch(r"\d+(\.\d+)*", text):
            return _version_key(text)
    return None


class Source(BaseModel):
    """A public (or user) catalog that publishes a collection this recipe serves.

    Attributes:
        name: The service (``Earth Search v1``, ``Microsoft Planetary Computer``...).
        stac_url: The STAC API root.
        collection: The collection id there.
        access: How its assets are read (``https``, ``s3``, ``s3 requester-pays``, ``signed https``...).
        notes: Anything a user must know (credentials, catalog quirks the recipe handles).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    stac_url: str
    collection: str
    access: str = "https"
    notes: str = ""


class Refusal(BaseModel):
    """Items of a collection the job refuses with a typed error instead of reading wrongly.

    Attributes:
        reason: Why the items cannot be read correctly.
        suggest: Collections to use instead.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str
    suggest: tuple[str, ...] = ()


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
        composite: Name of the composite the channels make (``true colour``, ``VV, VH, VV/VH (dB)``...).
        sources: The catalogs that publish the collections, for ``earthgpt catalog collections`` and the docs.
        radiometry_rules: Documented scale/offset rules for catalogs that omit them.
        prefer_alternates: Alternate asset hrefs (``alternate.<name>.href``) to read instead of ``href``, first
            present wins (e.g. ``s3`` for USGS, whose main hrefs need a browser login).
        refuse: Set for collections whose items the job must not read (see :class:`Refusal`).
        composites: Other standard composites of the same bands (e.g. SWIR false colour), by name; choose one with
            :meth:`with_composite`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    collections: tuple[str, ...]
    sensor: SensorKind
    description: str = ""
    reference_band: str
    bands: dict[str, BandSpec]
    channels: tuple[ChannelSpec, ChannelSpec, ChannelSpec]
    stretch: StretchSpec = Field(default_factory=StretchSpec)
    composite: str = ""
    sources: tuple[Source, ...] = ()
    radiometry_rules: tuple[RadiometryRule, ...] = ()
    prefer_alternates: tuple[str, ...] = ()
    refuse: Refusal | None = None
    composites: dict[str, tuple[ChannelSpec, ChannelSpec, ChannelSpec]] = Field(default_factory=dict)

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
        for name, channels in self.composites.items():
            for ch in channels:
                for band in (ch.band, ch.minus):
                    if band is not None and band not in self.bands:
                        raise ValueError(f"composite {name!r} uses unknown band {band!r}")
                if self.stretch.method == "fixed" and ch.range is None:
                    raise ValueError(f"composite {name!r}: stretch method 'fixed' needs a range on every channel")
        for rule in self.radiometry_rules:
            unknown = [b for b in rule.bands if b not in self.bands]
            if unknown:
                raise ValueError(f"radiometry rule names unknown bands {unknown}")
        return self

    def with_composite(self, name: str) -> Recipe:
        """The same recipe rendering another of its composites (its bands become required).

        Args:
            name: A key of :attr:`composites`.

        Returns:
            A recipe whose channels are that composite's.

        Raises:
            KeyError: If the recipe has no such composite.
        """
        if name not in self.composites:
            raise KeyError(f"recipe for {list(self.collections)} has no composite {name!r} (has {list(self.composites)})")
        channels = self.composites[name]
        used = {b for ch in channels for b in (ch.band, ch.minus) if b}
        bands = {n: (b.model_copy(update={"required": True}) if n in used else b) for n, b in self.bands.items()}
        reference = self.reference_band if self.reference_band in used else channels[0].band
        return self.model_copy(update={"channels": channels, "composite": name, "bands": bands,
                                       "reference_band": reference})

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
