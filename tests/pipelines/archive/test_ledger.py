"""Commit units: atomic commit point, roll-forward and roll-back after a crash, incremental index, copy-on-write;
recovery under the output key's lease, which leaves live runs' staging alone; missing staged files fail loudly."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import shapely

from pipelines.archive.lease import Lease, LeaseLost
from pipelines.archive.ledger import Ledger, StagedFileMissing, UnitRecord, rewrite_without, skip_reason
from pipelines.archive.store import OutputStore, read_table, stage_table

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def _stage_unit(store: OutputStore, ledger: Ledger, unit: str, scenes: list[str], key: str = "k") -> UnitRecord:
    staging = ledger.staging_dir(unit)
    rows = [("toy", "2024-05-01", {"scene_id": s, "tile_id": "t0", "output_key": key, "unit_id": unit},
             shapely.box(0, 0, 1, 1)) for s in scenes]
    files = stage_table(store, staging, "tiles", unit, rows)
    return UnitRecord(unit_id=unit, run_id="r", output_key=key,
                      scenes=[("toy", s, "2024-05-01", T0) for s in scenes], publish=files)


def _recovering(store: OutputStore, key: str = "k", run_id: str = "rec") -> Ledger:
    """A ledger of a new run that holds the output key's lease (what every recovery needs)."""
    lease = Lease(store, key, run_id=run_id, ttl_s=60)
    lease.acquire()
    return Ledger(store, lease)


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
    report = _recovering(store).recover()
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
    recovering = _recovering(store)
    report = recovering.recover()
    assert report.rolled_forward == ["u1"]
    assert store.glob("tiles/**/*.parquet") == ["tiles/collection=toy/date=2024-05-01/part-u1.parquet"]
    assert len(read_table(store, "tiles")) == 1
    recovering.lease.release()
    assert _recovering(store, run_id="rec2").recover().rolled_forward == []  # idempotent


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


@pytest.mark.integration
def test_compaction_on_s3_deletes_the_folded_records_in_one_request(s3):
    store = OutputStore(f"s3://{s3.make_bucket('compact-test')}/out")
    ledger = Ledger(store)
    for i in range(5):
        ledger.commit(_scenes_unit(f"u{i}", ["a", f"s{i}"]))
    before = ledger.committed("k")
    s3.clear_requests()
    assert ledger.compact(min_files=3) == 5
    assert [m for m, path, _ in s3.requests if m == "DELETE" or "?delete" in path] == ["POST"], s3.requests
    assert len(store.glob("_ledger/*.parquet")) == 1
    assert ledger.committed("k") == before


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


# ------------------------------------------------------------------------------ one writer per output key


RUN_A, RUN_B = "20250101T000000Z-aaaaaa", "20250101T000001Z-bbbbbb"


def test_recovery_needs_the_lease(tmp_path):
    with pytest.raises(RuntimeError, match="lease"):
        Ledger(OutputStore(str(tmp_path))).recover()


def test_recovery_leaves_a_live_runs_staging_alone(tmp_path):
    """The overlap that lost rows: a second run's recovery deleted the staging of a run still in progress, which then
    committed its scenes with no rows. Now recovery skips units whose run holds a live lease, and the first run's
    commit publishes every row."""
    store = OutputStore(str(tmp_path))
    lease_a = Lease(store, "k", run_id=RUN_A, ttl_s=60)
    lease_a.acquire()
    ledger_a = Ledger(store, lease_a)
    unit = _stage_unit(store, ledger_a, f"{RUN_A}-u00000", ["a", "b"])
    # a run of another model (output key k2) starts meanwhile and recovers
    other = _recovering(store, key="k2", run_id=RUN_B)
    report = other.recover()
    assert report.left_live == [f"{RUN_A}-u00000"] and report.rolled_back == []
    assert store.glob(f"_staging/{RUN_A}-u00000/**/*.parquet")
    ledger_a.commit(unit)
    assert sorted(read_table(store, "tiles")["scene_id"]) == ["a", "b"]
    assert set(ledger_a.committed("k")) == {("toy", "a"), ("toy", "b")}


def test_recovery_rolls_back_a_dead_runs_staging(tmp_path):
    store = OutputStore(str(tmp_path))
    lease_a = Lease(store, "k", run_id=RUN_A, ttl_s=0.2)
    lease_a.acquire()
    _stage_unit(store, Ledger(store, lease_a), f"{RUN_A}-u00000", ["a"])
    import time

    time.sleep(0.3)  # run A's driver vanished: its lease lapses
    taker = Lease(store, "k", run_id=RUN_B, ttl_s=60)
    previous = taker.acquire()
    assert previous is not None and previous.run_id == RUN_A and "expired" in previous.dead_reason()
    report = Ledger(store, taker).recover()
    assert report.rolled_back == [f"{RUN_A}-u00000"] and not store.glob("_staging/*")


def test_committed_units_of_another_output_key_are_left_to_that_key(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    unit = _stage_unit(store, ledger, f"{RUN_A}-u00000", ["a"], key="k")
    monkeypatch.setattr(store, "move", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ledger.commit(unit)
    monkeypatch.undo()
    other = _recovering(store, key="k2", run_id=RUN_B)
    assert other.recover().left_other_key == [f"{RUN_A}-u00000"]
    other.lease.release()
    assert _recovering(store, key="k", run_id=RUN_B).recover().rolled_forward == [f"{RUN_A}-u00000"]
    assert len(read_table(store, "tiles")) == 1


def test_commit_with_a_missing_staged_file_commits_nothing(tmp_path):
    """Before, the record was written first and the publish skipped (or tripped on) the missing file: the scenes
    were on record as committed, with no rows, and never processed again."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    unit = _stage_unit(store, ledger, "u1", ["a"])
    store.remove(unit.publish[0].staged)
    with pytest.raises(StagedFileMissing, match="nothing of it was committed"):
        ledger.commit(unit)
    assert ledger.committed("k") == {} and not store.glob("_ledger/*")


def test_replay_that_finds_a_staged_file_gone_fails_loudly(tmp_path, monkeypatch):
    """A committed unit whose staged file is neither staged nor published cannot be finished: recovery says so
    (before, it skipped the file and the unit's scenes stayed committed without rows)."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    unit = _stage_unit(store, ledger, "u1", ["a"])
    monkeypatch.setattr(store, "move", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ledger.commit(unit)  # the record is written, the publish was cut short
    monkeypatch.undo()
    store.remove(unit.publish[0].staged)
    with pytest.raises(StagedFileMissing, match="u1 is committed but its staged file"):
        _recovering(store).recover()


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path):
    store = OutputStore(str(tmp_path))
    lease_a = Lease(store, "k", run_id=RUN_A, ttl_s=60)
    lease_a.acquire()
    ledger_a = Ledger(store, lease_a)
    unit = _stage_unit(store, ledger_a, f"{RUN_A}-u00000", ["a"])
    breaker = Lease(store, "k", run_id=RUN_B, ttl_s=60)
    assert breaker.acquire(force=True).run_id == RUN_A  # an operator's --break-lease
    with pytest.raises(LeaseLost, match=RUN_B):
        ledger_a.commit(unit)
    assert ledger_a.committed("k") == {}


def _stage_24(store: OutputStore, ledger: Ledger) -> tuple[UnitRecord, list[str]]:
    scenes = [f"s{k:02d}" for k in range(24)]
    staging = ledger.staging_dir("u1")
    files = []
    for k, scene in enumerate(scenes):  # one file per scene and date partition: 24 files to publish
        rows = [("toy", f"2024-05-{k + 1:02d}", {"scene_id": scene, "tile_id": "t0", "output_key": "k",
                                                  "unit_id": "u1"}, shapely.box(0, 0, 1, 1))]
        files += stage_table(store, staging, "tiles", "u1", rows)
    unit = UnitRecord(unit_id="u1", run_id="r", output_key="k",
                      scenes=[("toy", s, f"2024-05-{k + 1:02d}", T0) for k, s in enumerate(scenes)], publish=files)
    assert len(files) == 24
    return unit, scenes


@pytest.mark.integration
def test_a_unit_published_on_s3_and_cut_short_is_rolled_forward_once(s3):
    """On an object store a unit's files are copied concurrently, then the staging folder is deleted in bulk (one
    file after another they held the driver for seconds per unit: benchmarks/publish.py). A publish cut short after
    10 of its 24 copies is finished by the recovery: every file once, at its final path, nothing left staged."""
    import asyncio

    s3.make_bucket("publish-test")
    store = OutputStore("s3://publish-test/out")
    assert store.batch_copies
    ledger = Ledger(store)
    unit, scenes = _stage_24(store, ledger)
    copied: list[str] = []
    fs = store.fs
    real_copy = fs._cp_file

    async def copy_then_die(path1: str, path2: str, **kwargs: object) -> None:
        await asyncio.sleep(0.01 * len(copied))  # the first 10 finish before the 11th fails
        if len(copied) >= 10:
            raise OSError("killed while publishing")
        copied.append(path2)
        await real_copy(path1, path2, **kwargs)

    fs._cp_file = copy_then_die
    try:
        with pytest.raises(OSError, match="killed"):
            ledger.commit(unit)
    finally:
        del fs._cp_file
    published = store.glob("tiles/**/*.parquet")
    assert len(published) == 10 and len(store.glob("_staging/u1/**/*.parquet")) == 24  # on record, not finished
    report = _recovering(store).recover()
    assert report.rolled_forward == ["u1"]
    assert len(store.glob("tiles/**/*.parquet")) == 24 and not store.glob("_staging/**")
    tiles = read_table(store, "tiles")
    assert sorted(tiles["scene_id"]) == scenes


@pytest.mark.integration
def test_a_units_commit_on_s3_costs_about_two_requests_a_file(s3):
    """Copies (a HEAD and a CopyObject each) and bulk deletes: about 6 requests a file, moved one by one, before."""
    s3.make_bucket("publish-count")
    store = OutputStore("s3://publish-count/out")
    ledger = Ledger(store)
    unit, scenes = _stage_24(store, ledger)
    s3.clear_requests()
    ledger.commit(unit)
    requests = list(s3.requests)
    methods = [m for m, _, _ in requests]
    assert len(store.glob("tiles/**/*.parquet")) == 24 and not store.glob("_staging/**")
    assert methods.count("PUT") == 24 + 1  # the copies (CopyObject is a PUT) and the record
    # the staging folder is listed once (the check before the record) and its keys deleted in bulk from that listing
    assert sum("list-type" in path for _, path, _ in requests) == 1, requests
    assert sum("?delete" in path for _, path, _ in requests) == 1, requests
    assert len(methods) <= 2 * 24 + 8, methods


def _scenes_unit(unit: str, ids: list[str], key: str = "k", updated: datetime = T0) -> UnitRecord:
    # one collection and one date: a compacted file's order (output key, date, collection, id) is then the ids'
    return UnitRecord(unit, "r", key, scenes=[("c", s, "2024-05-01", updated) for s in ids])


def test_compaction_leaves_a_committed_unit_that_is_still_staged_to_recovery(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    for i in range(3):
        ledger.commit(_scenes_unit(f"u{i}", [f"s{i}"]))
    unit = _stage_unit(store, ledger, "u9", ["a"])

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while publishing")

    monkeypatch.setattr(store, "move", die)
    with pytest.raises(KeyboardInterrupt):
        ledger.commit(unit)  # its record is written, its file still staged
    monkeypatch.undo()
    # another output key's run compacts meanwhile: the three published records fold, u9's record stays
    assert ledger.compact(min_files=3) == 3
    assert sorted(store.glob("_ledger/*.parquet"))[-1] == "_ledger/u9.parquet"
    assert _recovering(store).recover().rolled_forward == ["u9"]
    assert len(read_table(store, "tiles")) == 1
    assert set(ledger.committed("k")) == {("c", "s0"), ("c", "s1"), ("c", "s2"), ("toy", "a")}


def test_compaction_folds_new_records_without_rewriting_a_large_base(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    for i in range(4):  # the base: 4 units of 100 scenes
        ledger.commit(_scenes_unit(f"b{i}", [f"s{i:02d}{j:03d}" for j in range(100)]))
    assert ledger.compact(min_files=4) == 4
    (base,) = store.glob("_ledger/*.parquet")
    # two nights of 2 small units each (one supersedes a base scene): folded beside the base, then together
    ledger.commit(_scenes_unit("n0", ["new0"]))
    ledger.commit(_scenes_unit("n1", ["s00000"], updated=T0 + timedelta(days=1)))
    assert ledger.compact(min_files=2) == 2
    assert base in store.glob("_ledger/*.parquet") and len(store.glob("_ledger/*.parquet")) == 2
    ledger.commit(_scenes_unit("n2", ["new2"]))
    ledger.commit(_scenes_unit("n3", ["new3"]))
    assert ledger.compact(min_files=2) == 3  # two records and the first night's file; the base stays
    assert base in store.glob("_ledger/*.parquet") and len(store.glob("_ledger/*.parquet")) == 2
    index = ledger.committed("k")
    assert len(index) == 403 and index[("c", "s00000")].unit_id == "n1"
    # once what is folded reaches an eighth of the base, the base is merged in: one file again
    for i in range(50):
        ledger.commit(_scenes_unit(f"m{i}", [f"more{i}"]))
    assert ledger.compact(min_files=2) == 52
    after = ledger.committed("k")
    assert len(store.glob("_ledger/*.parquet")) == 1
    assert len(after) == 453 and all(after[key] == entry for key, entry in index.items())


def test_a_lookup_of_a_few_ids_reads_only_the_row_groups_that_can_hold_them(tmp_path, monkeypatch):

    from pipelines.archive import ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "ROW_GROUP_ROWS", 100)
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    for u in range(10):  # 2,000 scenes of key k, 500 of another key, in 10 + 5 units
        ledger.commit(_scenes_unit(f"u{u}", [f"s{u * 200 + j:05d}" for j in range(200)]))
    for u in range(5):
        ledger.commit(_scenes_unit(f"o{u}", [f"s{u * 100 + j:05d}" for j in range(100)], key="other"))
    assert ledger.compact(min_files=15) == 15
    ledger.commit(_scenes_unit("late", ["s00150"], updated=T0 + timedelta(days=1)))  # a record beside the base
    read = _spy_row_groups(monkeypatch)
    ids = ["s00150", "s01999", "s00151", "missing"]
    entries = ledger.committed_entries("k", ids)
    whole = ledger.committed_table("k")
    expected = whole.filter(pa_is_in(whole["scene_id"], ids)).sort_by("scene_id")
    assert entries.sort_by("scene_id").to_pylist() == expected.to_pylist()
    assert {r["scene_id"]: r["unit_id"] for r in entries.to_pylist()} == {
        "s00150": "late", "s00151": "u0", "s01999": "u9"}
    # 25 row groups in the base (2,500 entries); s00150/s00151 share one, s01999 another; and the late record's one
    assert sorted(len(groups) for groups in read) == [1, 2]
    assert ledger.committed_entries("k", []).num_rows == 0
    assert ledger.committed_entries("other", ["s00150"]).to_pylist()[0]["unit_id"] == "o1"


def pa_is_in(column, ids):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.is_in(column, value_set=pa.array(ids))


def test_reads_list_the_ledger_again_when_a_compaction_removed_a_listed_record(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    for i in range(3):
        ledger.commit(_scenes_unit(f"u{i}", [f"s{i}"]))
    stale = store.glob("_ledger/*.parquet")
    Ledger(store).compact(min_files=3)  # another run folds the records after this one listed them
    real_glob = store.glob
    listings = []

    def glob(pattern):
        listings.append(pattern)
        return stale if len(listings) == 1 else real_glob(pattern)

    monkeypatch.setattr(store, "glob", glob)
    assert set(ledger.committed("k")) == {("c", "s0"), ("c", "s1"), ("c", "s2")} and len(listings) == 2
    listings.clear()
    assert ledger.committed_entries("k", ["s1"]).to_pylist()[0]["unit_id"] == "u1" and len(listings) == 2


def test_nightly_compactions_keep_a_few_tiers_and_rewrite_the_base_rarely(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    ledger.commit(_scenes_unit("base", [f"b{j:04d}" for j in range(2000)]))
    ledger.compact(min_files=1)
    (base,) = store.glob("_ledger/*.parquet")
    base_rewrites, most_files = 0, 1
    for night in range(40):  # 2 units of 10 scenes a night
        for u in range(2):
            ledger.commit(_scenes_unit(f"n{night:02d}u{u}", [f"n{night:02d}u{u}s{j}" for j in range(10)]))
        assert ledger.compact(min_files=2) >= 2
        files = store.glob("_ledger/*.parquet")
        most_files = max(most_files, len(files))
        if base not in files:  # the base was folded into a new one
            base_rewrites += 1
            base = max(files, key=lambda f: ledger._footer(f).num_rows)
    assert len(ledger.committed("k")) == 2000 + 40 * 20
    # 800 new entries over 40 nights: the base (2,000) is merged in when 250 have come, then (2,250) at 281 more
    assert most_files <= 4 and base_rewrites == 2


def test_a_compacted_file_written_before_the_ledger_was_sorted_is_folded_once(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.archive.ledger import _LEDGER_SCHEMA

    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    rows = [{"collection": "c", "scene_id": f"old{j:04d}", "date": "2024-05-01", "updated": T0, "output_key": "k",
             "unit_id": "old-u", "run_id": "old", "committed_at": T0} for j in reversed(range(1000))]
    (tmp_path / "_ledger").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=_LEDGER_SCHEMA),
                   store.full("_ledger/compact-20240101T000000Z-000000.parquet"))  # unsorted, no marker
    for u in range(2):
        ledger.commit(_scenes_unit(f"u{u}", [f"new{u}"]))
    assert ledger.compact(min_files=2) == 3  # 2 entries fold a 1,000-entry file: it was not sorted
    (path,) = store.glob("_ledger/*.parquet")
    ids = pq.read_table(store.full(path))["scene_id"].to_pylist()
    assert ids == sorted(ids) and len(ids) == 1002
    for u in range(2, 4):
        ledger.commit(_scenes_unit(f"u{u}", [f"new{u}"]))
    assert ledger.compact(min_files=2) == 2  # sorted now: it stays


def _superseding_unit(store: OutputStore, ledger: Ledger) -> UnitRecord:
    """u1 committed with scenes a and b; u2 staged with a's new rows, superseding u1's file (rewritten without a)."""
    ledger.commit(_stage_unit(store, ledger, "u1", ["a", "b"]))
    staged, delete = rewrite_without(store, "_staging/u2", "u2", ["tiles"], {("toy", "2024-05-01"): ["a"]}, "k")
    unit = _stage_unit(store, ledger, "u2", ["a"])
    return UnitRecord(unit.unit_id, unit.run_id, unit.output_key, scenes=unit.scenes,
                      publish=[*unit.publish, *staged], delete=delete)


def test_a_superseded_file_that_cannot_be_deleted_keeps_the_unit_staged_for_recovery(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    unit = _superseding_unit(store, ledger)

    def refuse(rel: str, recursive: bool = False) -> None:
        raise PermissionError(f"cannot delete {rel}")

    monkeypatch.setattr(store, "remove", refuse)  # a local delete that fails raises
    with pytest.raises(PermissionError):
        ledger.commit(unit)
    monkeypatch.undo()
    assert store.exists("_staging/u2")  # the unit stays staged (its files are in place, its deletes are not done)
    assert _recovering(store).recover().rolled_forward == ["u2"]
    tiles = read_table(store, "tiles")
    assert sorted(zip(tiles["scene_id"], tiles["unit_id"], strict=True)) == [("a", "u2"), ("b", "u1")]


@pytest.mark.integration
def test_a_superseded_file_that_an_object_store_did_not_delete_keeps_the_unit_staged(s3, monkeypatch):
    """A bulk delete reports a key it could not delete only in its answer (fsspec does not raise): the files are
    checked, concurrently, and a unit whose superseded file is still there stays staged for recovery."""
    store = OutputStore(f"s3://{s3.make_bucket('supersede-test')}/out")
    ledger = Ledger(store)
    unit = _superseding_unit(store, ledger)
    monkeypatch.setattr(store, "remove_many", lambda rels: None)  # the delete "fails" silently
    with pytest.raises(OSError, match="could not be deleted"):
        ledger.commit(unit)
    monkeypatch.undo()
    assert store.glob("_staging/u2/**/*.parquet")  # the unit stays staged
    assert _recovering(store).recover().rolled_forward == ["u2"]
    tiles = read_table(store, "tiles")
    assert sorted(zip(tiles["scene_id"], tiles["unit_id"], strict=True)) == [("a", "u2"), ("b", "u1")]


def test_a_lookup_with_dates_reads_only_those_dates_row_groups_whatever_the_ids(tmp_path, monkeypatch):

    from pipelines.archive import ledger as ledger_mod

    monkeypatch.setattr(ledger_mod, "ROW_GROUP_ROWS", 100)
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    # Landsat-like ids start with the path and row: a night's new scenes spread over the whole id range
    for day in range(1, 21):  # 20 dates x 50 scenes
        date = f"2024-05-{day:02d}"
        ledger.commit(UnitRecord(f"u{day:02d}", "r", "k", scenes=[
            ("landsat", f"LC08_L2SP_{p:03d}034_202405{day:02d}", date, T0) for p in range(50)]))
    assert ledger.compact(min_files=20) == 20
    read = _spy_row_groups(monkeypatch)
    newest = [f"LC08_L2SP_{p:03d}034_20240520" for p in (0, 17, 49)]
    by_dates = ledger.committed_entries("k", newest, dates=["2024-05-19", "2024-05-20", "2024-05-21", "unknown"])
    assert sorted(r["scene_id"] for r in by_dates.to_pylist()) == newest and read == [[9]]  # the last of 10 groups
    read.clear()
    assert ledger.committed_entries("k", newest).num_rows == 3 and len(read[0]) == 10  # ids alone: every group
    # an entry committed under another date is not found with dates (the caller then treats the scene as work)
    assert ledger.committed_entries("k", newest, dates=["2024-05-01"]).num_rows == 0


def _spy_row_groups(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The row groups each ``ParquetFile.read_row_groups`` call reads, from now on in this test."""
    import pyarrow.parquet as pq

    read: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        read.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    return read


def test_a_publish_without_batched_copies_keeps_the_staging_folder_until_its_deletes_are_done(monkeypatch):
    """On a remote store a folder exists only while it holds a key: once every file is moved, a marker keeps the
    unit's staging folder, so that a crash before the deletes leaves the unit to recovery."""
    store = OutputStore(f"memory://publish-marker-{uuid.uuid4().hex}")
    assert not store.local and not store.batch_copies
    ledger = Ledger(store)
    unit = _superseding_unit(store, ledger)

    def die(unit_id: str, deletes: list[str]) -> None:
        raise OSError("killed before the deletes")

    monkeypatch.setattr(ledger, "_delete_superseded", die)
    with pytest.raises(OSError, match="killed"):
        ledger.commit(unit)
    monkeypatch.undo()
    assert not store.glob("_staging/u2/**/*.parquet") and store.children("_staging") == ["u2"]  # the marker
    assert _recovering(store).recover().rolled_forward == ["u2"]
    assert store.children("_staging") == []
    tiles = read_table(store, "tiles")
    assert sorted(zip(tiles["scene_id"], tiles["unit_id"], strict=True)) == [("a", "u2"), ("b", "u1")]
