"""A Ray Train worker killed mid-training: the run resumes from the last checkpoint, its step count continues, and the
data stream continues where the checkpoint left it — no record is trained on twice within a pass, none is skipped.

The worker process is killed from outside (SIGKILL, as by the OOM killer or a preempted node) once it reports a step
past the first checkpoint; Ray Train restarts the worker group from that checkpoint. Each rank logs the records it
trains on (``run.record_log``), so the test sees exactly what the model saw: the records of the steps after the
checkpoint that the killed attempt trained on are rolled back with the model, and the resumed attempt must take up
the stream at the checkpoint's positions.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from catalogs.toyworld import generate_toyworld
from pipelines.mmrs import write_mmrs
from pipelines.train_config import parse_config
from pipelines.training import read_metrics_log, run_training
from tests.reliability.outcomes import Outcome, record

pytestmark = pytest.mark.integration

MAX_STEPS = 12
KILL_AFTER_STEP = 3
MICRO_BATCH = 4
WORKERS = 2


def _log_lines(folder: Path) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(folder.glob("rank*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines


def _kill_a_worker(folder: Path, registered: Path, killed: dict[str, Any], stop: threading.Event) -> None:
    """SIGKILL rank 1's process of the first attempt once it has trained past ``KILL_AFTER_STEP`` and Ray Train has
    registered a checkpoint (``registered`` exists: Ray Train's controller collects reports at each poll of its
    workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, set in tests/conftest.py), and a checkpoint reported by a worker
    killed before that collection is lost with it)."""
    path = folder / "rank1.jsonl"
    while not stop.is_set():
        lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        starts = [x for x in lines if x.get("event") == "start"]
        steps = [x["step"] for x in lines if "step" in x]
        if (starts and starts[0]["restored_from"] is None and steps and max(steps) >= KILL_AFTER_STEP
                and registered.exists()):  # fmt: skip
            os.kill(starts[0]["pid"], signal.SIGKILL)
            killed.update(pid=starts[0]["pid"], after_step=max(steps))
            return
        time.sleep(0.02)


@pytest.mark.timeout(600)
def test_worker_killed_resumes_without_replaying_records(ray_local: Any, tmp_path: Path) -> None:
    world = generate_toyworld(tmp_path / "world", scenes=3, seed=5, chips_per_scene=10, val_chips_per_scene=2)
    write_mmrs(world.root, tags=("det",))
    train_file = world.root / "mmrs" / "toyworld_det_train.json"
    per_pass = len(json.loads(train_file.read_text()))
    records_dir = tmp_path / "records"
    cfg = parse_config({
        "run": {"name": "killed", "storage": str(tmp_path / "runs"), "metrics_log": str(tmp_path / "metrics.jsonl"),
                "record_log": str(records_dir), "max_failures": 1},
        "model": {"preset": "tiny", "stage": 2, "seed": 0},
        "data": {"train": [{"path": str(train_file), "image_root": str(world.root)}], "max_length": 256},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "schedule": {"max_steps": MAX_STEPS, "micro_batch_size": MICRO_BATCH, "log_every": 1, "eval_every": 0,
                     "checkpoint_every": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": WORKERS, "cpus_per_worker": 0.75},
    })  # fmt: skip
    global_batch = MICRO_BATCH * WORKERS
    assert MAX_STEPS * global_batch > per_pass  # the run goes on into a second pass

    killed: dict[str, Any] = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker, args=(records_dir, tmp_path / "runs" / "killed" / "checkpoint_manager_snapshot.json", killed, stop), daemon=True)
    killer.start()
    try:
        result = run_training(cfg, init_ray=False)
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "the run ended before a worker could be killed"

    # -- resumed from the last checkpoint before the kill; the step count went on from there to the end
    history = read_metrics_log(tmp_path / "metrics.jsonl")
    resumed = [h for h in history if h["resumed_from"] is not None]
    starts = [x for x in _log_lines(records_dir) if x.get("event") == "start"]
    assert resumed, ([(h["step"], h["resumed_from"]) for h in history], starts, killed)
    restored = resumed[0]["resumed_from"]
    assert restored % 2 == 0 and 2 <= restored <= killed["after_step"]
    assert [h["step"] for h in resumed] == list(range(restored + 1, MAX_STEPS + 1))
    assert result.metrics["step"] == MAX_STEPS
    assert result.metrics["samples"] == MAX_STEPS * global_batch

    # -- what the model saw: the first attempt up to the checkpoint, then the resumed attempt
    lines = _log_lines(records_dir)
    first = [x for x in lines if "step" in x and x["step"] <= restored and _attempt(lines, x) is None]
    rolled_back = [x for x in lines if "step" in x and x["step"] > restored and _attempt(lines, x) is None]
    second = [x for x in lines if "step" in x and _attempt(lines, x) == restored]
    trained = first + second
    assert len(trained) == MAX_STEPS * global_batch
    assert sorted({x["step"] for x in second}) == list(range(restored + 1, MAX_STEPS + 1))

    per_pass_seen = Counter((x["pass"], x["source"], x["index"]) for x in trained)
    duplicated = sum(n - 1 for n in per_pass_seen.values())
    assert duplicated == 0, [k for k, n in per_pass_seen.items() if n > 1]
    # and nothing skipped: the first pass was consumed whole, position by position
    pass0 = sorted(x["position"] for x in trained if x["pass"] == 0)
    assert pass0 == list(range(per_pass))

    outcome = Outcome(
        scenario="train-worker-killed",
        guarantee="A Ray Train worker killed mid-training: the run resumes from the last checkpoint, its step count "
        "continues, and no training record is seen twice (or skipped) within a pass.",
        planned=per_pass,
        written=len({(x["source"], x["index"]) for x in trained if x["pass"] == 0}),
        errored=0,
        duplicated=duplicated,
        missing=per_pass - len(pass0),
        unexpected=0,
        details={"killed_after_step": killed["after_step"], "resumed_from_step": restored, "steps": MAX_STEPS,
                 "records_rolled_back": len(rolled_back), "records_trained": len(trained),
                 "unit": "training records of one pass"},
    )  # fmt: skip
    assert outcome.exactly_once
    record(outcome)


def _attempt(lines: list[dict[str, Any]], entry: dict[str, Any]) -> Any:
    """``restored_from`` of the attempt that wrote ``entry``: the last start line of its rank before it."""
    attempt = None
    for x in lines:
        if x is entry:
            return attempt
        if x.get("rank") == entry["rank"] and x.get("event") == "start":
            attempt = x["restored_from"]
    raise ValueError("entry not in lines")
