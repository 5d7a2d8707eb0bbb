"""``earthgpt query``: DuckDB views over the output tables, spatial functions, partition pruning columns."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import shapely

from pipelines.archive.ledger import Ledger, UnitRecord
from pipelines.archive.store import OutputStore, stage_table
from pipelines.query import cli, connect

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def _publish(store: OutputStore, table: str, rows, unit: str = "u") -> None:
    """Stage rows as one unit and commit it through the ledger (readers see committed units only)."""
    ledger = Ledger(store)
    staged = stage_table(store, ledger.staging_dir(unit), table, unit, rows)
    ledger.commit(UnitRecord(unit_id=unit, run_id="r", output_key="k", publish=staged))


@pytest.fixture
def root(tmp_path):
    store = OutputStore(str(tmp_path))
    _publish(store, "detections", [
        ("toy-opt", "2024-05-01", {"scene_id": "s1", "tile_id": "t1", "detection_id": i, "label": lab,
                                   "datetime": T0, "output_key": "k"}, shapely.box(10, 45, 10 + 1e-3, 45 + 1e-3))
        for i, lab in enumerate(["ship", "ship", "building"])
    ])
    _publish(store, "detections", unit="u2", rows=[
        ("toy-sar", "2024-05-08", {"scene_id": "s2", "tile_id": "t1", "detection_id": 0, "label": "ship",
                                   "output_key": "k"}, shapely.box(4, 52, 4.001, 52.001)),
    ])
    # staged but never committed (the process stopped before the ledger record): never visible
    stage_table(store, "_staging/u3", "detections", "u3", [
        ("toy-sar", "2024-05-08", {"scene_id": "s3", "tile_id": "t1", "detection_id": 0, "label": "ship",
                                   "output_key": "k"}, shapely.box(4, 52, 4.001, 52.001))])
    return str(tmp_path)


def test_views_expose_partitions_and_geometry(root):
    con = connect(root)
    rows = con.sql("SELECT collection, date, label, count(*) FROM detections GROUP BY ALL ORDER BY ALL").fetchall()
    assert [(c, str(d), lab, n) for c, d, lab, n in rows] == [
        ("toy-opt", "2024-05-01", "building", 1), ("toy-opt", "2024-05-01", "ship", 2),
        ("toy-sar", "2024-05-08", "ship", 1)]
    (area,) = con.sql("SELECT round(sum(ST_Area(geometry)) * 1e6, 3) FROM detections").fetchone()
    assert area == pytest.approx(4.0)
    (inside,) = con.sql(
        "SELECT count(*) FROM detections WHERE ST_Intersects(geometry, ST_MakeEnvelope(9, 44, 11, 46))"
    ).fetchone()
    assert inside == 3


def test_tables_not_written_yet_are_empty_views_with_their_columns(root):
    con = connect(root)
    assert con.sql("SELECT count(*) FROM errors").fetchone() == (0,)
    cols = [c[0] for c in con.sql("DESCRIBE tiles").fetchall()]
    assert {"scene_id", "tile_id", "caption", "valid_fraction", "geometry", "collection", "date"} <= set(cols)
    assert con.sql("SELECT count(*) FROM runs").fetchone() == (0,)


def test_cli_prints_table_csv_and_json(root, capsys):
    assert cli(["SELECT label, count(*) AS n FROM detections GROUP BY ALL ORDER BY 1", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "building" in out and "ship" in out
    assert cli(["SELECT label, count(*) AS n FROM detections GROUP BY ALL ORDER BY 1", "--root", root,
                "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["label,n", "building,1", "ship,3"]
    assert cli(["SELECT count(*) AS n FROM detections", "--root", root, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 4}


def test_cli_reports_sql_errors_and_missing_roots(root, tmp_path, capsys):
    assert cli(["SELECT nope FROM detections", "--root", root]) == 1
    assert "nope" in capsys.readouterr().err
    assert cli(["SELECT 1", "--root", str(tmp_path / "absent")]) == 2
