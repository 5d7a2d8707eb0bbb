"""The chaos suite of the archive job: processes killed, servers failing, runs overlapping — each scenario on the toy
world with real servers (moto S3, a rustac STAC API, local Ray), each ending with the exactly-once check of
:mod:`tests.reliability.outcomes` (every planned tile once, as a row or an error row, nothing else), recorded for
``docs/reliability.md``; and, where the scenario ends in a complete run, the tables equal an uninterrupted run's as
sets.

One small world (four scenes, 128-px tiles, COGs on S3) and one uninterrupted reference run serve every scenario;
the model stage is the oracle (ground-truth answers), so the time goes to the machinery under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from catalogs.tiling import plan_tiles
from catalogs.toyworld import load_items
from pipelines.archive.config import parse_config
from pipelines.archive.job import EXIT_LEASE_HELD, run
from pipelines.archive.store import OutputStore, read_table
from pipelines.jobconfig import apply_overrides
from tests.pipelines.conftest import upload_world
from tests.pipelines.oracle import oracle_stage
from tests.reliability.faults import FaultProxy, Request, kill, pid_on_port
from tests.reliability.outcomes import Outcome, check_exactly_once, record

pytestmark = [pytest.mark.integration, pytest.mark.ray]

SEED, SCENES, TILE = 41, 4, 128
BUCKET, PREFIX = "chaos", "w41"
COLLECTIONS = ["toyworld-optical", "toyworld-sar", "toyworld-thermal"]
DATA_TABLES = ("scenes", "tiles", "detections", "errors")
VOLATILE = {"run_id", "unit_id", "processed_at", "occurred_at", "bbox"}
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(s3, rustac_server, tmp_path_factory) -> dict[str, Any]:
    """Four toy scenes on S3, served by a rustac STAC API (two items per page); the tiles each scene plans."""
    w = upload_world(tmp_path_factory.mktemp("chaos-world"), BUCKET, PREFIX, scenes=SCENES, seed=SEED, s3=s3)
    items = load_items(w.items_path)
    url = rustac_server([json.loads(p.read_text()) for p in w.collection_paths.values()], items)
    planned: dict[tuple[str, str], list[str]] = {}
    for item in items:
        props = item["properties"]
        h, w_ = props["proj:shape"] if "proj:shape" in props else next(iter(item["assets"].values()))["proj:shape"]
        planned[(item["collection"], item["id"])] = [t.tile_id for t in plan_tiles(h, w_, TILE, 0)]
    truth = pd.read_parquet(w.ground_truth_path, columns=["collection", "scene_id", "label", "pixel_box"])
    return {"url": url, "items": items, "planned": planned, "truth_path": str(w.ground_truth_path),
            "truth": truth.to_dict("records")}


def _data(catalog_url: str, root: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "catalog": {"url": catalog_url, "collections": COLLECTIONS, "page_size": 2,
                    "asset_prefixes": [f"s3://{BUCKET}/{PREFIX}/cogs/"]},
        "tasks": ["caption", "detect"],
        "tiling": {"size": TILE, "overlap": 0, "min_valid_fraction": 0.5},
        "actors": {"min_actors": 1, "max_actors": 1, "batch_size": 8, "read_num_cpus": 0.5},
        "output": {"root": root, "commit_tiles": 20, "commit_seconds": None},
        "ray": {},
    }
    apply_overrides(data, {key.replace("__", "."): value for key, value in extra.items()})
    return data


def table_sets(root: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, set[tuple]]:
    """Each data table's rows as a set, without the columns that differ between runs (ids, timestamps)."""
    store = OutputStore(root, storage_options)
    out = {}
    for table in DATA_TABLES:
        frame = read_table(store, table)
        frame = pd.DataFrame(frame.drop(columns=[c for c in frame.columns if c in VOLATILE]))
        if "geometry" in frame:
            frame["geometry"] = [None if g is None else g.wkb_hex for g in frame["geometry"]]
        rows = {tuple(json.dumps(v, default=str) if isinstance(v, (list, np.ndarray)) else
                      (None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)) for v in row)
                for row in frame.astype(object).itertuples(index=False)}
        assert len(rows) == len(frame), f"{table}: duplicate rows"
        out[table] = rows
    return out


@pytest.fixture(scope="module")
def reference(world, ray_local, tmp_path_factory) -> dict[str, set[tuple]]:
    """An uninterrupted run: the tables every scenario must end with."""
    root = str(tmp_path_factory.mktemp("chaos-reference") / "out")
    summary = run(parse_config(_data(world["url"], root)), model_stage=oracle_stage(world["truth"]), say=_quiet)
    assert summary.status == "ok" and summary.scenes_processed == SCENES and summary.units_committed >= 2
    return table_sets(root)


def _quiet(_line: str) -> None:
    pass


def _finish(world: dict[str, Any], root: str, scenario: str, guarantee: str, *,
            storage_options: Mapping[str, Any] | None = None, **details: Any) -> Outcome:
    outcome = check_exactly_once(root, world["planned"], scenario=scenario, guarantee=guarantee,
                                 storage_options=storage_options, details=details)
    record(outcome)
    assert outcome.exactly_once, outcome
    assert outcome.written == outcome.planned, outcome  # the toy world has no bad scenes: every tile is a row
    return outcome


def _driver(world: dict[str, Any], config: Path, *args: str, env: Mapping[str, str] | None = None,
            **popen: Any) -> subprocess.Popen:
    """The job's command line (with the oracle model stage) in its own process group, as a scheduler starts it."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.driver", world["truth_path"], str(config), *args],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen,
    )


def _wait(proc: subprocess.Popen, timeout: float = 600) -> str:
    """The process's output once it ends; a process still running after ``timeout`` is killed with its group."""
    try:
        return str(proc.communicate(timeout=timeout)[0])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=60)


def _write_config(path: Path, data: dict[str, Any]) -> Path:
    data = {**data, "ray": {"num_cpus": 2, "object_store_mb": 256}}
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------------------- scenarios


def _is_next_page(req: Request) -> bool:
    """A request for a search page after the first (rustac pages with ``skip``, other APIs with ``token``)."""
    return "/search" in req.path and any(k in req.body or k.decode() in req.path for k in (b"skip", b"token"))


def test_read_task_worker_killed(world, reference, ray_local, tmp_path):
    """The read task paging the STAC search is killed (SIGKILL of its worker process) while it waits for page 2;
    Ray runs the task again on another worker and nothing is read twice or lost."""
    pages: list[int] = []

    def plan(req: Request) -> str:
        if _is_next_page(req):
            pages.append(req.n)
            # the driver's own look at the first two pages comes first; the read task's page 2 is held
            return "hold" if len(pages) == 2 else "pass"
        return "pass"

    proxy = FaultProxy(world["url"], plan, rewrite=True)
    killed: list[int] = []

    def killer() -> None:
        if proxy.held.wait(timeout=120):
            pid = pid_on_port(proxy.held_client_port or 0)
            if pid is not None:
                kill(pid)
                killed.append(pid)
            proxy.release()

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    root = str(tmp_path / "out")
    try:
        summary = run(parse_config(_data(proxy.url, root)), model_stage=oracle_stage(world["truth"]), say=_quiet)
    finally:
        proxy.stop()
        watcher.join(timeout=10)
    assert killed, f"no read task was held and killed: {proxy.log}"
    assert summary.status == "ok" and summary.scenes_processed == SCENES
    _finish(world, root, "read-task-killed", "A read task's worker killed mid-search is rerun; every tile once.",
            killed_pid=killed[0], search_requests=len(proxy.log))
    assert table_sets(root) == reference


def _killable_oracle(truth: list[dict[str, Any]], folder: str, hold_batch: int) -> type:
    """The oracle stage, which logs each batch it starts and finishes; the first actor to reach its
    ``hold_batch``-th batch announces its pid and waits there to be killed."""
    base = oracle_stage(truth)

    class KillableOracle(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.calls = 0

        def _log(self, what: str, batch: dict[str, Any]) -> None:
            tiles = [f"{k}#{t}" for k, t in zip(batch["scene_key"], batch["tile_id"], strict=True)]
            with open(os.path.join(folder, "batches.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "what": what, "tiles": tiles}) + "\n")

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            self.calls += 1
            self._log("start", batch)
            if self.calls == hold_batch:
                try:
                    fd = os.open(os.path.join(folder, "held"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    time.sleep(120)  # killed here
            out = super().__call__(batch)
            self._log("done", batch)
            return out

    return KillableOracle


def test_model_actor_killed(world, reference, ray_local, tmp_path):
    """The model actor's process is killed in the middle of a batch: Ray restarts the actor and the batch is redone
    — its tiles end up in the tables once, neither lost nor doubled."""
    folder = tmp_path / "actor"
    folder.mkdir()
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        held = folder / "held"
        while not stop.is_set():
            if held.exists() and held.read_text():
                pid = int(held.read_text())
                kill(pid)
                killed.append(pid)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()
    root = str(tmp_path / "out")
    try:
        summary = run(parse_config(_data(world["url"], root)), say=_quiet,
                      model_stage=_killable_oracle(world["truth"], str(folder), hold_batch=3))
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert killed, "no actor was held and killed"
    assert summary.status == "ok" and summary.scenes_processed == SCENES
    log = [json.loads(line) for line in (folder / "batches.jsonl").read_text().splitlines()]
    in_flight = [r for r in log if r["pid"] == killed[0] and r["what"] == "start"][-1]["tiles"]
    done = [t for r in log if r["what"] == "done" for t in r["tiles"]]
    redone = {t: done.count(t) for t in in_flight}
    assert set(redone.values()) == {1}, redone  # each tile of the killed batch finished exactly once, elsewhere
    _finish(world, root, "model-actor-killed", "A model actor killed mid-batch is restarted and the batch redone; "
            "every tile once.", killed_pid=killed[0], batch_tiles=len(in_flight),
            actor_processes=len({r["pid"] for r in log}))
    assert table_sets(root) == reference


def test_driver_killed_then_command_rerun(world, reference, tmp_path):
    """The driver is killed (SIGKILL of its process group, Ray with it) after its first commit; the same command,
    run again, takes over the dead run's lease at once, recovers, and ends with the uninterrupted run's tables."""
    root = str(tmp_path / "out")
    config = _write_config(tmp_path / "job.yaml", _data(world["url"], root))
    proc = _driver(world, config)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "committed unit" in line:  # one unit committed, the next ones in flight
                break
        else:
            pytest.fail("the run ended before committing a unit:\n" + "".join(lines[-30:]))
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=60)
    store = OutputStore(root)
    partial = len(read_table(store, "scenes"))
    assert 0 < partial < SCENES, partial
    assert _zarr_groups(store) == set(read_table(store, "scenes")["embeddings_group"])  # none of the lost unit's
    rerun = _driver(world, config)
    out = _wait(rerun)
    assert rerun.returncode == 0, out[-3000:]
    assert "took over the lease" in out and "has ended" in out, out[-3000:]
    assert not store.glob("_staging/*")
    _finish(world, root, "driver-killed", "A driver killed mid-run, then the command rerun: the uninterrupted "
            "run's tables, as sets.", scenes_committed_before_kill=partial)
    assert table_sets(root) == reference
    assert _zarr_groups(store) == set(read_table(store, "scenes")["embeddings_group"])


def _zarr_groups(store: OutputStore) -> set[str]:
    """Scene groups present in the Zarr store (folders holding an ``embedding`` array)."""
    return {p.rsplit("/embedding/zarr.json", 1)[0].removeprefix("embeddings.zarr/")
            for p in store.glob("embeddings.zarr/**/embedding/zarr.json")}


def _s3_chaos(req: Request) -> str:
    """A burst of three 503 SlowDown answers every 251 requests; a dropped connection every 197; PUTs at every 31st
    request applied but their answers lost. (A run makes about 1,200 requests, most of them Zarr objects: five
    bursts and six drops, the first burst on the run's first requests, the first drop on a COG read. Each burst
    costs the clients seconds of backoff: a few bursts prove the retries as well as a dozen.)"""
    if req.n % 251 in (3, 4, 5):
        return "503"
    if req.n % 197 == 50:
        return "drop"
    if req.method == "PUT" and req.n % 31 == 6:
        return "drop_after"
    return "pass"


def test_s3_slowdown_bursts_and_dropped_connections(world, reference, s3, tmp_path):
    """Every S3 request of the run — COG reads by GDAL, staging, ledger records, the lease, publishing — goes
    through a proxy answering bursts of 503 SlowDown and dropping connections (some after the request took
    effect). The clients retry; the run ends with the uninterrupted run's tables."""
    proxy = FaultProxy(s3.endpoint_url, _s3_chaos)
    s3.make_bucket("chaos-out")
    root = "s3://chaos-out/s3-faults"
    config = _write_config(tmp_path / "job.yaml", _data(world["url"], root))
    env = {"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url, "AWS_S3_ENDPOINT": proxy.host_port}
    try:
        proc = _driver(world, config, env=env)
        out = _wait(proc)
    finally:
        proxy.stop()
    assert proc.returncode == 0, out[-3000:]
    assert proxy.actions["503"] and proxy.actions["drop"] and proxy.actions["drop_after"], proxy.actions
    _finish(world, root, "s3-faults", "S3 answering 503 SlowDown bursts and dropping connections: retried; the "
            "uninterrupted run's tables.", requests=len(proxy.log), **{f"faults_{k}": v for k, v in
                                                                      proxy.actions.items() if k != "pass"})
    assert table_sets(root) == reference


def test_stac_api_fails_mid_pagination(world, reference, ray_local, tmp_path):
    """The STAC API fails in the middle of a search: first a burst of 503s on page 2 (retried with backoff, the run
    completes); then, on a new root, page 2 is down for good — the run fails, having committed only whole units,
    and the rerun (API back) ends with the uninterrupted run's tables."""
    pages: list[int] = []

    def burst(req: Request) -> str:
        if _is_next_page(req):
            pages.append(req.n)
            return "503" if 2 <= len(pages) <= 3 else "pass"  # the read task's first two tries at page 2
        return "pass"

    proxy = FaultProxy(world["url"], burst, rewrite=True)
    root = str(tmp_path / "burst")
    try:
        summary = run(parse_config(_data(proxy.url, root)), model_stage=oracle_stage(world["truth"]), say=_quiet)
    finally:
        proxy.stop()
    assert summary.status == "ok" and proxy.actions["503"] == 2
    assert table_sets(root) == reference

    down = FaultProxy(world["url"], lambda req: "503" if _is_next_page(req) and req.n > 3 else "pass",
                      rewrite=True)
    root = str(tmp_path / "down")
    try:
        with pytest.raises(Exception, match="(?i)search|503|stac"):
            run(parse_config(_data(down.url, root)), model_stage=oracle_stage(world["truth"]), say=_quiet)
    finally:
        down.stop()
    failed_503 = down.actions["503"]
    rerun = run(parse_config(_data(world["url"], root)), model_stage=oracle_stage(world["truth"]), say=_quiet)
    assert rerun.status == "ok"
    _finish(world, root, "stac-fails-mid-pagination", "A STAC API failing mid-pagination: a burst is retried; an "
            "outage fails the run loudly and the rerun completes.", burst_503=2, outage_503=failed_503)
    assert table_sets(root) == reference


def test_two_runs_started_at_once(world, reference, tmp_path):
    """Two runs of one config started at the same instant on one output root (an overlapping schedule): one takes
    the output key's lease and runs; the other exits 75 at once, naming the holder, having written nothing. (Before
    the lease, both ran and every tile was written twice.)"""
    root = str(tmp_path / "out")
    config = _write_config(tmp_path / "job.yaml", _data(world["url"], root))
    procs = [_driver(world, config) for _ in range(2)]
    outs = [_wait(p) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, EXIT_LEASE_HELD], "\n----\n".join(o[-2000:] for o in outs)
    refused = outs[[p.returncode for p in procs].index(EXIT_LEASE_HELD)]
    for part in ("is leased by run", "host ", "pid ", "since ", "--break-lease"):
        assert part in refused, refused
    _finish(world, root, "two-runs-at-once", "Two runs started at once on one output root: one runs, the other "
            "exits 75 naming the holder; every tile once.", exit_codes=codes)
    assert table_sets(root) == reference
