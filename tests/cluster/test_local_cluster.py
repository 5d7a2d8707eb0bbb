"""A real multi-node Ray cluster on this machine (cluster/local/up.sh) runs the archive job and the training job
submitted through the Ray Jobs API with ``earthgpt submit``, their code shipped in a runtime env built from this
checkout (as onto nodes running the official ``rayproject/ray`` image), and ``earthgpt jobs`` watches and stops them.

One cluster serves the whole module (it takes ~20 s to start on 2 cores)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.sockets import is_loopback, sockets_of_processes_naming

pytestmark = [pytest.mark.integration, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PORT = 28365
GCS_PORT = 26479
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


@pytest.fixture(scope="module")
def cluster():
    env = dict(os.environ, EARTHGPT_RAY_PORT=str(GCS_PORT), EARTHGPT_DASHBOARD_PORT=str(DASHBOARD_PORT),
               EARTHGPT_RAY_TEMP_DIR="/tmp/earthgpt-ray-test")
    up = subprocess.run([str(ROOT / "cluster/local/up.sh"), "1"], env=env, capture_output=True, text=True,
                        timeout=180)
    if up.returncode != 0:
        subprocess.run([str(ROOT / "cluster/local/down.sh")], env=env, capture_output=True, timeout=60)
        pytest.fail(f"cluster/local/up.sh failed:\n{up.stdout}\n{up.stderr}", pytrace=False)
    yield env
    subprocess.run([str(ROOT / "cluster/local/down.sh")], env=env, capture_output=True, timeout=60)


def test_every_node_listens_on_loopback_only(cluster):
    """Both nodes' Ray processes (GCS, raylets, agents, workers) listen on 127.0.0.1 only."""
    sockets = sockets_of_processes_naming(cluster["EARTHGPT_RAY_TEMP_DIR"])
    assert sum(name == "raylet" for _, _, name in sockets) >= 2, sockets  # both nodes were seen
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"the local cluster listens beyond loopback: {exposed}"


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime env a user of the official Ray image passes: this checkout's packages as ``py_modules``."""
    path = tmp_path_factory.mktemp("runtime-env") / "runtime_env.yaml"
    path.write_text(yaml.safe_dump({
        "py_modules": [str(ROOT / name) for name in ("earthgpt", "catalogs", "pipelines")],
        "excludes": ["__pycache__"],
    }))
    return path


def _earthgpt(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env=dict(env or os.environ, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )


def _submitted_id(done: subprocess.CompletedProcess) -> str:
    found = re.search(r"earthgpt submit: job (\S+) ", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    return found.group(1)


def _job_info(job_id: str) -> dict[str, Any]:
    done = _earthgpt("jobs", "status", job_id, "--json", "--address", ADDRESS)
    assert done.returncode != 2, done.stderr
    return json.loads(done.stdout)


def _archive_config(tmp_path: Path, scenes: int, model: str = "tiny", tile: int = 64) -> Path:
    from catalogs.toyworld import generate_toyworld

    world = generate_toyworld(tmp_path / "world", scenes=scenes, seed=3, chips_per_scene=1,
                              href_base=(tmp_path / "world").as_uri())
    config = {
        "catalog": {
            "embedded": {
                "collections": [str(p) for p in world.collection_paths.values()],
                "items": str(world.items_path),
            },
            "collections": ["toyworld-optical", "toyworld-sar"],
            "asset_prefixes": [str(tmp_path / "world")],
        },
        "tasks": ["caption", "detect"],
        "tiling": {"size": tile, "overlap": 0, "min_valid_fraction": 0.5},
        "model": {"name_or_path": model, "max_new_tokens": 8},
        "actors": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 16, "read_num_cpus": 0.5},
        "output": {"root": str(tmp_path / "out"), "commit_tiles": 40},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


def test_archive_job_in_a_runtime_env_watched_with_jobs_commands(cluster, runtime_env, tmp_path):
    import geopandas as gpd

    nodes = json.loads(subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address", f"127.0.0.1:{GCS_PORT}",
         "--filter", "state=ALIVE", "--format", "json"],
        # the nodes run in Ray's single-machine mode (loopback only): a GCS client must too
        env=dict(cluster, RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout)
    assert len(nodes) == 2 and sum("worker_node" in n.get("resources_total", {}) for n in nodes) == 1

    cfg = _archive_config(tmp_path, scenes=2, tile=128)  # 16 tiles a scene: the job, not the model, is tested
    done = _earthgpt("submit", "run", str(cfg), "--address", ADDRESS, "--runtime-env", str(runtime_env),
                     "--no-wait")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = _submitted_id(done)

    followed = _earthgpt("jobs", "logs", job_id, "--follow", "--timeout", "400", "--address", ADDRESS, timeout=480)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    status = _earthgpt("jobs", "status", job_id, "--address", ADDRESS)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr
    logs = _earthgpt("jobs", "logs", job_id, "--address", ADDRESS)
    assert logs.returncode == 0 and logs.stdout.strip() and logs.stdout in followed.stdout
    listed = _earthgpt("jobs", "list", "--address", ADDRESS, "--state", "SUCCEEDED")
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s+run\s", listed.stdout, re.M), listed.stdout

    # the code ran from the runtime env: the cluster holds the uploaded packages
    shipped = _job_info(job_id)["runtime_env"]["py_modules"]
    assert len(shipped) == 3 and all(uri.startswith("gcs://") for uri in shipped)

    tiles = gpd.read_parquet(tmp_path / "out" / "tiles")
    assert len(tiles) > 0
    assert tiles.groupby(["scene_id", "tile_id"]).size().max() == 1  # every tile once


def test_a_failing_job_fails_submit_and_a_stopped_job_ends_stopped(cluster, runtime_env, tmp_path):
    cfg = _archive_config(tmp_path, scenes=4)
    # valid config, but the job's own CLI refuses the argument: the job fails on the cluster
    failed = _earthgpt("submit", "run", str(cfg), "--address", ADDRESS, "--runtime-env", str(runtime_env),
                       "--", "--no-such-option", timeout=300)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert re.search(r"job \S+ FAILED", failed.stdout) and "--no-such-option" in failed.stdout

    done = _earthgpt("submit", "run", str(cfg), "--address", ADDRESS, "--runtime-env", str(runtime_env),
                     "--no-wait")
    job_id = _submitted_id(done)
    deadline = time.monotonic() + 120
    while _job_info(job_id)["status"] == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    stopped = _earthgpt("jobs", "stop", job_id, "--address", ADDRESS)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    status = _earthgpt("jobs", "status", job_id, "--address", ADDRESS)
    assert status.returncode == 1 and "STOPPED" in status.stdout
    unknown = _earthgpt("jobs", "status", "raysubmit_nosuchjob", "--address", ADDRESS)
    assert unknown.returncode == 2 and "raysubmit_nosuchjob" in unknown.stderr


def test_training_job_checkpoints_on_s3_and_exports_a_model(cluster, runtime_env, s3, tmp_path):
    from catalogs.toyworld import generate_toyworld
    from earthgpt.modeling import EarthGPTForConditionalGeneration
    from pipelines.mmrs import write_mmrs

    world = generate_toyworld(tmp_path / "world", scenes=2, seed=1, chips_per_scene=16, val_chips_per_scene=4)
    write_mmrs(world.root, tags=("det",))
    bucket = s3.make_bucket("cluster-train")
    config = {
        "run": {"name": "on-cluster", "storage": f"s3://{bucket}/runs", "export_dir": str(tmp_path / "export"),
                "max_failures": 0},
        "model": {"preset": "tiny", "stage": 2, "seed": 0},
        "data": {"train": [{"path": str(world.root / "mmrs/toyworld_det_train.json"), "image_root": str(world.root)}],
                 "max_length": 256},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "schedule": {"max_steps": 2, "micro_batch_size": 2, "grad_accum_steps": 1, "log_every": 1,
                     "checkpoint_every": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.75},
    }  # fmt: skip
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(config))

    done = _earthgpt("submit", "train", str(cfg), "--address", ADDRESS, "--runtime-env", str(runtime_env),
                     "--forward-credentials", "--timeout", "540", timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert re.search(r"job \S+ SUCCEEDED", done.stdout)
    # checkpoints went to S3 (moto), the export to the path the config names
    keys = s3.filesystem().find(f"{bucket}/runs/on-cluster")
    assert any(k.endswith("trainer_state.json") for k in keys), keys[:20]
    model = EarthGPTForConditionalGeneration.from_pretrained(str(tmp_path / "export"))
    state = json.loads((tmp_path / "export" / "training_state.json").read_text())
    assert state["step"] == 2 and len(state["data"]["positions"]) == 2  # each worker's place in the data stream
    assert sum(p.numel() for p in model.parameters()) > 0

    # the archive job, submitted to the same cluster, runs on the exported model
    archive = _archive_config(tmp_path / "archive", scenes=1, model=str(tmp_path / "export"), tile=128)
    done = _earthgpt("submit", "run", str(archive), "--address", ADDRESS, "--runtime-env", str(runtime_env),
                     "--timeout", "400", timeout=480)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    from pipelines.results.outputs import Outputs

    outputs = Outputs(str(tmp_path / "archive" / "out"))
    assert len(outputs.read("tiles", columns=["tile_id"])) > 0
    assert list(outputs.read("runs", columns=["model"])["model"]) == [str(tmp_path / "export")]
