"""GeoParquet tables and the Zarr tile-grid store, locally and on a real S3 server (moto)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import xarray as xr
from pyproj import CRS

from pipelines.archive.store import (
    SCHEMAS,
    OutputStore,
    SceneGrid,
    build_frame,
    embeddings_group,
    ensure_parent_groups,
    open_scene_grid,
    read_table,
    stage_table,
    write_scene_grid,
)

T0 = datetime(2024, 5, 1, 10, 30, tzinfo=timezone.utc)


def _tile(scene: str, tile: str, caption: str | None = "a harbour", **kw) -> dict:
    return {"scene_id": scene, "tile_id": tile, "datetime": T0, "row": 0, "col": 0, "status": "ok",
            "caption": caption, "valid_fraction": 1.0, "run_id": "r1", "unit_id": "u1", "output_key": "k", **kw}


def test_build_frame_keeps_exact_types_and_refuses_unknown_columns():
    frame = build_frame("tiles", [_tile("s1", "t1", caption=None)], [shapely.box(10, 45, 10.1, 45.1)])
    assert str(frame["caption"].dtype) == "string[pyarrow]"  # all-null column still typed
    assert str(frame["row"].dtype) == "int32[pyarrow]"
    assert frame.crs.to_epsg() == 4326
    with pytest.raises(KeyError, match="bogus"):
        build_frame("tiles", [{"bogus": 1}], [None])


def test_stage_table_writes_geoparquet_1_1_per_partition(tmp_path):
    store = OutputStore(str(tmp_path))
    rows = [
        ("toy-opt", "2024-05-01", _tile("s1", "t1"), shapely.box(10, 45, 10.1, 45.1)),
        ("toy-opt", "2024-05-01", _tile("s1", "t2"), shapely.box(10.1, 45, 10.2, 45.1)),
        ("toy-sar", "2024-05-02", _tile("s2", "t1"), shapely.box(11, 45, 11.1, 45.1)),
    ]
    staged = stage_table(store, "_staging/u1", "tiles", "u1", rows)
    assert [s.final for s in staged] == [
        "tiles/collection=toy-opt/date=2024-05-01/part-u1.parquet",
        "tiles/collection=toy-sar/date=2024-05-02/part-u1.parquet",
    ]
    meta = pq.read_metadata(tmp_path / staged[0].staged).metadata
    geo = json.loads(meta[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    assert "covering" in geo["columns"]["geometry"]  # bbox column for spatial pruning
    assert CRS.from_json_dict(geo["columns"]["geometry"]["crs"]).to_epsg() == 4326


def test_tables_union_across_units_and_read_with_geopandas_and_duckdb(tmp_path):
    store = OutputStore(str(tmp_path))
    for unit, caption in (("u1", "ships"), ("u2", None)):  # second unit has an all-null caption column
        staged = stage_table(store, f"_staging/{unit}", "tiles", unit,
                             [("toy", "2024-05-01", _tile(f"s-{unit}", "t1", caption=caption), shapely.box(0, 0, 1, 1))])
        for f in staged:
            store.move(f.staged, f.final)
    frame = read_table(store, "tiles")
    assert sorted(frame["scene_id"]) == ["s-u1", "s-u2"]
    assert set(frame["collection"].astype(str)) == {"toy"} and set(frame["date"].astype(str)) == {"2024-05-01"}
    assert frame.geometry.is_valid.all() and frame.crs.to_epsg() == 4326
    con = duckdb.connect()
    got = con.sql(
        f"SELECT collection, date, count(*) AS n, count(caption) AS captions "
        f"FROM read_parquet('{tmp_path}/tiles/**/*.parquet', hive_partitioning=true) GROUP BY ALL"
    ).fetchall()
    assert [(c, str(d), n, k) for c, d, n, k in got] == [("toy", "2024-05-01", 2, 1)]


def test_every_schema_round_trips_an_empty_and_a_full_row(tmp_path):
    store = OutputStore(str(tmp_path))
    for table, schema in SCHEMAS.items():
        row = {name: None for name in schema.names}
        row["scene_id" if "scene_id" in row else "run_id"] = "x"
        staged = stage_table(store, "_s", table, "u", [("c", "2024-01-01", row, None)])
        back = pq.read_table(tmp_path / staged[0].staged)
        assert back.schema.field("geometry") is not None
        for name in schema.names:
            assert back.schema.field(name).type == schema.field(name).type, (table, name)


def _grid(rows=3, cols=4, d=8, crs="EPSG:32633") -> SceneGrid:
    rng = np.random.default_rng(0)
    return SceneGrid(
        collection="toy-opt", scene_id="scene-1", crs=crs,
        transform=(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0),
        rows=np.arange(rows) * 48, cols=np.arange(cols) * 48, tile_size=64,
        embedding=rng.normal(size=(rows, cols, d)).astype(np.float32),
        valid_fraction=np.ones((rows, cols), np.float32), attrs={"run_id": "r1"}, output_key="key1",
    )


def _check_grid(ds: xr.Dataset, grid: SceneGrid) -> None:
    assert ds["embedding"].dims == ("y", "x", "feature")
    assert ds["embedding"].chunks is not None  # dask-backed, lazy
    np.testing.assert_allclose(ds["embedding"].values, grid.embedding)
    # tile centres in the scene CRS: 10 m pixels, 64-px tiles with stride 48
    np.testing.assert_allclose(ds["x"].values, 500_000 + 10 * (np.arange(grid.cols.size) * 48 + 32))
    np.testing.assert_allclose(ds["y"].values, 5_000_000 - 10 * (np.arange(grid.rows.size) * 48 + 32))
    assert CRS.from_wkt(ds["spatial_ref"].attrs["crs_wkt"]) == CRS.from_user_input(grid.crs)
    assert ds["embedding"].attrs["grid_mapping"] == "spatial_ref"
    assert ds.attrs["scene_id"] == grid.scene_id


def test_zarr_scene_grid_opens_with_xarray_in_scene_crs(tmp_path):
    store = OutputStore(str(tmp_path))
    grid = _grid()
    files = write_scene_grid(store, grid)
    group = embeddings_group("key1", "toy-opt", "scene-1")
    assert group == "key1/toy-opt/scene-1"
    assert all(f.startswith(f"embeddings.zarr/{group}/") for f in files)
    ensure_parent_groups(store, group)
    ds = xr.open_zarr(str(tmp_path / "embeddings.zarr"), group=group)
    _check_grid(ds, grid)
    _check_grid(xr.open_zarr(str(tmp_path / "embeddings.zarr" / group)), grid)
    # whole-chunk writes: one chunk per array per scene
    assert ds["embedding"].encoding["chunks"] == grid.embedding.shape
    # the group consolidates its own metadata; nothing above it is rewritten per scene
    root_meta = json.loads((tmp_path / "embeddings.zarr" / "zarr.json").read_text())
    assert "consolidated_metadata" not in root_meta or not root_meta["consolidated_metadata"]


def test_zarr_scene_grid_stages_under_a_folder(tmp_path):
    store = OutputStore(str(tmp_path))
    files = write_scene_grid(store, _grid(), under="_staging/u1")
    assert files and all((tmp_path / "_staging/u1" / f).is_file() for f in files)
    assert not (tmp_path / "embeddings.zarr").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # opened with its own consolidated metadata, no fallback
def test_zarr_scene_grid_rewrite_replaces_group(tmp_path):
    store = OutputStore(str(tmp_path))
    write_scene_grid(store, _grid(rows=5, cols=5))
    smaller = _grid(rows=2, cols=3)
    write_scene_grid(store, smaller)
    ensure_parent_groups(store, embeddings_group("key1", "toy-opt", "scene-1"))
    _check_grid(open_scene_grid(store, "key1", "toy-opt", "scene-1"), smaller)


@pytest.mark.integration
def test_tables_and_zarr_on_s3(s3):
    s3.make_bucket("sinks-test")
    store = OutputStore("s3://sinks-test/out")
    staged = stage_table(store, "_staging/u1", "detections", "u1", [
        ("toy", "2024-05-01", {"scene_id": "s1", "tile_id": "t1", "detection_id": 0, "label": "ship",
                               "confidence": 0.9, "output_key": "k"}, shapely.box(10, 45, 10.001, 45.001)),
    ])
    store.move(staged[0].staged, staged[0].final)
    assert store.glob("detections/**/*.parquet") == [staged[0].final]
    frame = read_table(store, "detections")
    assert list(frame["label"]) == ["ship"] and frame.geometry.is_valid.all()
    raw = s3.filesystem().cat_file(f"sinks-test/out/{staged[0].final}")
    assert json.loads(pq.read_metadata(io.BytesIO(raw)).metadata[b"geo"])["version"] == "1.1.0"

    grid = _grid()
    write_scene_grid(store, grid)
    group = embeddings_group("key1", "toy-opt", "scene-1")
    ensure_parent_groups(store, group)
    _check_grid(open_scene_grid(store, "key1", "toy-opt", "scene-1"), grid)
    ds = xr.open_zarr("s3://sinks-test/out/embeddings.zarr", group=group,
                      storage_options={"endpoint_url": s3.endpoint_url})
    _check_grid(ds, grid)


@pytest.mark.integration
def test_a_staged_zarr_group_on_s3_is_one_put_a_file(s3):
    """A scene's group staged on an object store is made in memory and uploaded in one concurrent call: one PUT per
    file and nothing else (through zarr's fsspec store each array listed and probed its prefix first, ~80 requests
    one after another per scene)."""
    s3.make_bucket("zarr-stage-count")
    store = OutputStore("s3://zarr-stage-count/out")
    grid = _grid()
    s3.clear_requests()
    files = write_scene_grid(store, grid, under="_staging/u1")
    methods = [m for m, _, _ in s3.requests]
    assert len(files) >= 10 and methods == ["PUT"] * len(files), methods
    group = embeddings_group("key1", "toy-opt", "scene-1")
    for rel in files:  # as the commit publishes them
        store.move(f"_staging/u1/{rel}", rel)
    ensure_parent_groups(store, group)
    _check_grid(open_scene_grid(store, "key1", "toy-opt", "scene-1"), grid)


def test_docs_outputs_documents_every_column():
    """docs/outputs.md has a table row for every column of every table (and only real columns)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "outputs.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    for table, schema in SCHEMAS.items():
        (section,) = [s for s in sections if s.startswith(f"`{table}`")]
        documented = set()
        for line in section.splitlines():
            if line.startswith("| `"):
                documented.update(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
        if table != "runs":  # the shared columns are documented once, above
            (shared,) = [s for s in sections if s.startswith("Columns shared")]
            documented.update(re.findall(r"^\| `([a-z_]+)`", shared, flags=re.MULTILINE))
        missing = set(schema.names) | {"geometry"}
        assert missing <= documented, (table, sorted(missing - documented))
        assert documented - set(schema.names) <= {"geometry", "bbox", "collection", "date"}, (table, documented)
