"""The archive job at archive scale, measured side by side in one run (one command, a few minutes on 2 cores):

1. **efficiency** — pipeline tiles/s (the whole job: read tasks, one model actor, parse, assembly, commits) ÷
   model-only tiles/s (the same model stage called in this process on the same tiles, batch and thread count), with
   a model whose compute dominates (the ``small`` preset widened to a 512x6 LLM, ~25 M parameters, random weights
   saved with ``save_pretrained``). ``efficiency`` counts the run from the moment its model actor was ready (its
   model built) to the end — the tail, every commit and the last unit's staging included; the model-only side
   excludes the model load too. The start-up before it (planning, the pool's start, the one model load: paid once
   per run, amortised over hours at archive scale) is reported as ``startup_s``, and ``efficiency_wall`` divides by
   the whole run's wall time;
   ``model_loads_per_actor`` from the run's ``runs`` row; ``driver_cpu_share`` = the driver's CPU seconds ÷ the CPU
   seconds of the driver and every Ray process during the run.
2. **noop_ratio** — on a 10,000-item catalog in stac-fastapi-pgstac (items sharing the toy COGs, all committed): a
   nightly run with nothing new ÷ a full-scan reconcile of the same catalog; plus the request counts of both (at a
   counting proxy) and a nightly run after 5 items changed.
3. **rss_ratio** — peak memory (RSS of the driver and all its child processes: Ray's daemons and workers) of a run
   over 10× the tiles ÷ 1×, each in a fresh process (tiny preset; items sharing the toy COGs).

Prints a table, then one JSON line. Usage::

    .venv/bin/python benchmarks/archive.py [--scenes 3] [--preset small] [--bulk 10000] [--rss-items 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLLECTIONS = ["toyworld-optical", "toyworld-sar", "toyworld-thermal"]


class TreeCPU:
    """CPU seconds of a process and every descendant it had while sampled (Ray's workers come and go: each one's
    last reading is kept after it exits)."""

    def __init__(self, proc: psutil.Process, every_s: float = 0.25) -> None:
        self.proc = proc
        self.every_s = every_s
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in [self.proc, *self.proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self.seen[p.pid] = t.user + t.system

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def __enter__(self) -> TreeCPU:
        self._sample()
        self.start = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def total(self) -> float:
        """CPU seconds spent while sampled, all processes."""
        return sum(v - self.start.get(pid, 0.0) for pid, v in self.seen.items())


def _config(world: Any, items: Path, root: str, **over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(items)},
                    "collections": COLLECTIONS, "asset_prefixes": [(world.root / "cogs").as_uri()]},
        "tasks": ["caption", "detect"],
        "tiling": {"size": 128, "overlap": 0, "min_valid_fraction": 0.5},
        "model": {"name_or_path": "small", "max_new_tokens": 24},
        "actors": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 8, "read_num_cpus": 0.25},
        "output": {"root": root, "commit_tiles": 24, "commit_seconds": None},
        "ray": {"num_cpus": 2, "object_store_mb": 256},
    }
    from pipelines.jobconfig import apply_overrides

    apply_overrides(data, {key.replace("__", "."): value for key, value in over.items()})
    return data


# ------------------------------------------------------------------------------------------------- 1. efficiency


def bench_model(folder: Path, preset: str) -> str:
    """The benchmark's model: a preset name, or ``wide`` (``small`` with a 512x6 LLM) saved to ``folder``."""
    if preset != "wide":
        return preset
    from earthgpt.presets import build_model, earthgpt_small
    from earthgpt.processor import EarthGPTProcessor

    cfg = earthgpt_small(text_config={"hidden_size": 512, "num_hidden_layers": 6, "intermediate_size": 1376,
                                      "num_attention_heads": 8, "num_key_value_heads": 8})
    build_model(cfg, seed=0).save_pretrained(folder)
    EarthGPTProcessor.from_config(cfg).save_pretrained(folder)
    return str(folder)


def efficiency(world: Any, tmp: Path, preset: str, max_new_tokens: int) -> dict[str, Any]:
    import ray

    from catalogs.hrefs import HrefPolicy
    from catalogs.scene import Scene
    from catalogs.toyworld import load_items
    from pipelines.archive.config import parse_config
    from pipelines.archive.job import run
    from pipelines.archive.source import source_batch
    from pipelines.archive.stages import ModelStage, ReadStage

    model = bench_model(tmp / "model", preset)
    config = parse_config(_config(world, world.items_path, str(tmp / "eff-out"), tiling__size=64,
                                  model__name_or_path=model, model__max_new_tokens=max_new_tokens))
    batch_size = config.actors.batch_size
    # model only: the same tiles (read here, untimed), the same stage, batch and one thread, in this process
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    scenes = [Scene.from_item(i, href_policy=policy) for i in load_items(world.items_path)]
    read = ReadStage(config.tiling.size, config.tiling.overlap, config.tiling.min_valid_fraction,
                     tiles_per_block=batch_size)
    blocks = [b for scene in scenes for b in read(source_batch([scene]))]
    stage = ModelStage(model, tasks=config.tasks, max_new_tokens=max_new_tokens, torch_threads=1)
    ok = sum(int((b["status"] == "ok").sum()) for b in blocks)
    t0 = time.perf_counter()
    for b in blocks:
        stage(b)
    model_s = time.perf_counter() - t0
    del stage
    model_tps = ok / model_s

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, logging_level="warning",
             log_to_driver=False)
    try:
        cpu0_driver = resource.getrusage(resource.RUSAGE_SELF)
        with TreeCPU(psutil.Process()) as tree:
            summary = run(config, say=lambda _line: None)
        cpu_all = tree.total
        r = resource.getrusage(resource.RUSAGE_SELF)
        cpu_driver = (r.ru_utime - cpu0_driver.ru_utime) + (r.ru_stime - cpu0_driver.ru_stime)
    finally:
        ray.shutdown()
    assert summary.tiles_written == ok, (summary.tiles_written, ok)
    steady = summary.tiles_written / (summary.wall_s - (summary.startup_s or 0.0))
    return {
        "tiles": ok, "model_only_tiles_per_s": model_tps, "pipeline_tiles_per_s": steady,
        "pipeline_wall_tiles_per_s": summary.tiles_per_s, "efficiency": steady / model_tps,
        "efficiency_wall": summary.tiles_per_s / model_tps, "startup_s": summary.startup_s,
        "model_s": model_s, "pipeline_s": summary.wall_s,
        "units_committed": summary.units_committed, "model_actors": summary.model_actors,
        "model_loads_per_actor": summary.model_loads / max(1, summary.model_actors),
        "driver_cpu_s": cpu_driver, "all_cpu_s": cpu_all, "driver_cpu_share": cpu_driver / max(cpu_all, 1e-9),
    }


# --------------------------------------------------------------------------------------------------- 2. no-op


def noop(world: Any, n_bulk: int) -> dict[str, Any]:
    from catalogs.toyworld import changed_items, load_items, replicate_items
    from pipelines.archive.config import parse_config
    from pipelines.archive.job import run
    from pipelines.archive.ledger import Ledger, UnitRecord
    from pipelines.archive.store import OutputStore
    from tests.catalogs.proxy import CountingProxy
    from tests.harness.servers import start_pgstac, start_s3

    s3 = start_s3()
    pg = start_pgstac()
    saved = {k: os.environ.get(k) for k in s3.env}
    os.environ.update(s3.env)
    try:
        s3.make_bucket("bench")
        items = load_items(world.items_path)
        pg.load_collections([json.loads(p.read_text()) for p in world.collection_paths.values()])
        pg.execute("INSERT INTO pgstac.pgstac_settings (name, value) VALUES ('context', 'on') "
                   "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value")
        bulk = replicate_items(items, n_bulk, prefix="bulk", start=datetime(2023, 1, 1, tzinfo=timezone.utc),
                               every=timedelta(minutes=50))
        t0 = time.perf_counter()
        pg.load_items(bulk)
        load_s = time.perf_counter() - t0
        proxy = CountingProxy(pg.url)
        data = _config(world, world.items_path, "s3://bench/nightly", model__name_or_path="tiny",
                       model__max_new_tokens=8)
        data["catalog"] = {"url": proxy.url, "collections": COLLECTIONS,
                           "filter": {"op": "like", "args": [{"property": "id"}, "bulk-%"]},
                           "asset_prefixes": [(world.root / "cogs").as_uri()], "items_per_task": 2000}
        config = parse_config(data)
        store = OutputStore(config.output.root)
        Ledger(store).commit(UnitRecord(
            unit_id="seed", run_id="seed", output_key=config.output_key(),
            scenes=[(i["collection"], i["id"], i["properties"]["datetime"][:10],
                     datetime.fromisoformat(i["properties"]["updated"].replace("Z", "+00:00"))) for i in bulk]))
        quiet = lambda _line: None  # noqa: E731
        proxy.requests.clear()
        full = run(config, say=quiet, full_scan=True)
        full_req = len(proxy.requests)
        proxy.requests.clear()
        nop = run(config, say=quiet)
        nop_req = len(proxy.requests)
        changed = changed_items(bulk, (17, n_bulk // 2, n_bulk - 2), new=2)
        pg.load_items(changed)
        proxy.requests.clear()
        five = run(config, say=quiet)
        five_req = len(proxy.requests)
        proxy.stop()
    finally:
        pg.stop()
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "catalog_items": n_bulk, "pgstac_load_s": load_s,
        "full_scan_s": full.wall_s, "full_scan_requests": full_req, "full_scan_read_tasks": full.read_tasks,
        "noop_s": nop.wall_s, "noop_requests": nop_req, "noop_ratio": nop.wall_s / full.wall_s,
        "five_changed_s": five.wall_s, "five_changed_requests": five_req, "five_changed_processed":
            five.scenes_processed, "five_changed_listed": five.scenes_matched,
    }


# ------------------------------------------------------------------------------------------------------ 3. memory


def _peak_rss(cmd: list[str]) -> tuple[float, float, int, dict[str, Any]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0.0
    at_peak: dict[str, Any] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, at_peak
        while not done.is_set():
            total, parts = 0, []
            try:
                for p in [ps, *ps.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss = p.memory_info().rss
                        total += rss
                        parts.append((rss / 2**20, " ".join(p.cmdline()[:1] + p.cmdline()[1:3])[-60:]))
            except psutil.Error:
                pass
            if total / 2**20 > peak:  # what was alive at the peak: how many processes, the largest ones
                peak = total / 2**20
                workers = [mb for mb, name in parts if "default_worker" in name or name.startswith("ray::")]
                at_peak = {"processes": len(parts), "ray_workers": len(workers),
                           "ray_workers_mb": round(sum(workers)), "largest": sorted(parts, reverse=True)[:4]}
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])
    tiles = next((int(line.split("written ")[1].split()[0]) for line in out.splitlines() if "written " in line), 0)
    return peak, time.perf_counter() - t0, tiles, at_peak


def memory(world: Any, tmp: Path, n_items: int) -> dict[str, Any]:
    from catalogs.toyworld import load_items, replicate_items

    items = load_items(world.items_path)
    out: dict[str, Any] = {}
    for factor in (1, 10):
        path = tmp / f"items-{factor}.ndjson"
        path.write_text("".join(json.dumps(i) + "\n" for i in replicate_items(items, n_items * factor)))
        cfg = tmp / f"job-{factor}.yaml"
        import yaml

        cfg.write_text(yaml.safe_dump(_config(world, path, str(tmp / f"rss-out-{factor}"), model__name_or_path="tiny",
                                              model__max_new_tokens=6, output__commit_tiles=64)))
        peak, wall, tiles, at_peak = _peak_rss([sys.executable, "-m", "pipelines.infer", str(cfg), "--quiet"])
        out[f"x{factor}"] = {"items": n_items * factor, "tiles": tiles, "peak_rss_mb": peak, "wall_s": wall,
                             "at_peak": at_peak}
    out["rss_ratio"] = out["x10"]["peak_rss_mb"] / out["x1"]["peak_rss_mb"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=3, help="toy scenes (efficiency part)")
    parser.add_argument("--preset", default="wide", help="model of the efficiency part: wide (default) or a preset")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--bulk", type=int, default=10_000, help="catalog size of the no-op part")
    parser.add_argument("--rss-items", type=int, default=6, help="items of the 1x memory run (10x: ten times)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the S3 server's access log
    from catalogs.toyworld import generate_toyworld

    with tempfile.TemporaryDirectory(prefix="bench-archive-") as d:
        tmp = Path(d)
        world = generate_toyworld(tmp / "world", scenes=args.scenes, seed=7, chips_per_scene=1)
        eff = efficiency(world, tmp, args.preset, args.max_new_tokens)
        nop = noop(world, args.bulk)
        mem = memory(world, tmp, args.rss_items)

    rows = [
        ("efficiency", f"pipeline {eff['pipeline_tiles_per_s']:.2f} tiles/s ÷ model only "
                       f"{eff['model_only_tiles_per_s']:.2f} tiles/s ({eff['tiles']} tiles, {args.preset})",
         f"{eff['efficiency']:.3f}"),
        ("efficiency_wall", f"whole run {eff['pipeline_s']:.1f} s incl. start-up {eff['startup_s']:.1f} s "
                            f"({eff['pipeline_wall_tiles_per_s']:.2f} tiles/s)", f"{eff['efficiency_wall']:.3f}"),
        ("model_loads_per_actor", f"{eff['model_actors']} actors, {eff['units_committed']} units committed",
         f"{eff['model_loads_per_actor']:.0f}"),
        ("driver_cpu_share", f"driver {eff['driver_cpu_s']:.1f} CPU s of {eff['all_cpu_s']:.1f}",
         f"{eff['driver_cpu_share']:.3f}"),
        ("noop_ratio", f"no-op nightly {nop['noop_s']:.2f} s ({nop['noop_requests']} requests) ÷ full scan "
                       f"{nop['full_scan_s']:.1f} s ({nop['full_scan_requests']} requests, "
                       f"{nop['full_scan_read_tasks']} read tasks), {nop['catalog_items']} items",
         f"{nop['noop_ratio']:.4f}"),
        ("five changed", f"{nop['five_changed_processed']} processed of {nop['five_changed_listed']} listed, "
                         f"{nop['five_changed_requests']} requests, {nop['five_changed_s']:.1f} s", ""),
        ("rss_ratio", f"peak RSS {mem['x10']['peak_rss_mb']:.0f} MB ({mem['x10']['tiles']} tiles) ÷ "
                      f"{mem['x1']['peak_rss_mb']:.0f} MB ({mem['x1']['tiles']} tiles)", f"{mem['rss_ratio']:.3f}"),
    ]
    width = max(len(r[1]) for r in rows)
    print(f"{'figure':<22} {'measured':<{width}} value")
    for name, what, value in rows:
        print(f"{name:<22} {what:<{width}} {value}")
    print(json.dumps({
        "efficiency": round(eff["efficiency"], 4), "efficiency_wall": round(eff["efficiency_wall"], 4), "model_loads_per_actor": eff["model_loads_per_actor"],
        "noop_ratio": round(nop["noop_ratio"], 5), "rss_ratio": round(mem["rss_ratio"], 4),
        "driver_cpu_share": round(eff["driver_cpu_share"], 4), "efficiency_detail": eff, "noop_detail": nop,
        "rss_detail": {k: v for k, v in mem.items() if k != "rss_ratio"},
    }, default=str))


if __name__ == "__main__":
    main()
