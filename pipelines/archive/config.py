"""The archive inference job's configuration: one typed, validated object built once at the entry point.

A config is a YAML file (see ``configs/infer/``). Every field is checked before any work starts: an unknown key, a
wrong type or an inconsistent combination is refused with a message naming the field (``catalog.bbox: ...``).
Library code never receives the whole config; the job passes plain values down.

Example::

    catalog:
      url: http://127.0.0.1:8080          # or `embedded:` to serve local item files with `rustac serve`
      collections: [toyworld-optical]
      bbox: [10.0, 45.0, 11.0, 46.0]
      datetime: 2024-01-01/2024-12-31
    tasks: [caption, detect]
    tiling: {size: 448, overlap: 32, min_valid_fraction: 0.5}
    model: {name_or_path: tiny, engine: plain, dtype: float32}
    actors: {min_actors: 1, max_actors: 2, batch_size: 8}
    output: {root: s3://bucket/earthgpt, commit_tiles: 2048, commit_seconds: 300}
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.jobconfig import ConfigError, StrictModel, load_job_config, validate

Task = Literal["caption", "detect", "classify"]
TASKS: tuple[str, ...] = ("caption", "detect", "classify")


__all__ = ["ConfigError", "InferConfig", "load_config", "parse_config"]

_Strict = StrictModel


class EmbeddedCatalog(_Strict):
    """Local STAC files served by an in-memory ``rustac serve`` that the job starts and stops itself.

    Attributes:
        collections: Collection JSON files.
        items: One newline-delimited GeoJSON file of items (or a FeatureCollection JSON).
    """

    collections: list[Path] = Field(min_length=1)
    items: Path


class CatalogConfig(_Strict):
    """Which scenes to process: a STAC API search.

    Attributes:
        url: STAC API root URL. Exactly one of ``url`` and ``embedded``.
        embedded: Local STAC files to serve for the duration of the job.
        collections: Collection ids to search (at least one; each needs a sensor recipe).
        bbox: ``[west, south, east, north]`` in WGS84 degrees (``west > east`` crosses the antimeridian).
        intersects: A GeoJSON geometry the scenes must intersect (instead of ``bbox``).
        datetime: A STAC datetime or interval (``2024-01-01/2024-06-30``, ``../2024-01-01``).
        filter: A CQL2 filter, as CQL2-JSON (a mapping) or CQL2-text (a string).
        max_items: Stop after this many matching scenes (``None``: all).
        asset_prefixes: Asset hrefs must lie under one of these prefixes (``s3://bucket/cogs/``, a local
            folder). Empty: any ``s3``/``https`` href, no local files (a catalog is untrusted input).
        incremental: Ask the catalog only for items updated since the last run's watermark (plus the scenes that
            failed before). ``earthgpt run --full-scan`` lists the whole search once (a reconcile for the schedule
            to run now and then).
        items_per_task: The search is split into disjoint datetime windows of about this many items (sized from
            the API's ``numberMatched``), each paged by its own read task.
        max_read_tasks: Upper bound on those windows.
        page_size: Items per STAC API page.
    """

    url: str | None = None
    embedded: EmbeddedCatalog | None = None
    collections: list[str] = Field(min_length=1)
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    filter: dict[str, Any] | str | None = None
    max_items: int | None = Field(default=None, gt=0)
    asset_prefixes: list[str] = Field(default_factory=list)
    incremental: bool = True
    items_per_task: int = Field(default=2000, ge=1)
    max_read_tasks: int = Field(default=256, ge=1)
    page_size: int = Field(default=100, ge=1, le=10000)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL of a STAC API, got {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("bbox")
    @classmethod
    def _valid_bbox(cls, value: tuple[float, float, float, float] | None) -> tuple[float, float, float, float] | None:
        if value is None:
            return value
        west, south, east, north = value
        if not (-180 <= west <= 180 and -180 <= east <= 180):
            raise ValueError(f"longitudes must be within [-180, 180], got west={west}, east={east}")
        if not (-90 <= south < north <= 90):
            raise ValueError(f"need -90 <= south < north <= 90, got south={south}, north={north}")
        return value

    @field_validator("intersects")
    @classmethod
    def _valid_geometry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        import shapely.geometry

        try:
            geom = shapely.geometry.shape(value)
        except Exception as exc:
            raise ValueError(f"not a GeoJSON geometry: {exc}") from None
        if geom.is_empty or not geom.is_valid:
            raise ValueError("geometry is empty or invalid")
        return value

    @field_validator("datetime")
    @classmethod
    def _valid_datetime(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from datetime import datetime as dt

        for part in value.split("/"):
            if part in ("", ".."):
                continue
            try:
                dt.fromisoformat(part.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"not an RFC 3339 date or interval: {value!r}") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> CatalogConfig:
        if (self.url is None) == (self.embedded is None):
            raise ValueError("url: give exactly one of `url` (a STAC API) and `embedded` (local files to serve)")
        if self.bbox is not None and self.intersects is not None:
            raise ValueError("intersects: give at most one of `bbox` and `intersects`")
        return self


class TilingConfig(_Strict):
    """How scenes are cut into model inputs.

    Attributes:
        size: Tile side in pixels (the model resizes tiles to its own input size).
        overlap: Pixels shared by neighbouring tiles; objects smaller than this are seen whole in some tile.
        min_valid_fraction: Tiles with less valid (non-nodata) data are skipped and counted, not sent to the model.
    """

    size: int = Field(default=448, ge=16, le=8192)
    overlap: int = Field(default=32, ge=0)
    min_valid_fraction: float = Field(default=0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> TilingConfig:
        if self.overlap >= self.size:
            raise ValueError(f"overlap: {self.overlap} must be smaller than size ({self.size})")
        return self


class ModelConfig(_Strict):
    """Which model runs and how.

    Attributes:
        name_or_path: A preset name (``tiny``) or a checkpoint folder saved with ``save_pretrained``.
        engine: ``deepspeed`` (DeepSpeed-inference; kernel injection on GPUs) or ``plain`` (PyTorch).
        dtype: Weights and activations dtype. ``float16`` needs a GPU.
        tp_size: Tensor-parallel degree (GPUs per model replica; DeepSpeed only).
        kernel_inject: DeepSpeed kernel injection (GPU only).
        cuda_graphs: Decode steps captured once as CUDA graphs and replayed (GPU actors, ``tp_size: 1``; off by
            default). See ``earthgpt.engine.InferenceEngine``.
        max_new_tokens: Generation budget per answer.
        seed: Seed for a preset's random initialisation (presets without trained weights only).
        storage_options: fsspec options for a remote ``name_or_path`` (``s3://bucket/models/x``); credentials come
            from the environment. Each node copies a remote model once into ``$EARTHGPT_CACHE`` (default
            ``~/.cache/earthgpt``).
    """

    name_or_path: str = "tiny"
    engine: Literal["plain", "deepspeed"] = "plain"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tp_size: int = Field(default=1, ge=1)
    kernel_inject: bool = False
    cuda_graphs: bool = False
    max_new_tokens: int = Field(default=96, ge=1, le=4096)
    seed: int = 0
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _engine_options(self) -> ModelConfig:
        if self.engine == "plain" and (self.tp_size != 1 or self.kernel_inject):
            raise ValueError("engine: tp_size > 1 and kernel_inject need engine: deepspeed")
        if self.cuda_graphs and (self.tp_size != 1 or self.kernel_inject):
            raise ValueError("cuda_graphs: needs tp_size 1 and no kernel_inject")
        return self


class ActorsConfig(_Strict):
    """The model stage's actor pool (one model replica per actor).

    Attributes:
        min_actors: Actors kept alive.
        max_actors: Actors the pool may grow to.
        num_gpus: GPUs per actor (``tp_size`` for tensor parallelism). Default: 1 when the Ray cluster has GPUs,
            else 0.
        num_cpus: CPUs per actor.
        batch_size: Tiles per model call.
        read_num_cpus: CPUs per read task (GDAL windows + sensor recipe).
    """

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    num_gpus: float | None = Field(default=None, ge=0.0)
    num_cpus: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=8, ge=1)
    read_num_cpus: float = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _min_le_max(self) -> ActorsConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors: {self.min_actors} exceeds max_actors ({self.max_actors})")
        return self


class DetectionConfig(_Strict):
    """Cross-tile de-duplication of detections (per scene, in scene coordinates).

    Attributes:
        nms_iou: Suppress a box overlapping a kept box of the same label by at least this IoU.
        containment: Also suppress a box when this fraction of its area lies inside a kept box of the same label
            (a box cut by a tile edge inside the whole box seen by the neighbouring tile).
    """

    nms_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    containment: float = Field(default=0.7, gt=0.0, le=1.0)


class RayConfig(_Strict):
    """How the job reaches Ray.

    Attributes:
        address: A cluster to join (``auto``, ``ray://host:10001``). Default: ``RAY_ADDRESS`` if set (as under
            ``ray job submit``), else a local instance started by the job.
        num_cpus: CPUs of a local instance (default: all).
        object_store_mb: Object store of a local instance (default: Ray's, 30 % of RAM).
    """

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int | None = Field(default=None, ge=64)


class OutputConfig(_Strict):
    """Where results go and how work is committed.

    Attributes:
        root: A local folder or an ``s3://bucket/prefix`` URL.
        storage_options: fsspec options for ``root`` (e.g. ``{endpoint_url: ...}``); credentials come from the
            environment.
        commit_tiles: A commit unit closes once its finished scenes hold at least this many tiles. ``None``: no
            tile limit. Closed units that waited for the commit before them are merged when their turn comes, up to
            16 times this (and 4,096 scenes).
        commit_seconds: ... or once its oldest finished scene has waited this long. ``None``: no time limit. With
            both ``None`` the whole run is one unit. Commits never stop the model: it works on while a unit is
            staged and committed, and a crash loses only the scenes not yet committed.
        max_attempts: A scene (or item) that failed this many runs in a row is quarantined: skipped until its item
            is updated or the run is given ``--retry-quarantined`` (see docs/outputs.md).
        lease_seconds: Time to live of the run's lease on its output key (renewed every third of it): a run whose
            driver vanished without releasing it blocks the next run of the key at most this long.
        fold_bytes: At the end of a run, the table files its units published are folded, per partition, into files
            of up to this many bytes of input, committed as one more unit (a night of small units would otherwise
            leave thousands of files per table for every query to open; see docs/outputs.md). ``None``: no fold.
    """

    root: str
    storage_options: dict[str, Any] = Field(default_factory=dict)
    commit_tiles: int | None = Field(default=2048, ge=1)
    commit_seconds: float | None = Field(default=300.0, gt=0.0)
    max_attempts: int = Field(default=3, ge=1)
    lease_seconds: float = Field(default=300.0, ge=5.0)
    fold_bytes: int | None = Field(default=128 * 2**20, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _renamed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "wave_size" in data:
            raise ValueError("wave_size: no longer exists (a run is one streaming execution; commit units are set "
                             "by commit_tiles and commit_seconds, see docs/outputs.md)")
        return data

    @field_validator("root")
    @classmethod
    def _supported_root(cls, value: str) -> str:
        if "://" in value and not value.startswith(("s3://", "file://", "memory://")):
            raise ValueError(f"must be a local folder or an s3:// URL, got {value!r}")
        return value.rstrip("/") or value


class InferConfig(_Strict):
    """The whole archive inference job.

    Attributes:
        catalog: The STAC search.
        tasks: Questions asked of every tile.
        vqa: Extra free-form questions asked of every tile (answers land in ``tiles.vqa_answers``).
        tiling: Tile size, overlap, minimum valid fraction.
        model: Model and engine.
        actors: Actor pool of the model stage.
        detection: Cross-tile NMS.
        ray: Where Ray runs.
        output: Output root and commit unit.
    """

    catalog: CatalogConfig
    tasks: list[Task] = Field(default_factory=lambda: list[Task](["caption", "detect"]), min_length=1)
    vqa: list[str] = Field(default_factory=list)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    actors: ActorsConfig = Field(default_factory=ActorsConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig

    @model_validator(mode="after")
    def _gpu_only_options(self) -> InferConfig:
        if self.actors.num_gpus == 0 and (
            self.model.dtype == "float16" or self.model.kernel_inject or self.model.cuda_graphs
        ):
            raise ValueError(
                "model: dtype float16, kernel_inject and cuda_graphs need GPU actors (actors.num_gpus > 0)"
            )
        if self.model.tp_size > 1 and (self.actors.num_gpus or 0) < self.model.tp_size:
            raise ValueError(f"model: tp_size {self.model.tp_size} needs actors.num_gpus >= {self.model.tp_size}")
        return self

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"tasks repeat: {value}")
        return value

    def output_key(self) -> str:
        """A short hash of everything that changes a tile's results: model, engine numerics, tasks, tiling, NMS.

        Two runs with the same key over the same scene produce the same rows, so the ledger skips the second. The
        model enters by content, never by path: a preset by name and seed, a checkpoint folder (local or
        ``s3://``) by :func:`earthgpt.weights.weights_digest` — the same weights copied to another node or bucket
        give the same key, other weights a different one.
        """
        return _output_key(self.model_dump_json(include={"model", "tasks", "vqa", "tiling", "detection"}))


@functools.lru_cache(maxsize=64)
def _output_key(dumped: str) -> str:
    data = json.loads(dumped)
    model = dict(data["model"])
    name = str(model.pop("name_or_path"))
    model.pop("tp_size", None)
    model.pop("cuda_graphs", None)  # the same answers, replayed: no reason to redo an archive
    model.pop("storage_options", None)
    model.pop("seed")
    from earthgpt.weights import is_remote, weights_digest

    if is_remote(name) or Path(name).is_dir():
        model["weights"] = weights_digest(name, data["model"].get("storage_options") or None)
    else:  # a preset: random weights from its name and seed
        model["preset"] = name.removeprefix("earthgpt_").removeprefix("earthgpt-")
        model["seed"] = data["model"]["seed"]
    payload = {
        "model": model,
        "tasks": sorted(data["tasks"]),
        "vqa": data["vqa"],
        "tiling": data["tiling"],
        "detection": data["detection"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def parse_config(data: dict[str, Any]) -> InferConfig:
    """Validate a config mapping.

    Args:
        data: The parsed YAML.

    Returns:
        The validated config.

    Raises:
        ConfigError: Naming each offending field (``catalog.bbox: ...``).
    """
    return validate(InferConfig, data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> InferConfig:
    """Read and validate a YAML job config.

    Relative paths in a config (embedded catalog files, a local output root, a checkpoint folder) are relative to
    the current directory, like paths on the command line.

    Args:
        path: The YAML file.
        overrides: Dotted keys to set after reading (``{"output.root": "/tmp/out"}``), e.g. from CLI flags.

    Returns:
        The validated config.

    Raises:
        ConfigError: If the file cannot be read or parsed, or a field is invalid.
    """
    return load_job_config(InferConfig, path, overrides)
