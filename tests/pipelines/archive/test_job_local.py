"""The whole job on local Ray with local outputs and the embedded catalog (``rustac serve``), using the oracle model
stage: a crash loses at most the unit in flight, an updated item replaces its rows (no duplicates)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import geopandas as gpd
import pytest

from pipelines.archive.config import parse_config
from pipelines.archive.job import run
from pipelines.archive.store import OutputStore, read_table
from tests.pipelines.oracle import oracle_stage

pytestmark = pytest.mark.integration


def _config(world, items_path: Path, root: Path, commit_tiles: int):
    return parse_config({
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(items_path)},
                    "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
                    "asset_prefixes": [(world.root / "cogs").as_uri()]},
        "tiling": {"size": 64, "overlap": 24, "min_valid_fraction": 0.5},
        "actors": {"read_num_cpus": 0.5},
        "output": {"root": str(root), "commit_tiles": commit_tiles, "commit_seconds": None},
    })


@pytest.fixture(scope="module")
def oracle(world):
    truth = gpd.read_parquet(world.ground_truth_path).drop(columns="geometry")
    return oracle_stage(truth.to_dict("records"))


def _keys(store: OutputStore, table: str) -> Counter:
    frame = read_table(store, table)
    cols = {"scenes": ["scene_id"], "tiles": ["scene_id", "tile_id"],
            "detections": ["scene_id", "detection_id"]}[table]
    return Counter(map(tuple, frame[cols].to_numpy().tolist()))


class _Crash(KeyboardInterrupt):
    pass


def test_crash_loses_at_most_the_unit_in_flight(world, oracle, ray_local, tmp_path):
    root = tmp_path / "out"
    config = _config(world, world.items_path, root, commit_tiles=1)  # every scene is a unit of its own

    def die_after_the_first_commit(line: str) -> None:
        if line.startswith("committed unit"):
            raise _Crash("killed")

    with pytest.raises(_Crash):
        run(config, say=die_after_the_first_commit, model_stage=oracle)
    store = OutputStore(str(root))
    assert len(_keys(store, "scenes")) == 1  # the first unit is committed and visible, the others are not
    assert [p.rsplit("-", 1)[1] for p in store.glob("_ledger/*.parquet")] == ["u00000.parquet"]
    assert read_table(store, "runs").iloc[0]["status"] == "interrupted"

    again = run(config, model_stage=oracle)
    assert again.scenes_skipped == 1 and again.scenes_processed == 2
    assert not store.glob("_staging/*")
    for table in ("scenes", "tiles", "detections"):
        keys = _keys(store, table)
        assert max(keys.values()) == 1, f"duplicate rows in {table}"
    assert len(_keys(store, "scenes")) == 3


def test_updated_item_is_reprocessed_and_replaces_its_rows(world, oracle, ray_local, tmp_path):
    root = tmp_path / "out"
    items = [json.loads(line) for line in world.items_path.read_text().splitlines()]
    path = tmp_path / "items.ndjson"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    first = run(_config(world, path, root, commit_tiles=100), model_stage=oracle)
    assert first.scenes_processed == 3
    store = OutputStore(str(root))
    before = {t: _keys(store, t) for t in ("scenes", "tiles", "detections")}

    items[1]["properties"]["updated"] = "2030-01-01T00:00:00Z"  # the provider reprocessed this scene
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    second = run(_config(world, path, root, commit_tiles=100), model_stage=oracle)
    assert second.scenes_processed == 1 and second.scenes_skipped == 2
    after = {t: _keys(store, t) for t in ("scenes", "tiles", "detections")}
    assert after == before  # same rows, each once: the old version's rows were rewritten out
    scenes = read_table(store, "scenes")
    updated = scenes.set_index("scene_id").loc[items[1]["id"]]
    assert str(updated["updated"]).startswith("2030-01-01") and updated["run_id"] == second.run_id

    third = run(_config(world, path, root, commit_tiles=100), model_stage=oracle)
    # incremental: only items updated since the second run's watermark are listed, and they are committed
    assert not third.full_scan and third.scenes_processed == 0 and third.scenes_skipped == third.scenes_matched == 1
