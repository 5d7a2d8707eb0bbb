"""``open_outputs``: every table and filter, eager and dask, on a local root and its S3 copy; committed units only."""

from __future__ import annotations

import functools
import posixpath
import shutil
from pathlib import Path

import fsspec
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely

from pipelines.archive.store import TABLES
from pipelines.results import open_outputs
from tests.pipelines.results.conftest import BROKEN_SCENE, INTERRUPTED_SCENE

pytestmark = pytest.mark.integration

KEYS = {
    "scenes": ["collection", "scene_id"],
    "tiles": ["collection", "scene_id", "tile_id"],
    "detections": ["collection", "scene_id", "detection_id"],
    "errors": ["collection", "scene_id", "tile_id", "run_id"],
    "runs": ["run_id"],
}


def _keys(frame: pd.DataFrame, table: str) -> set[tuple]:
    return set(frame[KEYS[table]].astype(str).itertuples(index=False, name=None))


@functools.cache  # read once per root and table; callers only read the frame
def _all(root: str, table: str) -> gpd.GeoDataFrame:
    """The reference, without the reader under test: the committed units found in the ledger by hand, then each of
    their files of ``table`` read with plain geopandas, its Hive partitions (``collection=``, ``date=``) added from
    the path."""
    fs, base = fsspec.core.url_to_fs(root)
    records = fs.glob(f"{base}/_ledger/*.parquet")
    units = {posixpath.basename(path)[: -len(".parquet")] for path in records}
    for path in records:
        with fs.open(path, "rb") as f:
            ledger = pq.read_table(f)
        if "unit_id" in ledger.column_names:
            units |= {u for u in ledger.column("unit_id").to_pylist() if u}
    frames = []
    for path in sorted(fs.glob(f"{base}/{table}/**/part-*.parquet")):
        if posixpath.basename(path)[len("part-") : -len(".parquet")] not in units:
            continue  # an interrupted run's files, copied to the final partitions: not committed
        with fs.open(path, "rb") as f:
            frame = gpd.read_parquet(f)
        for part in path.split("/"):
            if "=" in part:
                name, value = part.split("=", 1)
                frame[name] = value
        frames.append(frame)
    assert frames, f"no committed {table} file under {root}"
    frame = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)
    assert len(frame) == len(_keys(frame, table))
    return frame


def test_every_table_reads_only_committed_units(any_root, toy_outputs):
    out = open_outputs(any_root)
    assert toy_outputs.uncommitted_unit not in out.committed_units
    for table in TABLES:
        frame = out.read(table)
        assert isinstance(frame, gpd.GeoDataFrame) and frame.crs.to_epsg() == 4326
        if table != "runs":
            assert set(frame["unit_id"]) <= out.committed_units
            assert INTERRUPTED_SCENE not in set(frame["scene_id"]), table
            assert toy_outputs.run_b not in set(frame["run_id"]), table
            assert {"collection", "date"} <= set(frame.columns)
        lazy = out.read_dask(table).compute()
        assert _keys(lazy, table) == _keys(frame, table)
    # the uncommitted unit's files are there, under the final partitions, and still not read
    for rel in toy_outputs.uncommitted_files:
        assert (toy_outputs.root / rel).is_file()
    assert len(out.scenes()) == 3
    assert set(out.errors()["scene_id"]) == {BROKEN_SCENE}
    runs = out.runs().set_index("run_id")
    assert runs.loc[toy_outputs.run_a, "status"] == "ok_with_errors"
    assert runs.loc[toy_outputs.run_b, "status"] == "interrupted"  # the run is recorded, its rows are not


def test_the_interrupted_unit_shows_up_once_committed(tmp_path, toy_outputs):
    # control: the same files become visible when their unit has a ledger record, so the filter is what hides them
    root = tmp_path / "copy"
    shutil.copytree(toy_outputs.root, root)
    before = open_outputs(str(root))
    assert INTERRUPTED_SCENE not in set(before.scenes()["scene_id"])
    record = next((root / "_ledger").glob("*.parquet"))
    shutil.copyfile(record, root / "_ledger" / f"{toy_outputs.uncommitted_unit}.parquet")
    after = open_outputs(str(root))
    assert INTERRUPTED_SCENE in set(after.scenes()["scene_id"])
    assert INTERRUPTED_SCENE in set(after.tiles()["scene_id"])


FILTERS = [
    ("collection", "toyworld-sar", lambda f: f["collection"] == "toyworld-sar"),
    ("collection", ["toyworld-sar", "toyworld-thermal"], lambda f: f["collection"].isin(["toyworld-sar",
                                                                                          "toyworld-thermal"])),
    ("start", "2024-05-08", lambda f: f["datetime"] >= pd.Timestamp("2024-05-08", tz="UTC")),
    ("end", "2024-05-08", lambda f: f["datetime"] < pd.Timestamp("2024-05-09", tz="UTC")),
    ("scene", "toy-sar-000-s0", lambda f: f["scene_id"] == "toy-sar-000-s0"),
]


@pytest.mark.parametrize("table", ["scenes", "tiles", "detections", "errors"])
@pytest.mark.parametrize("name,value,expect", FILTERS, ids=[f"{n}={v}" for n, v, _ in FILTERS])
def test_common_filters_match_pandas(any_root, table, name, value, expect):
    full = _all(any_root, table)
    got = open_outputs(any_root).read(table, **{name: value})
    want = full[expect(full)]
    assert _keys(got, table) == _keys(want, table)
    if table in ("scenes", "tiles", "detections") and name != "end":
        assert len(want) > 0, f"{name}={value} selects nothing in {table}: the test would prove nothing"


def test_sensor_label_confidence_run_and_output_key_filters(any_root, toy_outputs):
    out = open_outputs(any_root)
    scenes = _all(any_root, "scenes")
    sar = set(scenes.loc[scenes["sensor"] == "sar", "collection"])
    for table in ("scenes", "tiles", "detections"):
        full = _all(any_root, table)
        got = out.read(table, sensor="sar")
        assert len(got) and _keys(got, table) == _keys(full[full["collection"].isin(sar)], table)
        key = full["output_key"].iloc[0]
        assert _keys(out.read(table, output_key=key), table) == _keys(full, table)
        assert out.read(table, output_key="no-such-key").empty
        assert _keys(out.read(table, run=toy_outputs.run_a), table) == _keys(full, table)
    dets = _all(any_root, "detections")
    ships = out.detections(label="ship", min_confidence=0.7)
    want = dets[(dets["label"] == "ship") & (dets["confidence"] >= 0.7)]
    assert 0 < len(want) < len(dets) and _keys(ships, "detections") == _keys(want, "detections")
    tiles = _all(any_root, "tiles")
    assert tiles["class_label"].isna().all() and out.tiles(label="harbor").empty  # classify was not asked
    runs = out.runs(run="latest")
    assert list(runs["run_id"]) == [toy_outputs.run_b] == [out.latest_run]
    assert set(out.runs(start="2000-01-01")["run_id"]) == {toy_outputs.run_a, toy_outputs.run_b}


@pytest.mark.parametrize("table", ["scenes", "tiles", "detections"])
def test_polygon_query_returns_what_geopandas_spatial_filter_returns(any_root, table):
    full = _all(any_root, table)
    # a triangle over part of the SAR scene: crosses tiles and detections, not axis-aligned
    sar = full[full["collection"] == "toyworld-sar"].total_bounds
    x0, y0, x1, y1 = sar
    poly = shapely.Polygon([(x0 - 0.001, y0 - 0.001), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 + 0.001)])
    want = full[full.intersects(poly)]
    got = open_outputs(any_root).read(table, geometry=poly)
    assert 0 < len(want) < len(full)
    assert _keys(got, table) == _keys(want, table)
    # the same through GeoJSON and WKT, lazily, and by bbox
    out = open_outputs(any_root)
    assert _keys(out.read_dask(table, geometry=shapely.geometry.mapping(poly)).compute(), table) == _keys(want, table)
    assert _keys(out.read(table, geometry=poly.wkt), table) == _keys(want, table)
    box = shapely.box(*poly.bounds)
    assert _keys(out.read(table, bbox=poly.bounds), table) == _keys(full[full.intersects(box)], table)


def test_dask_variants_are_lazy_and_prune_partitions(any_root):
    out = open_outputs(any_root)
    every = out.detections_dask()
    sar = out.detections_dask(collection="toyworld-sar", label="ship")
    assert type(every).__module__.startswith("dask_geopandas")
    assert sar.npartitions < every.npartitions  # files of other collections are not part of the graph
    got = sar.compute()
    want = out.detections(collection="toyworld-sar", label="ship")
    assert len(got) > 0 and _keys(got, "detections") == _keys(want, "detections")
    assert list(got.columns) == list(want.columns)
    per_scene = out.tiles_dask(columns=["scene_id", "detections"]).groupby("scene_id")["detections"].sum().compute()
    tiles = out.tiles()
    pd.testing.assert_series_equal(per_scene.sort_index(), tiles.groupby("scene_id")["detections"].sum().sort_index(),
                                   check_names=False, check_dtype=False, check_index_type=False)
    for method in ("scenes_dask", "errors_dask", "runs_dask"):
        assert len(getattr(out, method)().compute()) == len(getattr(out, method.removesuffix("_dask"))())


def test_a_dask_collection_whose_file_was_replaced_says_to_make_it_again(toy_outputs, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(toy_outputs.root, root)
    lazy = open_outputs(str(root)).detections_dask()
    gone = sorted(root.glob("detections/**/*.parquet"))[0]
    gone.unlink()  # as a fold's publish deletes the files it replaced
    with pytest.raises(FileNotFoundError, match="make the collection again"):
        lazy.compute()
    assert len(open_outputs(str(root)).detections_dask().compute()) == len(open_outputs(str(root)).detections())


def test_embeddings_open_the_group_named_by_the_scenes_table(any_root):
    out = open_outputs(any_root)
    row = out.scene_row("toy-sar-000-s0")
    ds = out.embeddings("toy-sar-000-s0")
    assert ds.embedding.dims == ("y", "x", "feature") and ds.attrs["scene_id"] == "toy-sar-000-s0"
    tiles = out.tiles(scene="toy-sar-000-s0")
    assert ds.sizes["y"] * ds.sizes["x"] == len(tiles)
    assert int(np.isfinite(ds.embedding.values).all(axis=-1).sum()) == int((tiles["status"] == "ok").sum())
    assert out.embeddings(row).identical(ds)


def test_embeddings_follow_a_moved_group(tmp_path, toy_outputs):
    # readers never build a group's path: they follow scenes.embeddings_group wherever it points
    root = tmp_path / "moved"
    shutil.copytree(toy_outputs.root, root)
    out = open_outputs(str(root))
    row = out.scene_row("toy-sar-000-s0")
    assert row["embeddings_group"] == f"{row['output_key']}/{row['collection']}/{row['scene_id']}"
    new_group = f"moved-{row['output_key']}/{row['collection']}/{row['scene_id']}"
    zarr_root = root / "embeddings.zarr"
    shutil.copytree(zarr_root / row["embeddings_group"], zarr_root / new_group)
    shutil.rmtree(zarr_root / row["embeddings_group"])
    for rel in out.files("scenes"):
        path = root / rel
        table = pq.read_table(path)
        if "toy-sar-000-s0" in table["scene_id"].to_pylist():
            groups = [new_group if s == "toy-sar-000-s0" else g for s, g in
                      zip(table["scene_id"].to_pylist(), table["embeddings_group"].to_pylist(), strict=True)]
            table = table.set_column(table.schema.get_field_index("embeddings_group"), "embeddings_group",
                                     __import__("pyarrow").array(groups))
            pq.write_table(table, path)
    ds = open_outputs(str(root)).embeddings("toy-sar-000-s0")
    assert ds.attrs["scene_id"] == "toy-sar-000-s0"


def test_bad_filters_are_refused_naming_the_field(toy_outputs):
    out = open_outputs(str(toy_outputs.root))
    with pytest.raises(ValueError, match="min_confidence"):
        out.tiles(min_confidence=0.5)
    with pytest.raises(ValueError, match="min_confidence"):
        out.detections(min_confidence=1.5)
    with pytest.raises(ValueError, match="bbox"):
        out.scenes(bbox=(1, 2, 3))
    with pytest.raises(ValueError, match="start"):
        out.scenes(start="last tuesday")
    with pytest.raises(ValueError, match="label"):
        out.scenes(label="ship")
    with pytest.raises(ValueError, match="no column"):
        out.tiles(columns=["nope"])
    with pytest.raises(KeyError, match="no committed scene"):
        out.embeddings(INTERRUPTED_SCENE)
    with pytest.raises(FileNotFoundError, match="root"):
        open_outputs(str(Path(toy_outputs.root) / "absent"))
