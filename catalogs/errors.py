"""Typed errors for bad scenes, so a job can record them as ``errors`` rows and go on with the next scene or tile.

Every error a scene can cause derives from :class:`SceneError`, which carries the STAC item id, the stage that failed
(``"scene"``, ``"open"``, ``"read"``, ``"recipe"``, ``"search"``, ``"ingest"``, ``"model"``, ``"parse"``), and
optionally the asset key and href. ``error.record()`` gives the row the pipeline writes.

The ``error_type`` column is the class name; each class belongs to one **category** (:data:`ERROR_CATEGORIES`,
documented in docs/outputs.md): ``network`` (transient: retried with backoff, then recorded), ``access`` (refused or
absent: 401/403/404, an href outside the allow-list), ``corrupt`` (bytes or metadata that are broken), ``unsupported``
(valid data the job cannot describe), ``model`` (the model stage failed or its text could not be used).
"""

from __future__ import annotations

from typing import Any


class SceneError(Exception):
    """Base class of every error a single scene (STAC item) can raise.

    Args:
        message: What went wrong, for a human.
        item_id: The STAC item id, when known.
        stage: The processing stage that failed.
        asset: The asset (band) key involved, if any.
        href: The asset href involved, if any.
    """

    default_stage = "scene"

    def __init__(
        self,
        message: str,
        *,
        item_id: str | None = None,
        stage: str | None = None,
        asset: str | None = None,
        href: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.item_id = item_id
        self.stage = stage or self.default_stage
        self.asset = asset
        self.href = href

    @property
    def error_type(self) -> str:
        """The class name, used as the ``error_type`` column."""
        return type(self).__name__

    def record(self) -> dict[str, Any]:
        """Return the error as a flat dict (``item_id``, ``stage``, ``error_type``, ``asset``, ``href``, ``message``)."""
        return {
            "item_id": self.item_id,
            "stage": self.stage,
            "error_type": self.error_type,
            "asset": self.asset,
            "href": self.href,
            "message": self.message,
        }

    def __str__(self) -> str:
        where = ", ".join(
            f"{k}={v}" for k, v in (("item", self.item_id), ("stage", self.stage), ("asset", self.asset)) if v
        )
        return f"{self.message} ({where})" if where else self.message


class InvalidItem(SceneError):
    """The item is not a usable STAC item (no id, a timestamp that does not parse, a malformed field)."""


class UnknownCollection(SceneError):
    """No sensor recipe is defined for the item's collection."""


class MissingAsset(SceneError):
    """The item lacks an asset (band) the collection's recipe needs."""


class HrefNotAllowed(SceneError):
    """An asset href falls outside the allowed schemes and prefixes (a catalog is untrusted input)."""


class AssetAccessDenied(SceneError):
    """The asset exists but reading it was refused (HTTP 403, permission denied)."""

    default_stage = "open"


class AssetNotFound(SceneError):
    """The asset href points at nothing (HTTP 404, missing file or key)."""

    default_stage = "open"


class CorruptRaster(SceneError):
    """The asset is not a readable raster, or it is truncated (a read past its end fails)."""

    default_stage = "open"


class UnsupportedDataType(SceneError):
    """The raster's data type is not one a recipe can handle (e.g. complex SAR, 64-bit integers)."""

    default_stage = "open"


class NoGeoreference(SceneError):
    """Neither the item (``proj:*``) nor the raster header gives a CRS and geotransform."""

    default_stage = "open"


class UnsupportedGeoreference(NoGeoreference):
    """The item is georeferenced only by ground control points (e.g. Sentinel-1 GRD in radar geometry).

    The job refuses such items rather than warping uncalibrated slant/ground-range data: the message names the
    item and the terrain-corrected collection to use instead.
    """

    default_stage = "scene"


class BandShapeMismatch(SceneError):
    """The bands of one scene do not cover the same grid (different CRS or extent)."""

    default_stage = "open"


class AllNodata(SceneError):
    """A window holds no valid pixel in any band the recipe uses."""

    default_stage = "read"


class NetworkError(SceneError):
    """A transient failure reaching the data (DNS, refused or dropped connection, timeout, 5xx/429 after GDAL's own
    retries); retried with backoff before it is recorded, and the scene is tried again on the next run."""

    default_stage = "open"


class UnsupportedScene(SceneError):
    """The scene's grid cannot give a single usable tile (e.g. a 1x1-pixel scene), or the item's ``proj:shape``
    contradicts the raster it describes."""

    default_stage = "plan"


class ModelError(SceneError):
    """The model stage raised on a tile (the message keeps the original exception's type and text)."""

    default_stage = "model"


class ParseError(SceneError):
    """The model's text could not be used: it parses to nothing, or it is not valid UTF-8."""

    default_stage = "parse"


ERROR_CATEGORIES: dict[str, str] = {
    "NetworkError": "network",
    "AssetAccessDenied": "access",
    "AssetNotFound": "access",
    "HrefNotAllowed": "access",
    "CorruptRaster": "corrupt",
    "InvalidItem": "corrupt",
    "BandShapeMismatch": "corrupt",
    "UnsupportedDataType": "unsupported",
    "NoGeoreference": "unsupported",
    "UnsupportedGeoreference": "unsupported",
    "UnknownCollection": "unsupported",
    "MissingAsset": "unsupported",
    "UnsupportedScene": "unsupported",
    "AllNodata": "unsupported",
    "ModelError": "model",
    "ParseError": "model",
}
"""``error_type`` → category; every :class:`SceneError` subclass is listed (a test checks it)."""


def error_category(error_type: str) -> str:
    """The category of an ``error_type`` value (``"other"`` for a type outside the vocabulary)."""
    return ERROR_CATEGORIES.get(error_type, "other")


class SearchError(Exception):
    """A STAC API search failed after its retries (not tied to one scene)."""
