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


def _config(world, items_path: Path, root: Path, commit_tiles: int, **output: object):
    return parse_config({
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(items_path)},
                    "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
                    "asset_prefixes": [(world.root / "cogs").as_uri()]},
        "tiling": {"size": 64, "overlap": 24, "min_valid_fraction": 0.5},
        "actors": {"read_num_cpus": 0.5},
        "output": {"root": str(root), "commit_tiles": commit_tiles, "commit_seconds": None, **output},
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


def test_a_runs_unit_files_are_folded_per_partition_and_stay_correct_after_an_update(world, oracle, ray_local,
                                                                                      tmp_path):
    """Three optical scenes of one date, one unit each: the run folds each table's three files of that partition
    into one (one more ledger record), with the rows of a run that does not fold; a later update of one scene
    rewrites the folded file without its old rows."""
    items = [json.loads(line) for line in world.items_path.read_text().splitlines()]
    optical = next(i for i in items if i["collection"] == "toyworld-optical")
    items += [{**json.loads(json.dumps(optical)), "id": f"{optical['id']}-copy{k}"} for k in (1, 2)]  # same assets
    path = tmp_path / "items.ndjson"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    lines: list[str] = []
    folded = run(_config(world, path, tmp_path / "folded", commit_tiles=1), say=lines.append, model_stage=oracle)
    plain = run(_config(world, path, tmp_path / "plain", commit_tiles=1, fold_bytes=None), model_stage=oracle)
    assert folded.scenes_processed == plain.scenes_processed == 5 and folded.units_committed == 5
    # scenes and tiles: 3 files each (the copies have no ground truth, so the detections are one unit's file)
    assert folded.files_folded == 6 and plain.files_folded == 0
    assert any(line.startswith("folded 6 table files") for line in lines), lines
    store, ref = OutputStore(str(tmp_path / "folded")), OutputStore(str(tmp_path / "plain"))
    for table in ("scenes", "tiles", "detections"):
        assert _keys(store, table) == _keys(ref, table)
    for table in ("scenes", "tiles"):
        files = store.glob(f"{table}/collection=toyworld-optical/**/*.parquet")
        assert len(files) == 1 and "-fold0.parquet" in files[0], files
        assert len(ref.glob(f"{table}/collection=toyworld-optical/**/*.parquet")) == 3
    assert len(store.glob("_ledger/*.parquet")) == folded.units_committed + 1  # the fold is a unit of its own

    before = {t: _keys(store, t) for t in ("scenes", "tiles", "detections")}
    items[-1]["properties"]["updated"] = "2030-01-01T00:00:00Z"  # a copy in the folded files is reprocessed
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    again = run(_config(world, path, tmp_path / "folded", commit_tiles=1), model_stage=oracle)
    # one unit, which publishes the scene's new rows and the folded file rewritten without its old ones (for scenes
    # and tiles): the run folds those two again
    assert again.scenes_processed == 1 and again.files_folded == 4
    assert {t: _keys(store, t) for t in ("scenes", "tiles", "detections")} == before  # each row once
    for table in ("scenes", "tiles"):
        assert len(store.glob(f"{table}/collection=toyworld-optical/**/*.parquet")) == 1
    scenes = read_table(store, "scenes").set_index("scene_id")
    assert scenes.loc[items[-1]["id"], "run_id"] == again.run_id


def test_a_run_that_ends_before_its_fold_is_folded_by_the_next_run(world, oracle, ray_local, tmp_path):
    """A run killed after its last unit's commit, before its fold, leaves its files as committed and its name in
    the output key's fold state; the next run, a quiet night with nothing to process, folds them first thing, with
    every row kept once."""
    items = [json.loads(line) for line in world.items_path.read_text().splitlines()]
    optical = next(i for i in items if i["collection"] == "toyworld-optical")
    items += [{**json.loads(json.dumps(optical)), "id": f"{optical['id']}-copy{k}"} for k in (1, 2)]  # same assets
    path = tmp_path / "items.ndjson"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    config = _config(world, path, tmp_path / "out", commit_tiles=1)
    commits = 0

    def die_after_the_last_commit(line: str) -> None:
        nonlocal commits
        commits += line.startswith("committed unit")
        if commits == 5:
            raise _Crash("killed")

    with pytest.raises(_Crash):
        run(config, say=die_after_the_last_commit, model_stage=oracle)
    store = OutputStore(str(tmp_path / "out"))
    first = read_table(store, "runs").iloc[0]
    assert first["status"] == "interrupted" and first["files_folded"] == 0
    state = json.loads(store.read_bytes(f"_state/{config.output_key()}-fold.json"))
    assert state["runs"] == [first["run_id"]]
    for table in ("scenes", "tiles"):
        assert len(store.glob(f"{table}/collection=toyworld-optical/**/*.parquet")) == 3
    before = {t: _keys(store, t) for t in ("scenes", "tiles", "detections")}

    lines: list[str] = []
    quiet = run(config, say=lines.append, model_stage=oracle)
    assert quiet.scenes_processed == 0 and quiet.files_folded == 6
    assert any(line.startswith(f"folded 6 table files of earlier run {first['run_id']}") for line in lines), lines
    assert any(line.startswith("nothing to do") for line in lines), lines
    assert {t: _keys(store, t) for t in ("scenes", "tiles", "detections")} == before
    for table in ("scenes", "tiles"):
        files = store.glob(f"{table}/collection=toyworld-optical/**/*.parquet")
        assert len(files) == 1 and f"part-{quiet.run_id}-u00000-fold0.parquet" in files[0], files
    assert json.loads(store.read_bytes(f"_state/{config.output_key()}-fold.json"))["runs"] == []
    runs = read_table(store, "runs").set_index("run_id")
    assert runs.loc[quiet.run_id, "files_folded"] == 6

    again = run(config, model_stage=oracle)  # nothing named any more: nothing read or folded
    assert again.files_folded == 0 and again.scenes_processed == 0
