"""Commit units: atomic commit point, roll-forward and roll-back after a crash, incremental index, copy-on-write."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import shapely

from pipelines.archive.ledger import Ledger, UnitRecord, rewrite_without, skip_reason
from pipelines.archive.store import OutputStore, read_table, stage_table

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def _stage_unit(store: OutputStore, ledger: Ledger, unit: str, scenes: list[str], key: str = "k") -> UnitRecord:
    staging = ledger.staging_dir(unit)
    rows = [("toy", "2024-05-01", {"scene_id": s, "tile_id": "t0", "output_key": key, "unit_id": unit},
             shapely.box(0, 0, 1, 1)) for s in scenes]
    files = stage_table(store, staging, "tiles", unit, rows)
    return UnitRecord(unit_id=unit, run_id="r", output_key=key,
                      scenes=[("toy", s, "2024-05-01", T0) for s in scenes], publish=files)


def test_commit_publishes_and_indexes(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    ledger.commit(_stage_unit(store, ledger, "u1", ["a", "b"]))
    assert store.glob("tiles/**/*.parquet") == ["tiles/collection=toy/date=2024-05-01/part-u1.parquet"]
    assert not store.glob("_staging/*")
    index = ledger.committed("k")
    assert set(index) == {("toy", "a"), ("toy", "b")}
    assert index[("toy", "a")].updated == T0 and index[("toy", "a")].unit_id == "u1"
    assert ledger.committed("other-key") == {}


def test_crash_before_commit_point_is_rolled_back(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    _stage_unit(store, ledger, "u1", ["a"])  # staged, never committed: the process "died" here
    report = Ledger(store).recover()
    assert report.rolled_back == ["u1"] and report.rolled_forward == []
    assert not store.glob("_staging/*") and not store.glob("tiles/**/*.parquet")
    assert ledger.committed("k") == {}


def test_crash_after_commit_point_is_rolled_forward(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    unit = _stage_unit(store, ledger, "u1", ["a"])

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while publishing")

    monkeypatch.setattr(store, "move", die)
    with pytest.raises(KeyboardInterrupt):
        ledger.commit(unit)
    monkeypatch.undo()
    assert not store.glob("tiles/**/*.parquet")  # nothing published yet
    report = Ledger(store).recover()
    assert report.rolled_forward == ["u1"]
    assert store.glob("tiles/**/*.parquet") == ["tiles/collection=toy/date=2024-05-01/part-u1.parquet"]
    assert len(read_table(store, "tiles")) == 1
    assert Ledger(store).recover().rolled_forward == []  # idempotent


def test_skip_reason():
    from pipelines.archive.ledger import CommittedScene

    prev = CommittedScene("toy", "a", "2024-05-01", T0, "u1")
    assert skip_reason(None, T0) is None
    assert "already committed" in skip_reason(prev, T0)
    assert "already committed" in skip_reason(prev, T0 - timedelta(days=1))
    assert skip_reason(prev, T0 + timedelta(seconds=1)) is None
    assert "no `updated`" in skip_reason(CommittedScene("toy", "a", "d", None, "u1"), None)


def test_updated_scene_is_rewritten_out_of_old_files(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    ledger.commit(_stage_unit(store, ledger, "u1", ["a", "b"]))
    # scene "a" was updated in the catalog: unit u2 commits its new rows and rewrites u1's file without it
    unit = _stage_unit(store, ledger, "u2", ["a"])
    staged, delete = rewrite_without(store, ledger.staging_dir("u2"), "u2", ["tiles"],
                                     {("toy", "2024-05-01"): ["a"]}, output_key="k")
    unit.publish += staged
    unit.delete += delete
    ledger.commit(unit)
    tiles = read_table(store, "tiles")
    assert sorted(zip(tiles["scene_id"], tiles["unit_id"], strict=True)) == [("a", "u2"), ("b", "u1")]
    assert ledger.committed("k")[("toy", "a")].unit_id == "u2"


def test_rewrite_leaves_other_output_keys_alone(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    ledger.commit(_stage_unit(store, ledger, "u1", ["a"], key="other"))
    staged, delete = rewrite_without(store, "_staging/u2", "u2", ["tiles"], {("toy", "2024-05-01"): ["a"]}, "k")
    assert staged == [] and delete == []


def test_compact_folds_records_keeping_latest(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    for i in range(5):
        ledger.commit(_stage_unit(store, ledger, f"u{i}", ["a", f"s{i}"]))
    before = ledger.committed("k")
    assert ledger.compact(min_files=3) == 5
    assert len(store.glob("_ledger/*.parquet")) == 1
    assert ledger.committed("k") == before
    assert before[("toy", "a")].unit_id == "u4"


def test_compaction_keeps_every_unit_on_record(tmp_path):
    from pipelines.archive.ledger import Ledger, UnitRecord
    from pipelines.archive.store import OutputStore

    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    ledger.commit(UnitRecord("u1", "r", "k", scenes=[("c", "s1", "2024-05-01", None)]))
    ledger.commit(UnitRecord("u2", "r", "k", scenes=[]))  # only errors rows
    ledger.commit(UnitRecord("u3", "r", "k", scenes=[("c", "s1", "2024-05-01", None)]))  # supersedes u1's scene
    assert ledger.compact(min_files=1) == 3
    import pyarrow.parquet as pq

    (path,) = store.glob("_ledger/*.parquet")
    units = set(pq.read_table(store.full(path))["unit_id"].to_pylist())
    assert units == {"u1", "u2", "u3"}
    assert set(ledger.committed("k")) == {("c", "s1")} and ledger.committed("k")[("c", "s1")].unit_id == "u3"
    assert ledger.committed_table("k").num_rows == 1
