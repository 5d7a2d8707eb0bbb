"""The archive inference job: STAC scenes → tiles → EarthGPT actors → GeoParquet tables + Zarr arrays, incremental.

Read it top to bottom; :func:`run` is the whole job, **one streaming Ray Data execution per run**:

1. **Set up**: GDAL cloud settings (once, here), the output root, the output key (from the model's *content*) and
   its lease (one run per output key; :mod:`pipelines.archive.lease`, renewed by a heartbeat while the run lasts),
   the ledger (finish or undo what crashed runs left), the search's watermark and retry list.
2. **Plan the source** (:mod:`pipelines.archive.source`): the STAC search, restricted to items ``updated`` since the last
   run's watermark (unless ``--full-scan``), is cut into disjoint datetime windows sized from ``numberMatched``;
   scenes that failed before are fetched again by id. Each window is one read task; nothing lists the whole search.
3. **Stream**: read tasks (items → scenes, committed ones skipped) → :class:`~pipelines.archive.stages.ReadStage` (tiles,
   CPU tasks) → :class:`~pipelines.archive.stages.ModelStage` (one long-lived actor pool: each actor loads the model once
   per run) → :class:`~pipelines.archive.stages.ParseStage` (CPU tasks) → the driver's
   :class:`~pipelines.archive.stages.SceneCollector`, which only gathers each scene's rows and sends a complete scene to an
   assembly task (:func:`~pipelines.archive.stages.assemble_scene`: NMS, rows, arrays).
4. **Commit while the model works on** (:class:`UnitCommitter`): finished scenes accumulate into a unit until it
   holds ``output.commit_tiles`` tiles or is ``output.commit_seconds`` old; a Ray task stages its GeoParquet files and
   Zarr groups; the driver writes the unit's ledger record (the commit point) and publishes. A crash loses only the
   scenes not yet committed; the rerun redoes exactly those.
5. **Finish**: the new watermark and retry list, one ``runs`` row (planned = written + skipped + failed; model loads
   per actor), ledger compaction.

Entry points: ``earthgpt run CONFIG`` and ``python -m pipelines.infer CONFIG`` (what a Ray job submits).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import shapely

from catalogs.hrefs import HrefPolicy, redact_text, redact_url
from catalogs.io import configure_gdal
from pipelines.archive.config import ConfigError, InferConfig, load_config
from pipelines.archive.fold import FoldPublishFailed, FoldReport, fold_run, folders_of_runs, is_table_file
from pipelines.archive.lease import Lease, LeaseHeld, LeaseLost
from pipelines.archive.ledger import Ledger, UnitRecord, new_run_id, rewrite_without, run_of
from pipelines.archive.source import (
    SCENE_COLUMNS,
    SearchSpec,
    SourceStats,
    Window,
    parse_time,
    plan_windows,
    settle_retries,
    small_search_counts,
    window_datasource,
)
from pipelines.archive.stages import (
    AssemblySettings,
    ModelStage,
    ParseStage,
    ReadStage,
    SceneCollector,
    SceneResult,
    assemble_scene,
    check_chain,
)
from pipelines.archive.store import (
    OutputStore,
    StagedFile,
    build_frame,
    embeddings_group,
    ensure_parent_groups,
    geoparquet_bytes,
    part_unit,
    partition_dir,
    stage_table,
    write_scene_grid,
)

log = logging.getLogger(__name__)

Printer = Callable[[str], None]
HEARTBEAT_S = 15.0  # seconds between progress lines while tiles stream through the model
RETRY_IDS_PER_TASK = 100  # ids per retry read task (one STAC `ids` search)
EXIT_LEASE_HELD = 75  # EX_TEMPFAIL: another run holds the output key; try later


@dataclass
class RunSummary:
    """What a run did; also its ``runs`` row."""

    run_id: str
    output_root: str
    status: str = "running"
    scenes_matched: int = 0
    scenes_skipped: int = 0
    scenes_processed: int = 0
    scenes_failed: int = 0
    tiles_planned: int = 0
    tiles_written: int = 0
    tiles_skipped: int = 0
    tiles_failed: int = 0
    detections: int = 0
    errors: int = 0
    units_committed: int = 0
    files_folded: int = 0
    wall_s: float = 0.0
    full_scan: bool = True
    updated_since: datetime | None = None
    watermark: datetime | None = None
    read_tasks: int = 0
    startup_s: float | None = None
    model_actors: int = 0
    model_loads: int = 0
    batch_plan: str | None = None
    detections_by_label: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    message: str = ""

    @property
    def tiles_per_s(self) -> float:
        """Tiles through the model per second of wall time."""
        return self.tiles_written / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def reconciles(self) -> bool:
        """Whether tiles planned = written + skipped + failed."""
        return self.tiles_planned == self.tiles_written + self.tiles_skipped + self.tiles_failed

    def lines(self) -> list[str]:
        """A human summary."""
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.detections_by_label.items())) or "none"
        listing = "full scan" if self.full_scan else f"items updated since {self.updated_since:%Y-%m-%dT%H:%M:%SZ}"
        return [
            f"run {self.run_id}: {self.status}  ({self.wall_s:.1f} s)",
            f"  search   {listing}, {self.read_tasks} read tasks",
            f"  scenes   matched {self.scenes_matched}, skipped {self.scenes_skipped} (already committed), "
            f"processed {self.scenes_processed}, failed {self.scenes_failed}",
            f"  tiles    planned {self.tiles_planned} = written {self.tiles_written} + skipped "
            f"{self.tiles_skipped} + failed {self.tiles_failed}" + ("" if self.reconciles else "  (DOES NOT ADD UP)"),
            f"  detections {self.detections} ({labels})",
            f"  errors   {self.errors}",
            f"  model    {self.model_actors} actors, {self.model_loads} model loads, {self.units_committed} units "
            f"committed, {self.files_folded} table files folded",
            f"  speed    {self.tiles_per_s:.2f} tiles/s",
            f"  outputs  {self.output_root}",
        ]


# ----------------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _catalog_url(config: InferConfig) -> Iterator[str]:
    if config.catalog.url:
        yield config.catalog.url
        return
    from pipelines.embedded import serve_stac

    embedded = config.catalog.embedded
    assert embedded is not None  # the config allows exactly one of url / embedded
    with serve_stac(embedded.collections, embedded.items) as url:
        yield url


def _start_ray(config: InferConfig) -> bool:
    import os

    import ray
    import ray.data

    # Ray Data logs each execution at INFO and warns that its progress bars are off: the job prints its own lines
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    from pipelines.raylocal import init_ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False,
                              "num_cpus": config.ray.num_cpus}
    if config.ray.object_store_mb:
        kwargs["object_store_memory"] = config.ray.object_store_mb * 2**20
    started = init_ray(config.ray.address or os.environ.get("RAY_ADDRESS"), **kwargs)  # local: 127.0.0.1 only
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress lines
    ctx.print_on_execution_start = False
    return started


def _redacted(config: InferConfig) -> str:
    data = config.model_dump(mode="json")
    data["output"]["storage_options"] = dict.fromkeys(data["output"]["storage_options"], "***")
    data["model"]["storage_options"] = dict.fromkeys(data["model"]["storage_options"], "***")
    return redact_text(json.dumps(data, sort_keys=True))  # URLs (a catalog's API key in its query) and secrets


def check_inputs(config: InferConfig) -> None:
    """Refuse a config whose local inputs are missing, before any work (naming the field).

    Raises:
        ConfigError: For a model that is neither a preset, a saved model folder nor a URL, or a missing embedded
            catalog file.
    """
    from pathlib import Path

    from earthgpt.weights import is_remote

    name = config.model.name_or_path
    folder = Path(name)
    if is_remote(name):
        pass  # checked when the output key hashes it (a missing remote folder fails there, before any work)
    elif folder.exists():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {name} has no config.json (not a save_pretrained folder)")
    else:
        from earthgpt.presets import PRESETS

        if name.removeprefix("earthgpt_").removeprefix("earthgpt-") not in PRESETS:
            raise ConfigError(f"model.name_or_path: no folder {name!r} and no preset of that name "
                              f"(presets: {', '.join(PRESETS)})")
    embedded = config.catalog.embedded
    if embedded is None:
        return
    for i, path in enumerate(embedded.collections):
        if not path.is_file():
            raise ConfigError(f"catalog.embedded.collections.{i}: no such file: {path}")
    if not embedded.items.is_file():
        raise ConfigError(f"catalog.embedded.items: no such file: {embedded.items}")


def _state_name(output_key: str, spec: SearchSpec) -> str:
    """The state document of one (output key, search): its watermark and the scenes to retry."""
    return f"{output_key}-{hashlib.sha256(spec.fingerprint().encode()).hexdigest()[:12]}"


def _retry_windows(keys: Sequence[str]) -> list[Window]:
    by_collection: dict[str, list[str]] = {}
    for key in keys:
        collection, _, item_id = key.partition("/")
        by_collection.setdefault(collection, []).append(item_id)
    windows = []
    for collection, ids in sorted(by_collection.items()):
        for k in range(0, len(ids), RETRY_IDS_PER_TASK):
            windows.append(Window(ids=tuple(ids[k : k + RETRY_IDS_PER_TASK]), collection=collection))
    return windows


def _failure_line(summary: Mapping[str, Any]) -> str:
    first = summary.get("first_error") or {}
    return (f"FAILED ({first.get('error_type')} at {first.get('stage')}: {str(first.get('message'))[:120]}); "
            "retried next run")


# ------------------------------------------------------------------------------------------------- commit units


def _assemble_task(rows: list[dict[str, Any]], settings: AssemblySettings) -> tuple[dict[str, Any], SceneResult]:
    result = assemble_scene(rows, settings)
    return result.summary(), result


def stage_unit(
    root: str,
    storage_options: Mapping[str, Any],
    unit_id: str,
    staging_dir: str,
    output_key: str,
    *results: SceneResult,
    retried: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Write one unit's files under its staging folder: table rows, rewritten copies of superseded files, and the
    Zarr group of each committed scene. Runs in a Ray task; returns only paths and ids (the driver commits).

    Args:
        root: Output root.
        storage_options: Its fsspec options.
        unit_id: The unit (names the files; stamped on every row).
        staging_dir: Where to stage.
        output_key: The config's output key.
        *results: The unit's finished scenes.
        retried: Keys of scenes that failed in earlier runs: their old ``errors`` rows are replaced by this
            attempt's (the ``errors`` table holds each scene's latest attempt).

    Returns:
        ``publish`` (staged, final) pairs, ``delete`` paths, and the committed ``scenes``.
    """
    store = OutputStore(root, storage_options)
    ok = [r for r in results if r.committed]
    for r in results:
        for rec, _ in (*r.tile_rows, *r.detection_rows, *r.error_rows):
            rec["unit_id"] = unit_id
        if r.scene_row is not None:
            r.scene_row["unit_id"] = unit_id
        if r.grid is not None:
            r.grid.attrs["unit_id"] = unit_id
    superseded: dict[tuple[str, str], list[str]] = {}
    for r in ok:
        prev_date = r.meta.get("prev_date")
        if prev_date:
            superseded.setdefault((r.collection, str(prev_date)), []).append(r.scene_id)
    publish: list[StagedFile] = []
    delete: list[str] = []
    if superseded:
        publish, delete = rewrite_without(store, staging_dir, unit_id, ("scenes", "tiles", "detections"),
                                          superseded, output_key)
    old_errors: dict[tuple[str, str], set[str]] = {}
    for r in results:
        for date in {str(r.meta.get("prev_date") or ""), r.date} if r.key in retried else ():
            if date:
                old_errors.setdefault((r.collection, date), set()).add(r.scene_id)
    for r in ok:  # a superseded version's errors go with its rows
        if r.meta.get("prev_date"):
            old_errors.setdefault((r.collection, str(r.meta["prev_date"])), set()).add(r.scene_id)
    if old_errors:
        more, gone = rewrite_without(store, staging_dir, unit_id, ("errors",), old_errors, output_key)
        publish += more
        delete += gone
    publish += stage_table(store, staging_dir, "scenes", unit_id,
                           [(r.collection, r.date, r.scene_row, _geometry(r)) for r in ok if r.scene_row])
    publish += stage_table(store, staging_dir, "tiles", unit_id,
                           [(r.collection, r.date, rec, g) for r in ok for rec, g in r.tile_rows])
    publish += stage_table(store, staging_dir, "detections", unit_id,
                           [(r.collection, r.date, rec, g) for r in ok for rec, g in r.detection_rows])
    publish += stage_table(store, staging_dir, "errors", unit_id,
                           [(r.collection, r.date, rec, g) for r in results for rec, g in r.error_rows])
    parents: set[str] = set()  # the group nodes above a scene's, written once per collection
    for r in ok:
        if r.grid is None:
            continue
        if r.collection not in parents:
            ensure_parent_groups(store, embeddings_group(output_key, r.collection, r.scene_id))
            parents.add(r.collection)
        for rel in write_scene_grid(store, r.grid, under=staging_dir):
            publish.append(StagedFile(staged=f"{staging_dir}/{rel}", final=rel))
    return {
        "publish": [(f.staged, f.final) for f in publish],
        "delete": delete,
        "scenes": [(r.collection, r.scene_id, r.date, r.updated) for r in ok],
    }


def _geometry(r: SceneResult) -> Any:
    geometry = r.meta.get("geometry")
    return shapely.geometry.shape(geometry) if geometry else None


@dataclass
class _Unit:
    unit_id: str
    parts: list[tuple[Any, Any]] = field(default_factory=list)  # (summary ref, result ref) per scene
    tiles: int = 0
    opened: float = field(default_factory=time.monotonic)
    stage_ref: Any = None
    merged: int = 0  # closed units folded into this one while it waited (see _merge_waiting)


_MERGE_FACTOR = 16
"""Closed units that waited are merged up to this many times ``commit_tiles`` (or, without a tile limit, the oldest
unit's tiles): what one stage task holds."""

_MERGE_SCENES = 4096
"""... and up to this many scenes: a unit's record lists every staged file in its Parquet footer, which readers refuse
past 100 MB (a Zarr group is 16 files; 16 x 2048 one-tile scenes would list ~120 MB)."""


class UnitIds:
    """A run's unit ids in commit order, ``<run_id>-u00000``, ``-u00001``, ... (scene and fold units alike)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.run_id}-u{self.count - 1:05d}"


def _merge_waiting(closed: collections.deque[_Unit], commit_tiles: int | None) -> _Unit:
    """The next unit to stage: the oldest closed one, with the closed units that queued behind it folded in while
    their tiles stay within :data:`_MERGE_FACTOR` times ``commit_tiles`` (None: times the oldest unit's tiles) and
    their scenes within :data:`_MERGE_SCENES`.

    Units close at the model's pace but stage and commit one at a time. When a cluster finishes units faster than
    the output store commits them (100 GPU actors at 20 tiles/s close a 2048-tile unit every second; one commit on
    S3 takes a second or more, benchmarks/publish.py), the waiting line would grow for the whole run, every waiting
    unit holding its results in the object store, and a night would leave tens of thousands of small files. Merged,
    the units grow to what the store can commit, and a unit that keeps pace is left as it is. A scene is in one unit
    of a run only, so merging never puts two versions of a scene in one unit.
    """
    unit = closed.popleft()
    limit = _MERGE_FACTOR * (commit_tiles or unit.tiles)
    while (
        closed
        and unit.tiles + closed[0].tiles <= limit
        and len(unit.parts) + len(closed[0].parts) <= _MERGE_SCENES
    ):
        later = closed.popleft()
        unit.parts.extend(later.parts)
        unit.tiles += later.tiles
        unit.merged += 1  # a unit still waiting was never merged into
    return unit


class UnitCommitter:
    """Groups finished scenes into commit units and commits them without stopping the model.

    A scene's rows go to an assembly task the moment the scene completes; the unit it joins closes when it holds
    ``commit_tiles`` tiles or is ``commit_seconds`` old. A closed unit is staged by a Ray task; when the stage task
    is done the driver writes the ledger record and publishes. One unit stages at a time (a unit that rewrites a
    superseded scene's files must see the previous unit's published state); more closed units wait, as object
    references, while the model works on, and are merged into one when their turn comes (:func:`_merge_waiting`).

    Args:
        config: The job config.
        store: The output root.
        ledger: Its ledger.
        run_id: This run.
        settings: Assembly settings.
        summary: Counted into as units commit.
        say: Progress lines.
    """

    def __init__(self, config: InferConfig, store: OutputStore, ledger: Ledger, run_id: str,
                 settings: AssemblySettings, summary: RunSummary, say: Printer,
                 unit_ids: Callable[[], str] | None = None) -> None:
        import ray

        self._ray = ray
        self._assemble = ray.remote(num_returns=2, num_cpus=config.actors.read_num_cpus)(_assemble_task)
        self._stage = ray.remote(num_cpus=config.actors.read_num_cpus, max_retries=2)(stage_unit)
        self.config = config
        self.store = store
        self.ledger = ledger
        self.run_id = run_id
        self.settings = settings
        self.summary = summary
        self.say = say
        self.output_key = dict(settings.ids)["output_key"]
        self.open: _Unit | None = None
        self.closed: collections.deque[_Unit] = collections.deque()
        self.staging: _Unit | None = None
        self.failed_keys: set[str] = set()
        self.failed_info: dict[str, dict[str, Any]] = {}  # key -> updated, first error (for the quarantine)
        self.retried: frozenset[str] = frozenset()  # scenes that failed before (their old errors rows go)
        # Scenes the state document tracks (retry list, attempts, quarantine): only their successes are kept, as
        # `committed_keys`, for the next state. Every committed key of a first pass over 10^7 scenes would hold
        # about 1.5 GB of the driver's memory (150 MB per million keys of Sentinel-2 length, measured).
        self.watched: frozenset[str] = frozenset()
        self.committed_keys: set[str] = set()
        self.scenes_done = 0
        self._unit_ids = unit_ids or UnitIds(run_id)
        self.touched: set[str] = set()  # partition folders the run's units published table files into

    def add_scene(self, rows: list[dict[str, Any]]) -> None:
        """Send a complete scene to assembly and add it to the open unit."""
        refs: Any = self._assemble.remote(rows, self.settings)  # two object refs (num_returns=2)
        summary_ref, result_ref = refs
        if self.open is None:
            self.open = _Unit(unit_id=self.new_unit_id())
        self.open.parts.append((summary_ref, result_ref))
        self.open.tiles += max(1, int(rows[0]["n_planned"]))
        self.poll()

    def poll(self, block: bool = False) -> None:
        """Close the open unit when it is full or old; start staging; commit what finished staging."""
        out = self.config.output
        unit = self.open
        if unit is not None and (
            (out.commit_tiles is not None and unit.tiles >= out.commit_tiles)
            or (out.commit_seconds is not None and time.monotonic() - unit.opened >= out.commit_seconds)
        ):
            self.closed.append(unit)
            self.open = None
        while True:
            if self.staging is not None:
                ready, _ = self._ray.wait([self.staging.stage_ref], timeout=None if block else 0)
                if not ready:
                    return
                self._commit(self.staging)
                self.staging = None
            if not self.closed:
                return
            unit = _merge_waiting(self.closed, out.commit_tiles)
            if unit.merged:
                self.say(f"unit {unit.unit_id} takes {unit.merged} more closed units that waited for the commit "
                         f"before it ({unit.tiles} tiles)")
            staging_dir = self.ledger.staging_dir(unit.unit_id)
            unit.stage_ref = self._stage.remote(self.store.url(), self.store.storage_options, unit.unit_id,
                                                staging_dir, self.output_key, *[r for _, r in unit.parts],
                                                retried=self.retried)
            self.staging = unit

    def new_unit_id(self) -> str:
        """The run's next unit id (units commit in this order)."""
        return self._unit_ids()

    def finish(self) -> None:
        """Close the last unit and commit everything."""
        if self.open is not None and self.open.parts:
            self.closed.append(self.open)
        self.open = None
        while self.staging is not None or self.closed:
            self.poll(block=True)

    def _commit(self, unit: _Unit) -> None:
        staged = self._ray.get(unit.stage_ref)
        summaries = self._ray.get([s for s, _ in unit.parts])
        record = UnitRecord(
            unit_id=unit.unit_id, run_id=self.run_id, output_key=self.output_key,
            scenes=[tuple(s) for s in staged["scenes"]],  # type: ignore[misc]
            publish=[StagedFile(staged=a, final=b) for a, b in staged["publish"]], delete=list(staged["delete"]),
        )
        self.ledger.commit(record)
        self.touched.update(posixpath.dirname(f.final) for f in record.publish if is_table_file(f.final))
        s = self.summary
        s.units_committed += 1
        for scene in summaries:
            self.scenes_done += 1
            s.tiles_planned += scene["tiles_planned"]
            s.tiles_written += scene["tiles_written"]
            s.tiles_skipped += scene["tiles_skipped"]
            s.tiles_failed += scene["tiles_failed"]
            s.detections += scene["detections"]
            s.errors += scene["errors"]
            s.detections_by_label.update(scene["labels"])
            if scene["committed"] and scene["tiles_failed"]:  # committed without its failed tiles: retried
                s.scenes_processed += 1
                self._failed(scene)
                line = (f"{scene['tiles_written']} tiles, {scene['tiles_skipped']} skipped, {scene['tiles_failed']} "
                        f"FAILED, {scene['detections']} detections; " + _failure_line(scene).split("; ")[0])
            elif scene["committed"]:
                s.scenes_processed += 1
                if scene["key"] in self.watched:
                    self.committed_keys.add(scene["key"])
                line = (f"{scene['tiles_written']} tiles, {scene['tiles_skipped']} skipped, "
                        f"{scene['detections']} detections")
            else:
                s.scenes_failed += 1
                self._failed(scene)
                line = _failure_line(scene)
            self.say(f"  [{self.scenes_done}] {scene['key']}: {line}")
        self.say(f"committed unit {unit.unit_id}: {len(summaries)} scenes, {unit.tiles} tiles")

    def _failed(self, scene: Mapping[str, Any]) -> None:
        first = scene.get("first_error") or {}
        self.failed_keys.add(scene["key"])
        self.failed_info[scene["key"]] = {"updated": scene.get("updated"), "error_type": first.get("error_type"),
                                          "message": first.get("message")}


# ----------------------------------------------------------------------------------------------------------- the job


def _dataset(config: InferConfig, spec: SearchSpec, windows: Sequence[Window], committed_ref: Any,
             policy: HrefPolicy, stats: Any, retry_after: datetime | None, model_stage: type,
             quarantined: Mapping[str, Any] | None = None) -> Any:
    import ray

    actors = config.actors
    num_gpus = actors.num_gpus
    if num_gpus is None:  # one GPU per model replica wherever the cluster has GPUs
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    read = ReadStage(config.tiling.size, config.tiling.overlap, config.tiling.min_valid_fraction,
                     tiles_per_block=actors.batch_size)
    parse = ParseStage(config.tasks)
    model_kwargs = {
        "model": config.model.name_or_path, "engine": config.model.engine, "dtype": config.model.dtype,
        "tp_size": config.model.tp_size, "kernel_inject": config.model.kernel_inject,
        "cuda_graphs": config.model.cuda_graphs, "tasks": config.tasks,
        "vqa": config.vqa, "max_new_tokens": config.model.max_new_tokens, "seed": config.model.seed,
        "torch_threads": max(1, int(actors.num_cpus)), "storage_options": config.model.storage_options,
    }
    # a stage whose input lacks a column fails here, naming it, not three stages into the run
    check_chain(SCENE_COLUMNS, [read, _ModelColumns(model_stage, config), parse])
    ds = ray.data.read_datasource(
        window_datasource(spec, windows, committed_ref, policy, stats, retry_after=retry_after,
                          quarantined=quarantined),
        override_num_blocks=len(windows), num_cpus=actors.read_num_cpus,
    )
    if config.catalog.max_items is not None:
        ds = ds.limit(config.catalog.max_items)
    # a read task's small scene rows arrive merged into one block; one scene per block makes one read task per
    # scene (scenes read in parallel, each one's tiles streaming to the model as soon as it is read)
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(read, batch_size=1, num_cpus=actors.read_num_cpus, batch_format="numpy")
    ds = ds.map_batches(
        model_stage, fn_constructor_kwargs=model_kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors),
        batch_size=actors.batch_size, num_cpus=actors.num_cpus, num_gpus=num_gpus or None, batch_format="numpy",
    )
    return ds.map_batches(parse, batch_size=actors.batch_size, num_cpus=actors.read_num_cpus,
                          batch_format="numpy")


class _ModelColumns:
    """The model stage's declared columns, without building a model (for :func:`check_chain`)."""

    def __init__(self, stage: type, config: InferConfig) -> None:
        self.needs = getattr(stage, "needs", ())
        tasks = list(config.tasks)
        self.adds = (*(c for t in tasks for c in (f"answer_{t}", f"logprob_{t}")), "vqa_json", "embedding",
                     "tokens_detect", "actor_id", "model_loads", "actor_ready_at", "batch_plan")


def _merged_plan(plans: Sequence[str]) -> str | None:
    """The model actors' batch plans as one JSON object: the smallest batches, the halvings summed over actors."""
    parsed: list[dict[str, Any]] = [json.loads(p) for p in plans if p]
    if not parsed:
        return None
    smallest = min(parsed, key=lambda p: (p.get("decode_batch") or 0, p.get("tile_batch") or 0))
    merged = dict(smallest)
    for key in ("oom_halvings", "tile_oom_halvings"):
        merged[key] = sum(int(p.get(key) or 0) for p in parsed)
    merged["actors"] = len(parsed)
    return json.dumps(merged)


def _finish_quiet(summary: RunSummary, counts: Mapping[str, Any]) -> None:
    summary.scenes_matched = int(counts["matched"])
    summary.scenes_skipped = int(counts["skipped"])
    summary.skip_reasons.update(counts["skip_reasons"])
    summary.read_tasks = 0
    summary.status = "ok"


def _fold_state_name(output_key: str) -> str:
    """The state document naming the runs of an output key whose fold is not done (see :func:`run`)."""
    return f"{output_key}-fold"


def _update_fold_state(ledger: Ledger, output_key: str, run_id: str, add: Sequence[str] = (),
                       remove: Sequence[str] = ()) -> None:
    """Name runs in (``add``) or take them out of (``remove``) the output key's fold state, from a fresh read and
    only while this run holds the output key's lease (a run that lost it changes nothing).

    Raises:
        LeaseLost: The run no longer holds the lease.
    """
    name = _fold_state_name(output_key)
    state = ledger.read_state(name)
    runs = {str(r) for r in (state or {}).get("runs") or []}
    new = sorted((runs | set(add)) - set(remove))
    if state is not None and new == sorted(runs):
        return
    if ledger.lease is not None:
        ledger.lease.check()
    ledger.write_state(name, {"runs": new, "output_key": output_key, "run_id": run_id})


def _fold(store: OutputStore, ledger: Ledger, folders: Sequence[str], runs: Sequence[str], output_key: str,
          fold_bytes: int, unit_ids: Callable[[], str], summary: RunSummary, say: Printer) -> bool:
    """Fold the table files that units of ``runs`` published in ``folders`` into fewer, larger ones, as units of
    this run (:mod:`pipelines.archive.fold`). A fold that fails before its record leaves them as committed; one that
    fails after it is finished by the next run of the output key (until then readers may see some rows twice), and
    the run says so.

    Returns:
        Whether the fold finished (every file it meant to fold is folded, or there was none).
    """
    if not folders:
        return True
    earlier = [r for r in runs if r != summary.run_id]
    whose = (f"of earlier run{'s' if len(earlier) > 1 else ''} {', '.join(earlier)} (ended before their fold)"
             if earlier else "the run's")
    t0 = time.perf_counter()
    report = FoldReport()
    done = False
    try:
        fold_run(store, ledger, sorted(folders), summary.run_id, output_key, fold_bytes, unit_ids, report=report,
                 runs=runs)
        done = True
    except LeaseLost:
        raise
    except FoldPublishFailed as exc:
        log.exception("a fold unit's publish failed")
        report.files_in += exc.files_in  # committed: its publish is finished by recovery
        summary.message = redact_text(f"{exc}; recovery finishes it (until then readers may see some rows twice)")
        say(summary.message)
    except Exception as exc:
        log.exception("could not fold %s table files", whose)
        say(f"could not fold {whose} table files ({type(exc).__name__}: {redact_text(str(exc))}); those not "
            "folded yet stay as committed, and the next run of this output key folds them")
    summary.files_folded += report.files_in
    if report.files_in:
        say(f"folded {report.files_in} table files {whose} ({report.bytes_in / 2**20:.1f} MiB) into "
            f"{report.files_out}: unit{'s' if len(report.units) > 1 else ''} {', '.join(report.units)}, "
            f"{time.perf_counter() - t0:.1f} s")
    return done


def _fold_leftovers(store: OutputStore, ledger: Ledger, config: InferConfig, unit_ids: UnitIds,
                    summary: RunSummary, say: Printer) -> list[str]:
    """Fold the files of earlier runs of the output key that ended before their fold (killed, failed, interrupted).

    Each run that commits units names itself in the output key's fold state before its first commit and leaves it
    once its fold is done, so the runs still named there (this run holds the lease: they are over) may have
    committed files that were never folded. Their partition folders come from the ledger's entries (one read of
    the output key's index, only when such a run exists).

    Returns:
        The runs whose fold is still not done (all of them if folding is off or failed again).

    Raises:
        StagedFileMissing, OSError...: A fold unit that may be committed could not be published, nor finished by
            recovery: the run stops before it commits anything (a unit's copy-on-write must see every published
            file).
    """
    output_key = config.output_key()
    state = ledger.read_state(_fold_state_name(output_key)) or {}
    pending = sorted({str(r) for r in state.get("runs") or []} - {summary.run_id})
    if not pending or config.output.fold_bytes is None:
        return pending
    folders = folders_of_runs(ledger.committed_table(output_key), pending)
    # a run's errors files of failed scenes are in no ledger entry: the errors table is listed (a small table)
    folders |= {posixpath.dirname(p) for p in store.glob("errors/**/*.parquet")
                if (unit := part_unit(p)) is not None and run_of(unit) in pending}
    for attempt in (0, 1):
        if _fold(store, ledger, sorted(folders), pending, output_key, config.output.fold_bytes, unit_ids, summary,
                 say):
            _fold_state_done(ledger, output_key, summary.run_id, pending)
            return []
        # a fold unit of this run may be committed and not published: finish it (or undo it) now, before this
        # run's units rewrite a file it replaces; then fold what is left once more
        if ledger.lease is not None:
            ledger.lease.check()
        again = ledger.recover()
        if again.rolled_forward or again.rolled_back:
            say(f"recovery finished the fold's units {again.rolled_forward}, discarded {again.rolled_back}")
            if again.rolled_forward:
                summary.message = ""
        if attempt or not again.rolled_forward:
            break
    return pending


def _fold_state_done(ledger: Ledger, output_key: str, run_id: str, runs: Sequence[str]) -> None:
    """Take folded runs out of the fold state; a failure only leaves them named (the next run finds nothing left
    to fold), it does not fail the run."""
    try:
        _update_fold_state(ledger, output_key, run_id, remove=runs)
    except LeaseLost:
        raise
    except Exception:
        log.exception("could not update the fold state of output key %s", output_key)


def _write_run_row(store: OutputStore, config: InferConfig, summary: RunSummary, started: datetime) -> None:
    finished = datetime.now(timezone.utc)
    record = {
        "run_id": summary.run_id, "status": summary.status, "started_at": started, "finished_at": finished,
        "output_key": config.output_key(), "model": redact_url(config.model.name_or_path),
        "engine": config.model.engine,
        "tasks": list(config.tasks), "collections": list(config.catalog.collections), "config": _redacted(config),
        "scenes_matched": summary.scenes_matched, "scenes_skipped": summary.scenes_skipped,
        "scenes_processed": summary.scenes_processed, "scenes_failed": summary.scenes_failed,
        "tiles_planned": summary.tiles_planned, "tiles_written": summary.tiles_written,
        "tiles_skipped": summary.tiles_skipped, "tiles_failed": summary.tiles_failed,
        "detections": summary.detections, "errors": summary.errors, "units_committed": summary.units_committed,
        "files_folded": summary.files_folded,
        "wall_s": summary.wall_s, "tiles_per_s": summary.tiles_per_s, "full_scan": summary.full_scan,
        "updated_since": summary.updated_since, "watermark": summary.watermark, "read_tasks": summary.read_tasks,
        "startup_s": summary.startup_s,
        "model_actors": summary.model_actors, "model_loads": summary.model_loads, "batch_plan": summary.batch_plan,
    }
    aoi = None
    if config.catalog.bbox is not None:
        w, s, e, n = config.catalog.bbox
        aoi = shapely.box(w, s, e, n) if w <= e else shapely.MultiPolygon(
            [shapely.box(w, s, 180.0, n), shapely.box(-180.0, s, e, n)])
    elif config.catalog.intersects is not None:
        aoi = shapely.geometry.shape(config.catalog.intersects)
    path = f"{partition_dir('runs', None, started.strftime('%Y-%m-%d'))}/run-{summary.run_id}.parquet"
    store.write_bytes(path, geoparquet_bytes(build_frame("runs", [record], [aoi])))


def run(config: InferConfig, *, say: Printer = print, model_stage: type = ModelStage,
        full_scan: bool = False, retry_quarantined: bool = False, wait_lease: float = 0.0,
        break_lease: bool = False) -> RunSummary:
    """Run the archive inference job.

    Args:
        config: The validated job config.
        say: Where progress lines go (``print`` by default).
        model_stage: The model stage's callable class; it is built with :class:`~pipelines.archive.stages.ModelStage`'s
            keyword arguments and must add the same columns (another engine, or a perfect "oracle" in tests).
        full_scan: List the whole search (a reconcile) even when an earlier run left a watermark.
        retry_quarantined: Try the quarantined scenes again (they are skipped otherwise until their item changes).
        wait_lease: Seconds to wait for another run of the same output key to finish (0: refuse at once).
        break_lease: Take the output key's lease even from a run that looks alive (one known to be gone).

    Returns:
        The run's summary (also written as its ``runs`` row).

    Raises:
        LeaseHeld: Another run holds the output key's lease; this run wrote nothing.
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)

    # 1. set up: GDAL once, the output root, the output key and its lease, recovery, the search's state
    configure_gdal()
    store = OutputStore(config.output.root, config.output.storage_options)
    output_key = config.output_key()
    summary = RunSummary(run_id=new_run_id(), output_root=store.url())
    lease = Lease(store, output_key, run_id=summary.run_id, ttl_s=config.output.lease_seconds)
    previous = lease.acquire(wait_s=wait_lease, force=break_lease, say=say)  # LeaseHeld: nothing written
    if previous is not None and previous.released_at is None:
        say(f"took over the lease of output key {output_key} from {previous.describe()}: "
            + ("broken with --break-lease" if break_lease and previous.dead_reason() is None
               else str(previous.dead_reason())))
    lease.start_heartbeat()
    ledger = Ledger(store, lease)
    policy = HrefPolicy.for_roots(*config.catalog.asset_prefixes) if config.catalog.asset_prefixes else HrefPolicy()
    started_ray = False

    try:
        recovery = ledger.recover()
        if recovery.rolled_forward or recovery.rolled_back:
            say(f"recovered a crashed run: published units {recovery.rolled_forward}, "
                f"discarded unfinished units {recovery.rolled_back}")
        if recovery.left_live or recovery.left_other_key:
            say(f"left alone: {len(recovery.left_live)} staged units of runs still holding their lease, "
                f"{len(recovery.left_other_key)} committed units of other output keys")
        unit_ids = UnitIds(summary.run_id)  # scene units and fold units share the run's numbering
        _fold_leftovers(store, ledger, config, unit_ids, summary, say)  # those it could not fold stay named
        with _catalog_url(config) as url:
            cat = config.catalog
            source_id = url if cat.embedded is None else f"embedded:{cat.embedded.items.resolve()}"
            spec = SearchSpec(url=url, collections=tuple(cat.collections), bbox=cat.bbox, intersects=cat.intersects,
                              datetime=cat.datetime, filter=cat.filter, page_size=cat.page_size,
                              source_id=source_id)
            state_name = _state_name(output_key, spec)
            state = None if (full_scan or not cat.incremental) else ledger.read_state(state_name)
            watermark = parse_time(state.get("watermark")) if state else None
            retry = list(state.get("retry", [])) if state else []
            # the quarantine outlives --full-scan: it is read even when the watermark is not
            held = ledger.read_state(state_name) if cat.incremental else None
            quarantined: dict[str, Any] = dict((held or {}).get("quarantined") or {})
            if retry_quarantined and quarantined:
                retry = sorted(set(retry) | set(quarantined))
                say(f"retrying {len(quarantined)} quarantined scenes")
                quarantined = {}
            elif quarantined:
                say(f"{len(quarantined)} scenes quarantined (failed {config.output.max_attempts} runs in a row); "
                    "skipped until their item is updated, or run with --retry-quarantined")
            if watermark is not None:
                spec = SearchSpec(**{**spec.__dict__, "updated_since": watermark})
            summary.full_scan = watermark is None
            summary.updated_since = watermark
            say(f"run {summary.run_id}: model {redact_url(config.model.name_or_path)} ({config.model.engine}, "
                f"{config.model.dtype}), tasks {', '.join(config.tasks)}; output key {output_key} under "
                f"{store.url()}")

            # 2. plan the source: disjoint windows of the search (+ the scenes to retry), no listing here
            from catalogs.search import open_client

            client = open_client(url)  # the driver's few requests share one client (the read tasks open their own)
            plan = plan_windows(spec, cat.items_per_task, cat.max_read_tasks, client=client)
            windows = list(plan.windows) + (_retry_windows(retry) if watermark is not None else [])
            summary.read_tasks = len(windows)
            listing = ("full listing" if watermark is None
                       else f"items updated since {watermark:%Y-%m-%dT%H:%M:%SZ} (use --full-scan to reconcile)")
            say(f"search: {listing}; {plan.matched if plan.matched is not None else 'unknown'} items match, "
                f"{len(plan.windows)} read tasks" + (f", {len(windows) - len(plan.windows)} retry tasks for "
                                                     f"{len(retry)} failed scenes" if len(windows) > len(plan.windows)
                                                     else "") + "".join(f"; {n}" for n in plan.notes))

            # a quiet night: a page at most, all committed -> no Ray, no model, just the bookkeeping
            if (len(windows) == len(plan.windows) == 1 and cat.max_items is None
                    and (plan.matched is None or plan.matched <= cat.page_size)):
                # only the listed items' ledger entries are read (row groups of the sorted ledger), not the index
                quick = small_search_counts(spec, lambda ids, dates: ledger.committed_entries(output_key, ids, dates),
                                            policy, client=client, quarantined=quarantined)
                if quick is not None and quick["rows"] == 0:
                    say(f"nothing to do: {quick['matched']} items listed, all committed")
                    _finish_quiet(summary, quick)
                    if summary.scenes_skipped:
                        reasons = "; ".join(f"{n} {why}" for why, n in summary.skip_reasons.items())
                        say(f"skipped {summary.scenes_skipped} scenes: {reasons}")
                    new_mark = max((t for t in (watermark, quick["max_updated"]) if t is not None), default=None)
                    summary.watermark = new_mark
                    if cat.incremental:
                        ledger.write_state(state_name, {"watermark": new_mark, "retry": [], "run_id": summary.run_id,
                                                        "output_key": output_key,
                                                        "search": redact_text(spec.fingerprint()),
                                                        "attempts": (held or {}).get("attempts") or {},
                                                        "quarantined": (held or {}).get("quarantined") or {}})
                    return summary

            # 3. one streaming execution: read → tiles → model actors → parse → collect → assemble → commit
            committed = ledger.committed_table(output_key)
            say(f"{committed.num_rows} scenes already committed under output key {output_key}")
            started_ray = _start_ray(config)
            import ray

            stats = ray.remote(SourceStats).options(num_cpus=0).remote()
            committed_ref = ray.put(committed) if committed.num_rows else None
            del committed  # the object store holds it for the read tasks; no second copy in the driver
            settings = AssemblySettings(
                tasks=tuple(config.tasks), vqa=tuple(config.vqa), nms_iou=config.detection.nms_iou,
                containment=config.detection.containment,
                ids=(("run_id", summary.run_id), ("unit_id", ""), ("output_key", output_key)),
                model=config.model.name_or_path, tile_size=config.tiling.size,
            )
            if config.output.fold_bytes is not None:
                # named before the first commit, left once folded: a run that ends before its fold is folded later
                _update_fold_state(ledger, output_key, summary.run_id, add=[summary.run_id])
            committer = UnitCommitter(config, store, ledger, summary.run_id, settings, summary, say,
                                      unit_ids=unit_ids)
            committer.retried = frozenset((held or {}).get("attempts") or {}) | frozenset(retry)
            committer.watched = committer.retried | frozenset((held or {}).get("quarantined") or {})
            collector = SceneCollector()
            actors: dict[str, int] = {}
            plans: dict[str, str] = {}
            ds = _dataset(config, spec, windows, committed_ref, policy, stats, watermark, model_stage,
                          quarantined=quarantined)
            t_exec = t_said = time.perf_counter()
            tiles_seen = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                tiles_seen += len(batch["scene_key"])
                for actor, loads in zip(batch.get("actor_id", ()), batch.get("model_loads", ()), strict=False):
                    if str(actor):
                        actors[str(actor)] = max(actors.get(str(actor), 0), int(loads))
                for actor, plan in zip(batch.get("actor_id", ()), batch.get("batch_plan", ()), strict=False):
                    plans[str(actor)] = str(plan)  # each actor's latest plan
                if "actor_ready_at" in batch and len(batch["actor_ready_at"]):
                    # start-up: planning, the pool's start, the first model load (once per run)
                    ready = float(np.min(batch["actor_ready_at"])) - started.timestamp()
                    summary.startup_s = ready if summary.startup_s is None else min(summary.startup_s, ready)
                for _key, rows in collector.add(batch):
                    committer.add_scene(rows)
                committer.poll()
                if time.perf_counter() - t_said > HEARTBEAT_S:  # big archives take hours: show the tiles moving
                    t_said = time.perf_counter()
                    say(f"  ... {tiles_seen} tiles through the model ({tiles_seen / (t_said - t_exec):.1f} tiles/s), "
                        f"{summary.units_committed} units committed")
            if collector.pending:
                raise RuntimeError(f"scenes with missing tile rows after the execution: {collector.pending[:10]}")
            committer.finish()
            source: dict[str, Any] = ray.get(stats.summary.remote())  # type: ignore[attr-defined,assignment]
            if config.output.fold_bytes is not None and _fold(
                    store, ledger, sorted(committer.touched), [summary.run_id], output_key, config.output.fold_bytes,
                    unit_ids, summary, say):
                _fold_state_done(ledger, output_key, summary.run_id, [summary.run_id])

        # 4. finish: counts, the next watermark and retry list
        summary.model_actors = len(actors)
        summary.model_loads = sum(actors.values())
        summary.batch_plan = _merged_plan(list(plans.values()))
        summary.scenes_matched = int(source["matched"])
        summary.scenes_skipped = int(source["skipped"])
        summary.skip_reasons.update(source["skip_reasons"])
        if summary.scenes_skipped:
            reasons = "; ".join(f"{n} {why}" for why, n in summary.skip_reasons.items())
            say(f"skipped {summary.scenes_skipped} scenes: {reasons}")
        summary.status = "ok" if summary.scenes_failed == 0 else "ok_with_errors"
        new_mark = max((t for t in (watermark, source["max_updated"]) if t is not None), default=None)
        summary.watermark = new_mark
        if cat.incremental and cat.max_items is None:  # a truncated listing must not move the watermark
            still, attempts, now_held = settle_retries(
                held, retry, source["seen_retry"], committer.failed_info, committer.committed_keys,
                max_attempts=config.output.max_attempts, run_id=summary.run_id,
                searched=retry if watermark is not None else (),  # retry tasks run only after a watermark
            )
            for key in sorted(k for k, v in now_held.items() if v.get("run_id") == summary.run_id):
                say(f"  quarantined {key}: failed {now_held[key]['attempts']} runs in a row "
                    f"({now_held[key]['error_type']})")
            ledger.write_state(state_name, {"watermark": new_mark, "retry": still, "run_id": summary.run_id,
                                            "output_key": output_key, "search": redact_text(spec.fingerprint()),
                                            "attempts": attempts, "quarantined": now_held})
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    except Exception as exc:
        summary.status = "failed"
        summary.message = redact_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        # 5. the runs row, whatever happened (a killed process writes none: its units say what it did)
        summary.wall_s = time.perf_counter() - t0
        try:
            _write_run_row(store, config, summary, started)
        except Exception:  # never mask the run's own exception
            log.exception("could not write the runs row")
        try:
            ledger.compact()
        except Exception:  # the next run compacts (a concurrent compaction of another output key, say)
            log.exception("could not compact the ledger")
        if started_ray:  # a Ray instance this job started ends with it (an attached cluster stays)
            import ray

            ray.shutdown()
        try:
            lease.release()
        except Exception:  # it lapses by itself at its expiry
            log.exception("could not release the lease of output key %s", output_key)
    return summary


# --------------------------------------------------------------------------------------------------------------- CLI


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earthgpt run",
        description="Caption and detect objects in every tile of the scenes a STAC search matches; results go to "
        "GeoParquet tables and a Zarr store under the output root. Reruns process only new or updated scenes.",
    )
    parser.add_argument("config", help="job config (YAML), see configs/infer/")
    parser.add_argument("--output-root", help="override output.root")
    parser.add_argument("--max-items", type=int, help="override catalog.max_items")
    parser.add_argument("--full-scan", action="store_true",
                        help="list the whole search, not only items updated since the last run (a reconcile)")
    parser.add_argument("--retry-quarantined", action="store_true",
                        help="try again the scenes quarantined after failing output.max_attempts runs in a row")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--wait-lease", type=float, default=0.0, metavar="SECONDS",
                        help="when another run of the same output key holds its lease, wait up to this long for it "
                        "(default 0: exit at once with code 75, naming the holder)")
    parser.add_argument("--break-lease", action="store_true",
                        help="take the output key's lease even from a run that looks alive; only for a run known to "
                        "be gone (its machine lost), whose lease would otherwise lapse by itself")
    return parser


def cli(argv: list[str] | None = None, *, model_stage: type = ModelStage) -> int:
    """``earthgpt run CONFIG``: validate the config (refusing it before any work), run the job, print a summary.

    Args:
        argv: Command-line arguments.
        model_stage: The model stage (see :func:`run`).

    Returns:
        0 when the run finished (bad scenes are recorded as ``errors`` rows, not failures of the run), 2 for an
        invalid config, 1 when the run itself failed, 75 when another run holds the output key's lease (nothing
        was written; see ``--wait-lease`` and ``--break-lease``).
    """
    args = _arg_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.output_root:
        overrides["output.root"] = args.output_root
    if args.max_items is not None:
        overrides["catalog.max_items"] = args.max_items
    try:
        config = load_config(args.config, overrides)
        check_inputs(config)
    except ConfigError as exc:
        print(f"earthgpt run: invalid config {args.config}:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    say: Printer = (lambda _line: None) if args.quiet else (lambda line: print(line, flush=True))
    try:
        summary = run(config, say=say, full_scan=args.full_scan, model_stage=model_stage,
                      retry_quarantined=args.retry_quarantined, wait_lease=args.wait_lease,
                      break_lease=args.break_lease)
    except LeaseHeld as exc:
        print(f"earthgpt run: not started: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_LEASE_HELD
    except Exception as exc:
        print(f"earthgpt run: failed: {redact_text(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
