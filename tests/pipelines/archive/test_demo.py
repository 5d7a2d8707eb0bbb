"""``earthgpt demo`` end to end in a fresh folder, then ``python -m pipelines.infer`` (the Ray job form) on its
outputs: everything is already committed, so it skips every scene, says why, and starts neither Ray nor the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.archive.store import OutputStore, read_table

pytestmark = [pytest.mark.integration, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[3]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"})
    return env


def test_demo_runs_from_nothing_and_a_rerun_skips_everything(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "demo", "--out", str(out), "--scenes", "3"],
        capture_output=True, text=True, timeout=900, cwd=REPO, env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    for expected in ("[1/3] toy world", "[2/3] archive job", "[1] toyworld-", "committed unit", "[3/3] quicklook",
                     "scenes   matched 3", "tiles/s", "detections"):
        assert expected in stdout, expected
    if not (REPO / "models" / "earthgpt-toy" / "config.json").exists():
        assert "RANDOMLY INITIALISED" in stdout
    assert (out / "quicklook.png").stat().st_size > 10_000
    store = OutputStore(str(out / "outputs"))
    assert len(read_table(store, "scenes")) == 3
    tiles = read_table(store, "tiles")
    runs = read_table(store, "runs")
    assert runs.iloc[0]["tiles_planned"] == len(tiles)

    # the same job as a Ray job would submit it: every scene is committed already
    config = yaml.safe_load((REPO / "configs" / "infer" / "demo.yaml").read_text())
    world = out / "toyworld"
    config["catalog"]["embedded"] = {
        "collections": [str(p) for p in sorted((world / "stac" / "collections").glob("*.json"))],
        "items": str(world / "stac" / "items.ndjson"),
    }
    config["catalog"]["asset_prefixes"] = [(world / "cogs").as_uri()]
    config["model"]["name_or_path"] = runs.iloc[0]["model"]
    config["output"]["root"] = str(out / "outputs")
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config))
    again = subprocess.run([sys.executable, "-m", "pipelines.infer", str(path)], capture_output=True, text=True,
                           timeout=300, cwd=REPO, env=_env())
    assert again.returncode == 0, again.stderr[-3000:]
    # incremental: the items at the last run's watermark are listed again (one page), all committed: no Ray, no model
    assert "nothing to do: 3 items listed, all committed" in again.stdout, again.stdout
    assert "processed 0" in again.stdout and "skipped 3" in again.stdout
    assert len(read_table(store, "tiles")) == len(tiles)
