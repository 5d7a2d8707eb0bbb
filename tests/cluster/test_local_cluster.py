"""A real multi-node Ray cluster on this machine (cluster/local/up.sh) runs the archive job submitted through the
Ray Jobs API with ``earthgpt submit``, exactly as a scheduled run would reach a production cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_PORT = 28365
GCS_PORT = 26479


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


def _alive_nodes(env: dict) -> list[dict]:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "list", "nodes", "--address", f"127.0.0.1:{GCS_PORT}",
         "--filter", "state=ALIVE", "--format", "json"],
        env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def test_archive_job_runs_on_a_two_node_cluster(cluster, tmp_path):
    import geopandas as gpd

    from catalogs.toyworld import generate_toyworld

    nodes = _alive_nodes(cluster)
    assert len(nodes) == 2
    assert sum("worker_node" in n.get("resources_total", {}) for n in nodes) == 1

    world = generate_toyworld(tmp_path / "world", scenes=2, seed=3, chips_per_scene=1,
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
        "tiling": {"size": 64, "overlap": 0, "min_valid_fraction": 0.5},
        "model": {"name_or_path": "tiny", "max_new_tokens": 8},
        "actors": {"min_actors": 1, "max_actors": 1, "num_cpus": 1, "batch_size": 16, "read_num_cpus": 0.5},
        "output": {"root": str(tmp_path / "out"), "wave_size": 2},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(config))

    env = dict(cluster, RAY_AUTH_MODE="token")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "submit", "run", str(cfg),
         "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--timeout", "400"],
        env=env, capture_output=True, text=True, timeout=480, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout

    tiles = gpd.read_parquet(tmp_path / "out" / "tiles")
    assert len(tiles) > 0
    assert tiles.groupby(["scene_id", "tile_id"]).size().max() == 1  # every tile once
    optical_sar = [s for s in world.scene_ids if "thermal" not in s]
    assert set(tiles["scene_id"]) == set(optical_sar)
