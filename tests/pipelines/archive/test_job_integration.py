"""The archive job against real servers: toy-world COGs on S3 (moto), the catalog in stac-fastapi-pgstac, outputs to
S3, EarthGPT actors on local Ray. First run, rerun (nothing new), two new items, bad scenes, oracle detections."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import xarray as xr
from pyproj import CRS

from catalogs.tiling import plan_tiles
from catalogs.toyworld import load_items
from pipelines.archive.config import parse_config
from pipelines.archive.job import run
from pipelines.archive.store import OutputStore, read_table
from pipelines.query import connect
from tests.pipelines.conftest import upload_world
from tests.pipelines.oracle import oracle_stage

pytestmark = pytest.mark.integration

TILE = 64
DATA_TABLES = ("scenes", "tiles", "detections", "errors")


_world = upload_world


def _config(pgstac_url: str, seed: int, bucket: str, prefix: str, root: str, **extra: Any) -> Any:
    data = {
        "catalog": {
            "url": pgstac_url,
            "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
            # only this test's world: other tests load other seeds into the same pgstac
            "filter": {"op": "like", "args": [{"property": "id"}, f"%-s{seed}"]},
            "asset_prefixes": [f"s3://{bucket}/{prefix}/cogs/"],
        },
        "tasks": ["caption", "detect"],
        "tiling": {"size": TILE, "overlap": 0, "min_valid_fraction": 0.5},
        "model": {"name_or_path": "tiny", "max_new_tokens": 8},
        "actors": {"min_actors": 1, "max_actors": 1, "batch_size": 32, "read_num_cpus": 0.5},
        "output": {"root": root, "commit_tiles": 60, "commit_seconds": None},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        data[section][field] = value
    return parse_config(data)


def _counts(store: OutputStore) -> dict[str, int]:
    return {t: len(read_table(store, t, columns=["scene_id"])) for t in DATA_TABLES}


@pytest.fixture(scope="module")
def archive(s3, pgstac, tmp_path_factory):
    """Five toy scenes on S3; the first three in pgstac (the last two arrive later)."""
    world = _world(tmp_path_factory.mktemp("world21"), "archive", "w21", scenes=5, seed=21, s3=s3)
    items = load_items(world.items_path)
    pgstac.load_collections([__import__("json").loads(p.read_text()) for p in world.collection_paths.values()])
    pgstac.load_items(items[:3])
    return world, items


def test_first_run_rerun_and_two_new_items(archive, pgstac, s3, ray_local, capsys):
    world, items = archive
    s3.make_bucket("results")
    config = _config(pgstac.url, 21, "archive", "w21", "s3://results/run")
    store = OutputStore(config.output.root)

    # --- first run: every planned tile exactly once, valid geometries, embeddings with CRS coordinates
    first = run(config)
    assert first.status == "ok" and first.scenes_processed == 3 and first.units_committed >= 2
    assert first.reconciles and first.tiles_failed == 0
    tiles = read_table(store, "tiles")
    expected = Counter()
    for item in items[:3]:
        h, w = item["properties"]["proj:shape"] if "proj:shape" in item["properties"] else \
            next(iter(item["assets"].values()))["proj:shape"]
        expected.update((item["id"], t.tile_id) for t in plan_tiles(h, w, TILE, 0))
    got = Counter(zip(tiles["scene_id"], tiles["tile_id"], strict=True))
    assert got == expected, "every planned tile exactly once in `tiles`"
    assert first.tiles_planned == sum(expected.values())
    assert tiles.geometry.is_valid.all() and tiles.crs.to_epsg() == 4326
    dets = read_table(store, "detections")
    assert dets.geometry.is_valid.all()
    scenes = read_table(store, "scenes")
    assert sorted(scenes["scene_id"]) == sorted(i["id"] for i in items[:3])
    assert set(scenes["collection"].astype(str)) == {"toyworld-optical", "toyworld-sar", "toyworld-thermal"}
    row = scenes.iloc[0]
    ds = xr.open_zarr("s3://results/run/embeddings.zarr", group=row["embeddings_group"],
                      storage_options={"endpoint_url": s3.endpoint_url})
    assert ds["embedding"].dims == ("y", "x", "feature") and ds["embedding"].shape[2] > 0
    assert CRS.from_wkt(ds["spatial_ref"].attrs["crs_wkt"]) == CRS.from_user_input(row["crs"])
    a, _, c, _, e, f = row["transform"]
    np.testing.assert_allclose(ds["x"].values[:2], [c + a * TILE / 2, c + a * 1.5 * TILE])
    np.testing.assert_allclose(ds["y"].values[0], f + e * TILE / 2)
    written = tiles[(tiles["scene_id"] == row["scene_id"]) & (tiles["status"] == "ok")]
    assert np.isfinite(ds["embedding"].values).all(axis=2).sum() == len(written)
    # DuckDB reads the same tables straight from S3
    con = connect(config.output.root)
    assert con.sql("SELECT count(*) FROM tiles").fetchone() == (len(tiles),)
    runs = read_table(store, "runs")
    assert len(runs) == 1 and runs.iloc[0]["tiles_planned"] == first.tiles_planned

    # --- rerun: nothing new, no new rows, a small fraction of the time, and it says what it skipped and why
    before = _counts(store)
    capsys.readouterr()
    second = run(config)
    out = capsys.readouterr().out
    assert second.scenes_processed == 0 and second.tiles_planned == 0 and not second.full_scan
    assert second.scenes_skipped == second.scenes_matched  # only items at the watermark are listed again
    assert _counts(store) == before
    assert "items updated since" in out
    if second.scenes_skipped:
        assert f"skipped {second.scenes_skipped} scenes: {second.scenes_skipped} already committed" in out
    ratio = second.wall_s / first.wall_s
    print(f"\nfirst run {first.wall_s:.1f} s, rerun {second.wall_s:.2f} s, ratio {ratio:.3f}")
    assert ratio < 0.2
    assert len(read_table(store, "runs")) == 2  # each run is recorded, data tables untouched

    # --- two new items: the third run processes exactly those
    pgstac.load_items(items[3:5])
    third = run(config)
    assert third.scenes_processed == 2 and third.reconciles
    tiles3 = read_table(store, "tiles")
    new = set(tiles3["scene_id"]) - set(tiles["scene_id"])
    assert new == {items[3]["id"], items[4]["id"]}
    assert Counter(zip(tiles3["scene_id"], tiles3["tile_id"], strict=True)).most_common(1)[0][1] == 1
    assert len(tiles3) == len(tiles) + third.tiles_planned


def test_bad_scenes_become_errors_rows_and_good_scenes_complete(s3, pgstac, ray_local, tmp_path):
    world = _world(tmp_path / "w22", "archive", "w22", scenes=3, seed=22, s3=s3)
    items = load_items(world.items_path)
    pgstac.load_collections([__import__("json").loads(p.read_text()) for p in world.collection_paths.values()])
    pgstac.load_items(items)
    fs = s3.filesystem()
    # scene 0: its reference band is truncated garbage; scene 1: one asset file is gone; scene 2: fine
    corrupt = items[0]["assets"]["red"]["href"].removeprefix("s3://")
    fs.pipe_file(corrupt, fs.cat_file(corrupt)[:700])
    missing = items[1]["assets"]["vh"]["href"].removeprefix("s3://")
    fs.rm_file(missing)
    s3.make_bucket("results")
    config = _config(pgstac.url, 22, "archive", "w22", "s3://results/bad")
    summary = run(config)
    store = OutputStore(config.output.root)
    errors = read_table(store, "errors")
    assert len(errors) == 2, errors[["scene_id", "error_type", "message"]]
    by_scene = dict(zip(errors["scene_id"], errors["error_type"], strict=True))
    assert by_scene == {items[0]["id"]: "CorruptRaster", items[1]["id"]: "AssetNotFound"}
    # the truncated file opens (its header is intact) and fails on the first pixel read
    assert dict(zip(errors["scene_id"], errors["stage"], strict=True)) == {items[0]["id"]: "read",
                                                                           items[1]["id"]: "open"}
    assert errors["tile_id"].isna().all() and errors.geometry.notna().all()
    assert list(read_table(store, "scenes")["scene_id"]) == [items[2]["id"]]
    assert set(read_table(store, "tiles")["scene_id"]) == {items[2]["id"]}
    assert summary.scenes_processed == 1 and summary.scenes_failed == 2 and summary.status == "ok_with_errors"
    assert summary.reconciles and summary.tiles_failed > 0
    run_row = read_table(store, "runs").iloc[0]
    assert run_row["tiles_planned"] == run_row["tiles_written"] + run_row["tiles_skipped"] + run_row["tiles_failed"]


def test_oracle_detections_through_ray_match_ground_truth(world, ray_local, tmp_path):
    truth = gpd.read_parquet(world.ground_truth_path)
    config = parse_config({
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(world.items_path)},
                    "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
                    "asset_prefixes": [(world.root / "cogs").as_uri()]},
        "tiling": {"size": TILE, "overlap": 24, "min_valid_fraction": 0.0},
        "actors": {"read_num_cpus": 0.5},
        "output": {"root": str(tmp_path / "out")},
    })
    t0 = time.perf_counter()
    summary = run(config, model_stage=oracle_stage(truth.drop(columns="geometry").to_dict("records")))
    assert summary.status == "ok" and summary.scenes_processed == 3, time.perf_counter() - t0
    dets = read_table(OutputStore(config.output.root), "detections")
    assert len(dets) == len(truth) and dets.geometry.is_valid.all()
    assert Counter(dets["label"]) == Counter(truth["label"])
    for scene_id, group in truth.groupby("scene_id"):
        mine = dets[dets["scene_id"] == scene_id]
        got = mine[["scene_x1", "scene_y1", "scene_x2", "scene_y2"]].to_numpy(float)
        want = np.array(group["pixel_box"].tolist(), float)
        assert np.abs(want[:, None] - got[None]).max(axis=2).min(axis=1).max() <= 1.0
