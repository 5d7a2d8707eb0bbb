"""The archive inference job: STAC scenes → tiles → EarthGPT actors → GeoParquet tables + Zarr arrays, incremental.

Read it top to bottom; :func:`run` is the whole job:

1. **Set up**: GDAL cloud settings (once, here), the output root, the ledger (finish or undo what a crashed run
   left), the committed-scene index for this config's output key.
2. **Search** the STAC API lazily (a local ``rustac serve`` for ``catalog.embedded``); skip scenes already committed
   with the same or a newer ``updated`` (printed with the reason); group the rest into waves of ``wave_size``.
3. **Per wave**, one streaming Ray Data pipeline: :class:`~pipelines.stages.ReadStage` (CPU tasks) →
   :class:`~pipelines.stages.ModelStage` (actor pool, GPUs when configured) → :class:`~pipelines.stages.ParseStage`
   (CPU tasks) → the driver's :class:`~pipelines.stages.SceneAssembler` (cross-tile NMS per scene). Each finished
   scene's tile grid goes to Zarr at once; the wave's rows are staged and committed as one unit by the ledger.
4. **Finish**: one ``runs`` row (counts reconcile: planned = written + skipped + failed), ledger compaction.

Entry points: ``earthgpt run CONFIG`` and ``python -m pipelines.infer CONFIG`` (what a Ray job submits).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import shapely

from catalogs.errors import SceneError
from catalogs.hrefs import HrefPolicy
from catalogs.io import configure_gdal
from catalogs.scene import Scene
from catalogs.search import search_items
from pipelines.config import ConfigError, InferConfig, load_config
from pipelines.ledger import CommittedScene, Ledger, UnitRecord, new_run_id, rewrite_without, skip_reason
from pipelines.sinks import (
    OutputStore,
    build_frame,
    geoparquet_bytes,
    partition_dir,
    stage_table,
    write_scene_grid,
)
from pipelines.stages import (
    ModelStage,
    ParseStage,
    ReadStage,
    SceneAssembler,
    SceneGeo,
    SceneResult,
    scene_key,
)

log = logging.getLogger(__name__)

Printer = Callable[[str], None]
HEARTBEAT_S = 15.0  # seconds between progress lines while a wave's scenes are still in flight


@dataclass
class SceneFailure:
    """An item that could not even become a scene (missing asset, href refused, no recipe...)."""

    item: dict[str, Any]
    error: SceneError


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
    wall_s: float = 0.0
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
        return [
            f"run {self.run_id}: {self.status}  ({self.wall_s:.1f} s)",
            f"  scenes   matched {self.scenes_matched}, skipped {self.scenes_skipped} (already committed), "
            f"processed {self.scenes_processed}, failed {self.scenes_failed}",
            f"  tiles    planned {self.tiles_planned} = written {self.tiles_written} + skipped "
            f"{self.tiles_skipped} + failed {self.tiles_failed}" + ("" if self.reconciles else "  (DOES NOT ADD UP)"),
            f"  detections {self.detections} ({labels})",
            f"  errors   {self.errors}",
            f"  speed    {self.tiles_per_s:.2f} tiles/s",
            f"  outputs  {self.output_root}",
        ]


# ----------------------------------------------------------------------------------------------------------- helpers


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _item_time(item: Mapping[str, Any]) -> datetime | None:
    props = item.get("properties") or {}
    return _parse_time(props.get("datetime") or props.get("start_datetime"))


def _date(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d") if t else "unknown"


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
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
        address = config.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **kwargs)
        else:
            if config.ray.object_store_mb:
                kwargs["object_store_memory"] = config.ray.object_store_mb * 2**20
            ray.init(num_cpus=config.ray.num_cpus, **kwargs)
        started = True
    else:
        started = False
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints one line per finished scene instead
    ctx.print_on_execution_start = False
    return started


def _redacted(config: InferConfig) -> str:
    data = config.model_dump(mode="json")
    data["output"]["storage_options"] = dict.fromkeys(data["output"]["storage_options"], "***")
    return json.dumps(data, sort_keys=True)


def check_inputs(config: InferConfig) -> None:
    """Refuse a config whose local inputs are missing, before any work (naming the field).

    Raises:
        ConfigError: For a model that is neither a preset nor a saved model folder, or a missing embedded catalog
            file.
    """
    from pathlib import Path

    name = config.model.name_or_path
    folder = Path(name)
    if folder.exists():
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


# ----------------------------------------------------------------------------------------------------------- the job


def plan_waves(
    items: Iterator[dict[str, Any]],
    committed: Mapping[tuple[str, str], CommittedScene],
    wave_size: int,
    href_policy: HrefPolicy,
    summary: RunSummary,
    say: Printer,
    max_skip_lines: int = 20,
) -> Iterator[list[Scene | SceneFailure]]:
    """Turn the lazy item stream into waves of scenes to process, skipping committed ones (printed, with why).

    Args:
        items: STAC item dicts, lazily.
        committed: The ledger's index for this output key.
        wave_size: Scenes per wave (failures count too).
        href_policy: Which asset hrefs may be read.
        summary: Counts ``scenes_matched`` / ``scenes_skipped`` as it goes.
        say: Where skip lines go.
        max_skip_lines: Skips printed one per line; later ones only counted (and summarised at the end).

    Yields:
        Lists of scenes (or items that could not become scenes), at most ``wave_size`` long.
    """
    wave: list[Scene | SceneFailure] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        key = (str(item.get("collection") or ""), str(item["id"]))
        if key in seen:  # a catalog may list an item twice (paging under concurrent writes)
            continue
        seen.add(key)
        summary.scenes_matched += 1
        reason = skip_reason(committed.get(key), _parse_time((item.get("properties") or {}).get("updated")))
        if reason:
            summary.scenes_skipped += 1
            summary.skip_reasons[reason.split(" (")[0]] += 1
            if summary.scenes_skipped <= max_skip_lines:
                say(f"skip {key[0]}/{key[1]}: {reason}")
            elif summary.scenes_skipped == max_skip_lines + 1:
                say("skip ... (further skips are counted, not listed)")
            continue
        try:
            wave.append(Scene.from_item(item, href_policy=href_policy))
        except SceneError as exc:
            exc.item_id = exc.item_id or key[1]
            wave.append(SceneFailure(item=item, error=exc))
        if len(wave) >= wave_size:
            yield wave
            wave = []
    if wave:
        yield wave


def _wave_dataset(config: InferConfig, scenes: Mapping[str, Scene], model_stage: type) -> Any:
    import ray

    rows = [{"scene_key": k, "scene": s.model_dump_json()} for k, s in scenes.items()]
    actors = config.actors
    num_gpus = actors.num_gpus
    if num_gpus is None:  # one GPU per model replica wherever the cluster has GPUs
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    ds: ray.data.Dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ReadStage(config.tiling.size, config.tiling.overlap, config.tiling.min_valid_fraction,
                  tiles_per_block=actors.batch_size),
        batch_size=1, num_cpus=actors.read_num_cpus, batch_format="numpy",
    )
    ds = ds.map_batches(
        model_stage,
        fn_constructor_kwargs={
            "model": config.model.name_or_path, "engine": config.model.engine, "dtype": config.model.dtype,
            "tp_size": config.model.tp_size, "kernel_inject": config.model.kernel_inject, "tasks": config.tasks,
            "vqa": config.vqa, "max_new_tokens": config.model.max_new_tokens, "seed": config.model.seed,
            "torch_threads": max(1, int(actors.num_cpus)),
        },
        compute=ray.data.ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.max_actors),
        batch_size=actors.batch_size, num_cpus=actors.num_cpus, num_gpus=num_gpus or None,
        batch_format="numpy",
    )
    geo = {
        k: SceneGeo(crs=s.crs or "", transform=s.transform or (1, 0, 0, 0, 1, 0), height=s.height, width=s.width)
        for k, s in scenes.items()
    }
    return ds.map_batches(ParseStage(config.tasks, geo), batch_size=actors.batch_size,
                          num_cpus=actors.read_num_cpus, batch_format="numpy")


def _failure_result(failure: SceneFailure, ids: Mapping[str, str]) -> tuple[str, str, dict[str, Any], Any]:
    item, err = failure.item, failure.error
    geom = shapely.geometry.shape(item["geometry"]) if item.get("geometry") else None
    record = {
        **ids, "scene_id": str(item["id"]), "tile_id": None, "datetime": _item_time(item), "stage": err.stage,
        "error_type": err.error_type, "message": err.message, "asset": err.asset, "href": err.href,
        "occurred_at": datetime.now(timezone.utc),
    }
    return str(item.get("collection") or ""), _date(_item_time(item)), record, geom


def _describe(result: SceneResult) -> str:
    if result.committed:
        return (f"{result.tiles_written} tiles, {result.tiles_skipped} skipped, "
                f"{result.detections} detections")
    first = result.error_rows[0][0] if result.error_rows else {}
    return (f"FAILED ({first.get('error_type')} at {first.get('stage')}: {str(first.get('message'))[:120]}); "
            f"retried next run")


def _process_wave(
    config: InferConfig,
    wave: list[Scene | SceneFailure],
    wave_no: int,
    run_id: str,
    store: OutputStore,
    ledger: Ledger,
    committed: dict[tuple[str, str], CommittedScene],
    summary: RunSummary,
    say: Printer,
    model_stage: type,
) -> None:
    unit_id = f"{run_id}-w{wave_no:04d}"
    output_key = config.output_key()
    ids = {"run_id": run_id, "unit_id": unit_id, "output_key": output_key}
    scenes = {scene_key(s.collection, s.id): s for s in wave if isinstance(s, Scene)}
    failures = [f for f in wave if isinstance(f, SceneFailure)]
    say(f"wave {wave_no}: {len(scenes)} scenes" + (f", {len(failures)} unreadable items" if failures else ""))
    for f in failures:
        say(f"  {f.item.get('collection')}/{f.item['id']}: FAILED ({f.error.error_type} at {f.error.stage}: "
            f"{f.error.message[:120]}); retried next run")

    # stream the wave through Ray; each finished scene's tile grid is written as soon as it is complete
    results: list[SceneResult] = []
    if scenes:
        assembler = SceneAssembler(
            scenes, config.tasks, config.vqa, config.detection.nms_iou, config.detection.containment, ids,
            config.model.name_or_path, config.tiling.size,
        )
        t_wave, t_said, tiles_seen = time.perf_counter(), time.perf_counter(), 0
        for batch in _wave_dataset(config, scenes, model_stage).iter_batches(batch_size=None, batch_format="numpy"):
            tiles_seen += len(batch["scene_key"])
            if time.perf_counter() - t_said > HEARTBEAT_S:  # big scenes take minutes: show the tiles moving
                t_said = time.perf_counter()
                say(f"  ... {tiles_seen} tiles through the model in this wave "
                    f"({tiles_seen / (t_said - t_wave):.1f} tiles/s)")
            for result in assembler.add(batch):
                if result.committed and result.grid is not None:
                    write_scene_grid(store, result.grid)
                result.grid = None  # the arrays are on disk now; keep only the rows
                results.append(result)
                say(f"  [{len(results)}/{len(scenes)}] {scene_key(result.scene.collection, result.scene.id)}: "
                    f"{_describe(result)}")
        if assembler.pending:
            raise RuntimeError(f"scenes with missing tile rows after the wave: {assembler.pending}")

    # stage the unit's rows, rewriting older files of scenes that were updated in the catalog
    staging = ledger.staging_dir(unit_id)
    ok = [r for r in results if r.committed]
    superseded: dict[tuple[str, str], list[str]] = {}
    for r in ok:
        prev = committed.get((r.scene.collection, r.scene.id))
        if prev is not None:
            superseded.setdefault((prev.collection, prev.date), []).append(prev.scene_id)
    publish, delete = rewrite_without(store, staging, unit_id, ("scenes", "tiles", "detections"), superseded,
                                      output_key) if superseded else ([], [])

    def part(r: SceneResult) -> tuple[str, str]:
        return r.scene.collection, _date(r.scene.datetime)

    publish += stage_table(store, staging, "scenes", unit_id,
                           [(*part(r), r.scene_row, shapely.geometry.shape(r.scene.geometry)
                             if r.scene.geometry else None) for r in ok if r.scene_row])
    publish += stage_table(store, staging, "tiles", unit_id, [(*part(r), rec, g) for r in ok for rec, g in r.tile_rows])
    publish += stage_table(store, staging, "detections", unit_id,
                           [(*part(r), rec, g) for r in ok for rec, g in r.detection_rows])
    error_rows = [(*part(r), rec, g) for r in results for rec, g in r.error_rows]
    error_rows += [_failure_result(f, ids) for f in failures]
    publish += stage_table(store, staging, "errors", unit_id, error_rows)
    unit = UnitRecord(
        unit_id=unit_id, run_id=run_id, output_key=output_key,
        scenes=[(r.scene.collection, r.scene.id, _date(r.scene.datetime), r.scene.updated) for r in ok],
        publish=publish, delete=delete,
    )
    ledger.commit(unit)
    for r in ok:
        committed[(r.scene.collection, r.scene.id)] = CommittedScene(
            r.scene.collection, r.scene.id, _date(r.scene.datetime), r.scene.updated, unit_id
        )

    summary.units_committed += 1
    summary.scenes_processed += len(ok)
    summary.scenes_failed += len(results) - len(ok) + len(failures)
    for r in results:
        summary.tiles_planned += r.tiles_planned
        summary.tiles_written += r.tiles_written
        summary.tiles_skipped += r.tiles_skipped
        summary.tiles_failed += r.tiles_failed
        summary.detections += r.detections
        summary.detections_by_label.update(rec["label"] for rec, _ in r.detection_rows)
    summary.errors += len(error_rows)


def _write_run_row(store: OutputStore, config: InferConfig, summary: RunSummary, started: datetime) -> None:
    finished = datetime.now(timezone.utc)
    record = {
        "run_id": summary.run_id, "status": summary.status, "started_at": started, "finished_at": finished,
        "output_key": config.output_key(), "model": config.model.name_or_path, "engine": config.model.engine,
        "tasks": list(config.tasks), "collections": list(config.catalog.collections), "config": _redacted(config),
        "scenes_matched": summary.scenes_matched, "scenes_skipped": summary.scenes_skipped,
        "scenes_processed": summary.scenes_processed, "scenes_failed": summary.scenes_failed,
        "tiles_planned": summary.tiles_planned, "tiles_written": summary.tiles_written,
        "tiles_skipped": summary.tiles_skipped, "tiles_failed": summary.tiles_failed,
        "detections": summary.detections, "errors": summary.errors, "units_committed": summary.units_committed,
        "wall_s": summary.wall_s, "tiles_per_s": summary.tiles_per_s,
    }
    aoi = None
    if config.catalog.bbox is not None:
        w, s, e, n = config.catalog.bbox
        aoi = shapely.box(w, s, e, n) if w <= e else shapely.MultiPolygon(
            [shapely.box(w, s, 180.0, n), shapely.box(-180.0, s, e, n)])
    elif config.catalog.intersects is not None:
        aoi = shapely.geometry.shape(config.catalog.intersects)
    path = f"{partition_dir('runs', None, _date(started))}/run-{summary.run_id}.parquet"
    store.write_bytes(path, geoparquet_bytes(build_frame("runs", [record], [aoi])))


def run(config: InferConfig, *, say: Printer = print, model_stage: type = ModelStage) -> RunSummary:
    """Run the archive inference job.

    Args:
        config: The validated job config.
        say: Where progress lines go (``print`` by default).
        model_stage: The model stage's callable class; it is built with :class:`~pipelines.stages.ModelStage`'s
            keyword arguments and must add the same columns (another engine, or a perfect "oracle" in tests).

    Returns:
        The run's summary (also written as its ``runs`` row).
    """
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)

    # 1. set up: GDAL once, the output root, recovery, what is already committed
    configure_gdal()
    store = OutputStore(config.output.root, config.output.storage_options)
    ledger = Ledger(store)
    recovery = ledger.recover()
    if recovery.rolled_forward or recovery.rolled_back:
        say(f"recovered a crashed run: published units {recovery.rolled_forward}, "
            f"discarded unfinished units {recovery.rolled_back}")
    committed = ledger.committed(config.output_key())
    summary = RunSummary(run_id=new_run_id(), output_root=store.url())
    say(f"run {summary.run_id}: model {config.model.name_or_path} ({config.model.engine}, {config.model.dtype}), "
        f"tasks {', '.join(config.tasks)}; {len(committed)} scenes already committed under {store.url()}")
    policy = HrefPolicy.for_roots(*config.catalog.asset_prefixes) if config.catalog.asset_prefixes else HrefPolicy()
    started_ray = False

    try:
        # 2. search lazily; 3. process wave by wave
        with _catalog_url(config) as url:
            items = search_items(
                url, collections=config.catalog.collections, bbox=config.catalog.bbox,
                intersects=config.catalog.intersects, datetime=config.catalog.datetime, filter=config.catalog.filter,
                max_items=config.catalog.max_items,
            )
            waves = plan_waves(items, committed, config.output.wave_size, policy, summary, say)
            for wave_no, wave in enumerate(waves):
                if wave_no == 0:
                    started_ray = _start_ray(config)
                _process_wave(config, wave, wave_no, summary.run_id, store, ledger, committed, summary, say,
                              model_stage)
        if summary.scenes_skipped:
            reasons = "; ".join(f"{n} {why}" for why, n in summary.skip_reasons.items())
            say(f"skipped {summary.scenes_skipped} scenes: {reasons}")
        summary.status = "ok" if summary.scenes_failed == 0 else "ok_with_errors"
    except KeyboardInterrupt:
        summary.status = "interrupted"
        raise
    except Exception as exc:
        summary.status = "failed"
        summary.message = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # 4. the runs row, whatever happened (a killed process writes none: its units say what it did)
        summary.wall_s = time.perf_counter() - t0
        try:
            _write_run_row(store, config, summary, started)
            ledger.compact()
        except Exception:  # never mask the run's own exception
            log.exception("could not write the runs row")
        if started_ray:  # a Ray instance this job started ends with it (an attached cluster stays)
            import ray

            ray.shutdown()
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
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt run CONFIG``: validate the config (refusing it before any work), run the job, print a summary.

    Returns:
        0 when the run finished (bad scenes are recorded as ``errors`` rows, not failures of the run), 2 for an
        invalid config, 1 when the run itself failed.
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
        summary = run(config, say=say)
    except Exception as exc:
        print(f"earthgpt run: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
