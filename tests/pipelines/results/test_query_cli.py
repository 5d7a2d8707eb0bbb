"""``earthgpt query`` over toy-world outputs: committed files only, every output format, spatial SQL offline,
partition pruning on S3 shown by DuckDB's profile and by the requests the S3 server saw."""

from __future__ import annotations

import json
import logging

import duckdb
import geopandas as gpd
import pandas as pd
import pytest
import shapely

from pipelines.query import cli, connect
from pipelines.results import open_outputs
from tests.pipelines.results.conftest import INTERRUPTED_SCENE

pytestmark = pytest.mark.integration

SQL = ("SELECT scene_id, detection_id, label, confidence, geometry FROM detections "
       "WHERE label = 'ship' ORDER BY scene_id, detection_id")


def _geoms(frame: gpd.GeoDataFrame) -> gpd.GeoSeries:
    return frame.geometry.reset_index(drop=True)


def test_views_hold_committed_rows_only(any_root, toy_outputs):
    con = connect(any_root)
    for table in ("scenes", "tiles", "detections", "errors"):
        (n,) = con.sql(f"SELECT count(*) FROM {table} WHERE scene_id = '{INTERRUPTED_SCENE}'").fetchone()
        assert n == 0, table
        (runs,) = con.sql(f"SELECT count(*) FROM {table} WHERE run_id = '{toy_outputs.run_b}'").fetchone()
        assert runs == 0, table
    for table in ("scenes", "tiles", "detections", "errors", "runs"):
        (n,) = con.sql(f"SELECT count(*) FROM {table}").fetchone()
        assert n == len(open_outputs(any_root).read(table)), table


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "geojson", "table"])
def test_every_output_format_round_trips(any_root, tmp_path, fmt, capsys):
    want = open_outputs(any_root).detections(label="ship").sort_values(["scene_id", "detection_id"])
    out = tmp_path / f"ships.{fmt}"
    assert cli([SQL, "--root", any_root, "--format", fmt, "--out", str(out)]) == 0
    if fmt == "csv":
        got = pd.read_csv(out)
        assert list(got["detection_id"]) == list(want["detection_id"])
        assert gpd.GeoSeries.from_wkt(got["geometry"]).geom_equals_exact(_geoms(want), 1e-6).all()
    elif fmt == "json":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["detection_id"] for r in rows] == list(want["detection_id"])
        assert shapely.from_wkt(rows[0]["geometry"]).equals_exact(want.geometry.iloc[0], 1e-6)
    elif fmt == "parquet":
        got = gpd.read_parquet(out)
        assert got.crs.to_epsg() == 4326 and len(got) == len(want)
        assert got.geometry.reset_index(drop=True).geom_equals_exact(_geoms(want), 1e-9).all()
    elif fmt == "geojson":
        got = gpd.read_file(out)
        assert len(got) == len(want) and set(got["label"]) == {"ship"}
        assert got.geometry.reset_index(drop=True).geom_equals_exact(_geoms(want), 1e-6).all()
    else:
        text = out.read_text()
        assert "POLYGON" in text and text.count("ship") == min(40, len(want))
    # the same to standard output (parquet needs a file)
    if fmt != "parquet":
        assert cli([SQL, "--root", any_root, "--format", fmt]) == 0
        assert "ship" in capsys.readouterr().out


def test_format_errors_name_the_problem(toy_outputs, capsys):
    root = str(toy_outputs.root)
    assert cli(["SELECT label FROM detections", "--root", root, "--format", "geojson"]) == 2
    assert "no geometry column" in capsys.readouterr().err
    assert cli(["SELECT label FROM detections", "--root", root, "--format", "parquet"]) == 2
    assert "--out" in capsys.readouterr().err


def test_spatial_predicates_run_offline_and_agree_with_geopandas(any_root):
    dets = open_outputs(any_root).detections()
    x0, y0, x1, y1 = dets.total_bounds
    poly = shapely.Polygon([(x0, y0), (x1, (y0 + y1) / 2), (x0, y1)])
    want = set(dets.loc[dets.intersects(poly), "detection_id"].astype(int).astype(str) + dets.loc[dets.intersects(poly), "scene_id"])
    rows = connect(any_root).sql(
        f"SELECT detection_id, scene_id FROM detections WHERE ST_Intersects(geometry, ST_GeomFromText('{poly.wkt}'))"
    ).fetchall()
    assert 0 < len(rows) < len(dets)
    assert {f"{d}{s}" for d, s in rows} == want


def test_an_s3_query_reads_only_the_partitions_it_needs(s3_root, s3, toy_outputs):
    out = open_outputs(s3_root)
    sar_files = [f for f in out.files("detections") if "collection=toyworld-sar/" in f]
    all_files = out.files("detections")
    assert 0 < len(sar_files) < len(all_files)
    con = connect(s3_root)
    s3.clear_requests()
    profile = con.sql("EXPLAIN ANALYZE SELECT count(*) FROM detections WHERE collection = 'toyworld-sar'").fetchall()
    text = profile[0][1]
    assert f"Scanning Files: {len(sar_files)}/{len(all_files)}" in text, text
    assert f"Total Files Read: {len(sar_files)}" in text, text
    files_read = {path for method, path, _ in s3.requests
                  if method == "GET" and path.startswith("/results14/toy/detections/")}
    assert all("collection=toyworld-sar" in p for p in files_read), files_read
    touched = {path for _, path, _ in s3.requests if path.startswith("/results14/toy/detections/")}
    others = {p for p in touched if "collection=toyworld-sar" not in p}
    assert len(others) <= 1, others  # at most a metadata check (HEAD) of the file DuckDB binds the view's schema to
    (n,) = con.sql("SELECT count(*) FROM detections WHERE collection = 'toyworld-sar'").fetchone()
    assert n == len(out.detections(collection="toyworld-sar"))


@pytest.mark.parametrize("where", ["read", "schema"])
def test_a_query_whose_listed_file_is_gone_lists_again_once(any_root, tmp_path, monkeypatch, caplog, where):
    """A file deleted between the views' listing and its read (a fold published meanwhile) fails the statement, in
    DuckDB's read or in the footer read of the views' schema; it runs once more over a fresh listing, and a second
    failure is reported in one line."""
    from pipelines.query import run_query
    from pipelines.results.outputs import Outputs

    files, ends = Outputs.files, Outputs._oldest_and_newest
    gone = "detections/collection=toyworld-sar/date=2024-05-01/part-gone-u00000.parquet"
    calls = []

    def stale_first(self, table):
        listed = (files if where == "read" else ends)(self, table)
        if table == "detections":
            calls.append(table)
            return [*listed, gone] if len(calls) == 1 else listed
        return listed

    monkeypatch.setattr(Outputs, "files" if where == "read" else "_oldest_and_newest", stale_first)
    out = tmp_path / "n.json"
    with caplog.at_level(logging.INFO, logger="pipelines.query"):
        run_query(any_root, "SELECT count(*) AS n FROM detections", "json", str(out))
    (retry,) = [r for r in caplog.records if "listing the tables again" in r.getMessage()]
    assert issubclass(retry.exc_info[0], duckdb.IOException if where == "read" else FileNotFoundError)
    assert json.loads(out.read_text())["n"] == len(open_outputs(any_root).detections())

    monkeypatch.setattr(Outputs, "files", lambda self, table: [*files(self, table), gone])
    with pytest.raises((duckdb.IOException, FileNotFoundError)):
        run_query(any_root, "SELECT count(*) AS n FROM detections", "json", str(out))
    assert cli(["SELECT count(*) FROM detections", "--root", any_root]) == 1  # said in one line, no traceback
