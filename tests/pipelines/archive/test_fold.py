"""Folding a run's table files: one file per partition, the same rows, committed atomically as a unit of its own;
a fold cut short before or after its record; copy-on-write of a folded file; readers that listed before a fold."""

from __future__ import annotations

import itertools
import json
import posixpath
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
import shapely

from pipelines.archive.fold import (
    FOLD_PATHS,
    FoldPublishFailed,
    FoldReport,
    fold_run,
    folders_of_runs,
    merged_geo_metadata,
    plan_folds,
)
from pipelines.archive.lease import Lease
from pipelines.archive.ledger import _DELETE_KEY, _PUBLISH_KEY, Ledger, UnitRecord, rewrite_without
from pipelines.archive.store import OutputStore, part_unit, read_table, stage_table
from pipelines.results import open_outputs

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
DATES = ("2024-05-01", "2024-05-02")


def _commit_units(store: OutputStore, ledger: Ledger, n: int, run: str = "r", key: str = "k") -> list[str]:
    """``n`` units of run ``run``, each with two scenes: one on each of two dates (tiles and scenes tables); the
    final paths of the files they published."""
    published: list[str] = []
    for u in range(n):
        unit = f"{run}-u{u:05d}"
        staging = ledger.staging_dir(unit)
        scenes = [(f"s{u}-{d}", date) for d, date in enumerate(DATES)]
        tiles = [("toy", date, {"scene_id": s, "tile_id": f"t{k}", "output_key": key, "unit_id": unit,
                                "run_id": run, "caption": f"tile {k} of {s}"},
                  shapely.box(u + k, d, u + k + 1, d + 1))
                 for d, (s, date) in enumerate(scenes) for k in range(3)]
        rows = [("toy", date, {"scene_id": s, "output_key": key, "unit_id": unit, "run_id": run},
                 shapely.box(u, d, u + 3, d + 1)) for d, (s, date) in enumerate(scenes)]
        files = stage_table(store, staging, "tiles", unit, tiles) + stage_table(store, staging, "scenes", unit, rows)
        ledger.commit(UnitRecord(unit, run, key, scenes=[("toy", s, date, T0) for s, date in scenes], publish=files))
        published += [f.final for f in files]
    return published


def _commit_failures(store: OutputStore, ledger: Ledger, run: str, first: int, n: int, key: str) -> list[str]:
    """``n`` units of run ``run`` (numbered from ``first``) of one failed scene each, on a date no committed scene
    has: errors rows only, and a marker row in the ledger."""
    published: list[str] = []
    for u in range(first, first + n):
        unit = f"{run}-u{u:05d}"
        rows = [("toy", "2024-06-01", {"scene_id": f"bad{u}", "stage": "read", "error_type": "RasterioIOError",
                                       "output_key": key, "unit_id": unit, "run_id": run}, None)]
        files = stage_table(store, ledger.staging_dir(unit), "errors", unit, rows)
        ledger.commit(UnitRecord(unit, run, key, publish=files))
        published += [f.final for f in files]
    return published


def _job_config(root):
    from pipelines.archive.config import parse_config

    return parse_config({"catalog": {"url": "http://127.0.0.1:9/", "collections": ["toy"]},
                         "output": {"root": str(root)}})


def test_the_next_run_folds_a_dead_runs_files_errors_included_and_takes_its_name_out(tmp_path):
    from pipelines.archive.job import UnitIds, _fold_leftovers

    config, key, store, published, lease = _dead_run_and_its_successor(tmp_path, failures=2)
    before = {t: _rows(store, t) for t in ("tiles", "scenes")}
    errors = sorted(read_table(store, "errors")["scene_id"])
    lines: list[str] = []
    ids = UnitIds("c")
    assert _fold_leftovers(store, Ledger(store, lease), config, ids, _summary("c"), lines.append) == []
    assert ids.count == 1 and any(line.startswith("folded 10 table files of earlier run a") for line in lines)
    assert not set(published) & set(store.glob("**/*.parquet"))  # the errors files of the failed scenes too
    assert store.glob("errors/**/*.parquet") == ["errors/collection=toy/date=2024-06-01/part-c-u00000-fold0.parquet"]
    assert {t: _rows(store, t) for t in ("tiles", "scenes")} == before
    assert sorted(read_table(store, "errors")["scene_id"]) == errors
    assert json.loads(store.read_bytes(f"_state/{key}-fold.json"))["runs"] == []


def _dead_run_and_its_successor(tmp_path, failures: int = 0):
    """Run "a" named itself in the fold state, committed two units (and ``failures`` units of one failed scene
    each), then died; run "c" holds the lease now."""
    from pipelines.archive.job import _update_fold_state

    config = _job_config(tmp_path)
    key = config.output_key()
    store = OutputStore(str(tmp_path))
    dead = Lease(store, key, run_id="a", ttl_s=60)
    dead.acquire()
    ledger = Ledger(store, dead)
    _update_fold_state(ledger, key, "a", add=["a"])
    published = _commit_units(store, ledger, 2, run="a", key=key) + _commit_failures(store, ledger, "a", 2, failures,
                                                                                      key)
    lease = Lease(store, key, run_id="c", ttl_s=60)
    lease.acquire(force=True)
    return config, key, store, published, lease


def test_a_leftover_fold_whose_publish_fails_is_finished_before_the_run_commits_anything(tmp_path, monkeypatch):
    from pipelines.archive.job import UnitIds, _fold_leftovers

    config, key, store, published, lease = _dead_run_and_its_successor(tmp_path)
    ledger = Ledger(store, lease)
    publish = Ledger._publish
    calls = []

    def fails_once(self, unit_id, *args, **kwargs):
        calls.append(unit_id)
        if len(calls) == 1:
            raise OSError("connection reset")
        return publish(self, unit_id, *args, **kwargs)

    monkeypatch.setattr(Ledger, "_publish", fails_once)
    lines: list[str] = []
    summary = _summary("c")
    # the fold unit's publish fails, recovery finishes it before anything else, the fold once more finds nothing left
    assert _fold_leftovers(store, ledger, config, UnitIds("c"), summary, lines.append) == []
    assert calls == ["c-u00000", "c-u00000"]
    assert any(line.startswith("recovery finished the fold's units ['c-u00000']") for line in lines), lines
    assert not store.children("_staging") and not set(published) & set(store.glob("**/*.parquet"))
    assert summary.files_folded == 8 and summary.message == ""
    assert json.loads(store.read_bytes(f"_state/{key}-fold.json"))["runs"] == []


def test_a_leftover_fold_that_cannot_be_finished_stops_the_run_and_leaves_the_runs_named(tmp_path, monkeypatch):
    from pipelines.archive.job import UnitIds, _fold_leftovers

    config, key, store, _, lease = _dead_run_and_its_successor(tmp_path)

    def fails(self, unit_id, *args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(Ledger, "_publish", fails)
    with pytest.raises(OSError, match="connection reset"):  # from recovery: nothing more is committed
        _fold_leftovers(store, Ledger(store, lease), config, UnitIds("c"), _summary("c"), lambda line: None)
    assert store.children("_staging") == ["c-u00000"]  # committed, left to the next run's recovery
    assert json.loads(store.read_bytes(f"_state/{key}-fold.json"))["runs"] == ["a"]


def test_a_run_that_lost_its_lease_leaves_the_fold_state_alone(tmp_path):
    from pipelines.archive.job import _update_fold_state
    from pipelines.archive.lease import LeaseLost

    store = OutputStore(str(tmp_path))
    old = Lease(store, "k", run_id="a", ttl_s=60)
    old.acquire()
    _update_fold_state(Ledger(store, old), "k", "a", add=["a"])
    new = Lease(store, "k", run_id="b", ttl_s=60)
    new.acquire(force=True)
    _update_fold_state(Ledger(store, new), "k", "b", add=["b"])
    with pytest.raises(LeaseLost):
        _update_fold_state(Ledger(store, old), "k", "a", remove=["a", "b"])
    assert json.loads(store.read_bytes("_state/k-fold.json"))["runs"] == ["a", "b"]


def _summary(run_id: str):
    from pipelines.archive.job import RunSummary

    return RunSummary(run_id=run_id, output_root="")


def _fold(store: OutputStore, ledger: Ledger, published: list[str], run: str = "r", *, fold_bytes: int = 2**20,
          max_paths: int = FOLD_PATHS) -> FoldReport:
    """Fold run ``run``'s files in the folders of ``published``; its fold units are numbered after its units."""
    units = itertools.count(len({u for p in published if (u := part_unit(p)) and u.startswith(f"{run}-u")}))
    return fold_run(store, ledger, {posixpath.dirname(p) for p in published}, run, "k", fold_bytes,
                    lambda: f"{run}-u{next(units):05d}", max_paths)


def _rows(store: OutputStore, table: str) -> list[tuple]:
    frame = read_table(store, table)
    cols = ["scene_id", "tile_id", "unit_id", "caption"] if table == "tiles" else ["scene_id", "unit_id"]
    return sorted(zip(*(frame[c] for c in cols), frame.geometry.to_wkt(), strict=True))


def _recovering(store: OutputStore) -> Ledger:
    lease = Lease(store, "k", run_id="rec", ttl_s=60)
    lease.acquire()
    return Ledger(store, lease)


def test_a_runs_files_fold_into_one_file_per_partition_with_the_same_rows(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 5)
    before = {t: _rows(store, t) for t in ("tiles", "scenes")}
    committed = ledger.committed("k")
    report = _fold(store, ledger, published)
    assert (report.files_in, report.files_out, report.partitions) == (20, 4, 4)  # 5 units x 2 tables x 2 dates
    assert report.units == ["r-u00005"]
    for table in ("tiles", "scenes"):
        for date in DATES:
            assert store.glob(f"{table}/collection=toy/date={date}/*.parquet") == [
                f"{table}/collection=toy/date={date}/part-r-u00005-fold0.parquet"]
        assert _rows(store, table) == before[table]  # rows keep their own unit ids
    assert not store.glob("_staging/**/*.parquet")
    assert ledger.committed("k") == committed  # the fold commits no scene
    outputs = open_outputs(str(tmp_path))
    assert "r-u00005" in outputs.committed_units
    assert len(outputs.tiles()) == len(before["tiles"])
    # the folded file's GeoParquet bbox covers every row (a reader may skip a file by it)
    folded = pq.read_schema(store.full("tiles/collection=toy/date=2024-05-01/part-r-u00005-fold0.parquet"))
    bbox = json.loads(folded.metadata[b"geo"])["columns"]["geometry"]["bbox"]
    tiles = read_table(store, "tiles")
    x0, y0, x1, y1 = tiles[tiles["date"] == "2024-05-01"].total_bounds if "date" in tiles else tiles.total_bounds
    assert bbox[0] <= x0 and bbox[1] <= y0 and bbox[2] >= x1 and bbox[3] >= y1
    assert bbox[2] >= 7  # the last unit's tiles reach x = 7; the first unit's file alone ends at x = 3


def test_fold_bytes_bounds_each_folded_file_and_one_file_is_left_alone():
    sizes = {"p/part-a.parquet": 40, "p/part-b.parquet": 40, "p/part-c.parquet": 40, "p/part-d.parquet": 200,
             "p/part-e.parquet": 10}
    assert plan_folds(sizes, 100) == [["p/part-a.parquet", "p/part-b.parquet"]]  # c alone, d too large, e alone
    assert plan_folds(sizes, 1000) == [sorted(sizes)]
    assert plan_folds({"p/part-a.parquet": 1}, 100) == []


def test_only_the_given_files_are_folded(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    earlier = _commit_units(store, ledger, 2, run="old")
    mine = _commit_units(store, ledger, 3, run="new")
    report = _fold(store, ledger, mine + earlier, run="new")  # the folders hold both runs' files
    assert report.files_in == len(mine)
    left = set(store.glob("tiles/**/*.parquet")) | set(store.glob("scenes/**/*.parquet"))
    assert set(earlier) <= left and not set(mine) & left


def test_a_later_run_folds_the_files_of_runs_that_ended_before_their_fold(tmp_path):
    """Runs "a" and "b" committed units and never folded; run "c" folds both (its own fold units, the folders found
    from their ledger entries), and a run "d" of the same folders is left alone."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 2, run="a") + _commit_units(store, ledger, 3, run="b")
    others = _commit_units(store, ledger, 2, run="d")
    before = {t: _rows(store, t) for t in ("tiles", "scenes")}
    folders = folders_of_runs(ledger.committed_table("k"), ["a", "b"])
    assert folders == {f"{t}/collection=toy/date={d}" for t in ("tiles", "scenes", "detections", "errors")
                       for d in DATES}  # every folded table's folders of the runs' scenes
    assert folders_of_runs(ledger.committed_table("k"), []) == set()
    units = itertools.count()
    report = fold_run(store, ledger, folders, "c", "k", 2**20, lambda: f"c-u{next(units):05d}", runs=["a", "b"])
    assert (report.files_in, report.files_out, report.units) == (20, 4, ["c-u00000"])
    for table in ("tiles", "scenes"):
        for date in DATES:
            assert sorted(posixpath.basename(p) for p in store.glob(f"{table}/collection=toy/date={date}/*")) == [
                "part-c-u00000-fold0.parquet", "part-d-u00000.parquet", "part-d-u00001.parquet"]
        assert _rows(store, table) == before[table]
    assert set(others) <= set(store.glob("**/*.parquet")) and not set(published) & set(store.glob("**/*.parquet"))


def test_a_fold_cut_short_after_its_record_is_finished_by_recovery(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 4)
    before = _rows(store, "tiles")

    def die(*args: object, **kwargs: object) -> None:
        raise OSError("killed while publishing")

    monkeypatch.setattr(ledger, "_publish", die)
    with pytest.raises(FoldPublishFailed, match="r-u00004 is committed"):
        _fold(store, ledger, published)
    monkeypatch.undo()
    assert store.exists("_ledger/r-u00004.parquet")  # on record, not published: the small files are still there
    assert len(store.glob("tiles/**/*.parquet")) == 8
    assert _recovering(store).recover().rolled_forward == ["r-u00004"]
    assert len(store.glob("tiles/**/*.parquet")) == 2 and _rows(store, "tiles") == before


def test_a_fold_cut_short_before_its_record_leaves_the_files_as_they_were(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 4)
    files = store.glob("tiles/**/*.parquet")
    before = _rows(store, "tiles")

    def die(unit: UnitRecord) -> None:
        raise OSError("killed before the record")

    monkeypatch.setattr(ledger, "commit", die)
    with pytest.raises(OSError, match="killed"):
        _fold(store, ledger, published)
    monkeypatch.undo()
    # staged, never committed: readers never saw it, and the fold deleted its staged files at once
    assert not store.glob("_staging/**/*.parquet") and not store.exists("_ledger/r-u00004.parquet")
    assert store.glob("tiles/**/*.parquet") == files and _rows(store, "tiles") == before
    assert _recovering(store).recover().rolled_back == []
    assert store.glob("tiles/**/*.parquet") == files


def test_an_updated_scene_is_rewritten_out_of_a_folded_file(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    _fold(store, ledger, published)
    before = _rows(store, "tiles")
    staged, delete = rewrite_without(store, ledger.staging_dir("n-u00000"), "n-u00000", ["tiles"],
                                     {("toy", "2024-05-01"): ["s1-0"]}, "k")
    assert delete == ["tiles/collection=toy/date=2024-05-01/part-r-u00003-fold0.parquet"]
    ledger.commit(UnitRecord("n-u00000", "n", "k", publish=staged, delete=delete))
    after = _rows(store, "tiles")
    assert after == [row for row in before if row[0] != "s1-0"]
    assert "n-u00000" in open_outputs(str(tmp_path)).committed_units  # the rewrite's file is shown


@pytest.mark.parametrize("probed", [False, True])
def test_an_updated_scene_in_a_partition_of_unit_and_folded_files_is_rewritten_out(tmp_path, monkeypatch, probed):
    """The same copy-on-write whether the files are read whole or (large ones, here all) probed first by their
    footer, scene ids and output keys; probed, only the files that hold the scene under the key are read whole."""
    import pipelines.archive.fold as fold_module
    import pipelines.archive.ledger as ledger_module

    monkeypatch.setattr(fold_module, "FOLD_ROW_GROUP_ROWS", 4)  # a folded file of several row groups
    if probed:
        monkeypatch.setattr(ledger_module, "WHOLE_READ_BYTES", 0)
    else:
        monkeypatch.setattr(ledger_module, "READ_BATCH_BYTES", 1)  # every file a batch of its own
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    _fold(store, ledger, _commit_units(store, ledger, 3))  # scenes s0-*, s1-*, s2-* in one folded file
    _commit_units(store, ledger, 2, run="m")  # s0-*, s1-* again, in two unit files beside it
    _commit_units(store, Ledger(store), 3, run="o", key="other")  # s0-* .. s2-* of another output key
    folded, second = "part-r-u00003-fold0.parquet", "part-m-u00001.parquet"
    assert pq.ParquetFile(store.full(f"tiles/collection=toy/date=2024-05-01/{folded}")).num_row_groups == 3
    whole: list[str] = []
    read_bytes = OutputStore.read_bytes
    monkeypatch.setattr(OutputStore, "read_bytes", lambda self, p: whole.append(posixpath.basename(p)) or
                        read_bytes(self, p))
    # s1-5 lies inside the statistics of run r's and m's files, and is in none
    for scene, holders in (("s2-0", [folded]), ("s1-0", [second, folded]), ("s9-0", []), ("s1-5", [])):
        whole.clear()
        staged, delete = rewrite_without(store, "_staging/n-u00000", "n-u00000", ["tiles"],
                                         {("toy", "2024-05-01"): [scene]}, "k")
        assert [posixpath.basename(p) for p in delete] == holders
        if probed:
            assert whole == holders  # the other key's files hold the scene too, and are not read whole
        else:
            assert len(whole) == 6  # every file of the partition
        rows = [pq.read_table(store.full(p)).column("scene_id").to_pylist() for p in delete]
        assert sum(len(pq.read_table(store.full(f.staged))) for f in staged) == sum(
            len([s for s in r if s != scene]) for r in rows)
        for f in staged:
            assert scene not in pq.read_table(store.full(f.staged)).column("scene_id").to_pylist()
        store.remove("_staging/n-u00000", recursive=True)


def test_a_copy_on_write_reads_large_files_by_their_footer_and_ids_until_one_holds_the_scene(s3, monkeypatch):
    """Four files of about 150 KB, one scene each, probed (every file is "large" here): each file that does not
    hold the scene costs one ranged read of its footer (the statistics rule its scene out), and only the file that
    holds it is read whole."""
    import os

    import pipelines.archive.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "WHOLE_READ_BYTES", 0)
    store = OutputStore(f"s3://{s3.make_bucket('cow-probe')}/out")
    ledger = Ledger(store)
    sizes = {}
    for u in range(4):
        unit = f"r-u{u:05d}"
        rows = [("toy", DATES[0], {"scene_id": f"s{u}", "tile_id": f"t{k}", "output_key": "k", "unit_id": unit,
                                   "run_id": "r", "caption": os.urandom(500).hex()}, shapely.box(u, 0, u + 1, 1))
                for k in range(300)]
        files = stage_table(store, ledger.staging_dir(unit), "tiles", unit, rows)
        ledger.commit(UnitRecord(unit, "r", "k", scenes=[("toy", f"s{u}", DATES[0], T0)], publish=files))
        sizes.update({posixpath.basename(f.final): store.fs.size(store.full(f.final)) for f in files})
    assert min(sizes.values()) > 100_000
    s3.clear_requests()
    staged, delete = rewrite_without(store, "_staging/n-u00000", "n-u00000", ["tiles"],
                                     {("toy", DATES[0]): ["s2"]}, "k")
    assert [posixpath.basename(p) for p in delete] == ["part-r-u00002.parquet"]
    assert staged == []  # the file held only s2: nothing of it is kept
    reads: dict[str, list[str | None]] = {}
    for method, path, rng in s3.requests:
        if method == "GET" and "list-type" not in path:
            reads.setdefault(posixpath.basename(path), []).append(rng)
    assert [r for r in s3.requests if r[0] == "HEAD"] == []  # the sizes come from the listing
    for name, ranges in reads.items():
        if name == "part-r-u00002.parquet":
            assert f"bytes=0-{sizes[name] - 1}" in ranges  # read whole once it is known to hold the scene
            continue
        assert len(ranges) == 1 and ranges[0] is not None, (name, ranges)  # the footer only
        start, end = map(int, ranges[0].removeprefix("bytes=").split("-"))
        assert end == sizes[name] - 1 and end - start + 1 <= 64 * 1024 < sizes[name]


def test_a_copy_on_write_reads_a_partitions_small_files_at_once_without_heads(s3, monkeypatch):
    import pipelines.archive.ledger as ledger_module

    store = OutputStore(f"s3://{s3.make_bucket('cow-small')}/out")
    ledger = Ledger(store)
    _commit_units(store, ledger, 6)
    calls = []
    cat_ranges = store.fs.cat_ranges
    monkeypatch.setattr(store.fs, "cat_ranges", lambda paths, *a, **kw: calls.append(len(paths)) or
                        cat_ranges(paths, *a, **kw))
    gone = "tiles/collection=toy/date=2024-05-01/part-r-u00001.parquet"
    sizes = store.sizes
    monkeypatch.setattr(store, "sizes", lambda folder: {**sizes(folder), gone: 1} if "tiles" in folder else
                        sizes(folder))
    store.remove(gone)  # listed, then deleted (a fold of another output key): passed over
    s3.clear_requests()
    staged, delete = rewrite_without(store, "_staging/n-u00000", "n-u00000", ["tiles"],
                                     {("toy", "2024-05-01"): ["s3-0"]}, "k")
    assert [posixpath.basename(p) for p in delete] == ["part-r-u00003.parquet"] and staged == []
    assert calls == [6]  # one concurrent call for the partition's six files
    assert [r for r in s3.requests if r[0] == "HEAD"] == []
    monkeypatch.setattr(ledger_module, "READ_BATCH_BYTES", 1)
    calls.clear()
    rewrite_without(store, "_staging/n-u00001", "n-u00001", ["tiles"], {("toy", "2024-05-01"): ["s3-0"]}, "k")
    assert calls == [1] * 6


def test_a_reader_that_listed_before_a_fold_lists_again(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    outputs = open_outputs(str(tmp_path))
    expected = len(outputs.tiles())
    _fold(store, ledger, published)
    assert len(outputs.tiles()) == expected  # its listing named files the fold deleted


def test_geo_metadata_of_folded_files_is_the_union():
    def meta(bbox: list[float] | None, types: list[str]) -> dict[bytes, bytes]:
        column: dict[str, object] = {"encoding": "WKB", "geometry_types": types}
        if bbox is not None:
            column["bbox"] = bbox
        return {b"geo": json.dumps({"version": "1.1.0", "primary_column": "geometry",
                                    "columns": {"geometry": column}}).encode()}

    merged = merged_geo_metadata([meta([0, 0, 1, 1], ["Polygon"]), meta([2, -1, 3, 0.5], ["MultiPolygon"])])
    assert merged is not None
    column = json.loads(merged)["columns"]["geometry"]
    assert column["bbox"] == [0, -1, 3, 1] and column["geometry_types"] == ["MultiPolygon", "Polygon"]
    column = json.loads(merged_geo_metadata([meta(None, ["Polygon"]), meta(None, [])]) or b"")
    assert "bbox" not in column["columns"]["geometry"] and column["columns"]["geometry"]["geometry_types"] == []
    assert merged_geo_metadata([{}]) is None
    # a file whose geometries are all null has no bbox: the others' union stands
    column = json.loads(merged_geo_metadata([meta(None, ["Polygon"]), meta([0, 0, 1, 1], ["Polygon"])]) or b"")
    assert column["columns"]["geometry"]["bbox"] == [0, 0, 1, 1]


@pytest.mark.integration
def test_a_fold_on_s3_lists_each_partition_once_and_reads_its_files_concurrently(s3):
    store = OutputStore(f"s3://{s3.make_bucket('fold-test')}/out")
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 6)
    before = _rows(store, "tiles")
    s3.clear_requests()
    report = _fold(store, ledger, published)
    requests = list(s3.requests)
    assert (report.files_in, report.files_out) == (24, 4)
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 2
    listings = [path for _, path, _ in requests if "list-type" in path]
    # the staging folders (units still publishing are left out; 2 requests: s3fs looks at the parent of an empty
    # folder), a partition's listing before its fold and after the deletes (4 + 4), the fold unit's staging folder
    # before its record (1); no listing of a whole table, none per file
    assert len(listings) == 2 + 4 + 4 + 1, listings
    gets = [path for method, path, _ in requests if method == "GET" and "list-type" not in path]
    assert len(gets) == 24, gets  # each folded file read once, without a HEAD first
    # the rest: 4 folded files staged and copied (a HEAD and a PUT each), the record, 2 bulk deletes
    assert len(requests) == len(listings) + len(gets) + 4 + 2 * 4 + 1 + 2, requests


def test_a_fold_with_many_files_commits_several_units(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 6)
    before = _rows(store, "tiles")
    report = _fold(store, ledger, published, max_paths=7)  # 6 files + 1 folded file a partition: a unit each
    assert report.units == ["r-u00006", "r-u00007", "r-u00008", "r-u00009"] and report.files_out == 4
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 2
    assert set(report.units) <= open_outputs(str(tmp_path)).committed_units


def test_a_unit_still_staged_keeps_its_files_out_of_the_fold(tmp_path):
    """A unit whose staging folder is still there (its staging delete failed unnoticed) is replayed by recovery,
    which must find its files where it put them: the fold leaves them alone."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    store.write_bytes("_staging/r-u00001/leftover", b"")
    before = _rows(store, "tiles")
    report = _fold(store, ledger, published)
    assert report.files_in == 8  # units 0 and 2, 2 tables x 2 dates
    assert all(store.exists(p) for p in published if "r-u00001" in p)
    assert _recovering(store).recover().rolled_forward == ["r-u00001"]
    assert _rows(store, "tiles") == before


def test_a_fold_whose_publish_fails_after_its_record_says_so_and_recovery_finishes_it(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    before = _rows(store, "tiles")

    def refuse(unit_id: str, deletes: list[str]) -> None:
        raise OSError("delete refused")

    monkeypatch.setattr(ledger, "_delete_superseded", refuse)
    with pytest.raises(FoldPublishFailed, match="r-u00003 is committed"):
        _fold(store, ledger, published)
    monkeypatch.undo()
    assert store.exists("_staging/r-u00003")  # left to recovery (its files are in place, the deletes are not done)
    assert _recovering(store).recover().rolled_forward == ["r-u00003"]
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 2


def test_a_local_fold_places_every_folded_file_before_it_deletes_one(tmp_path, monkeypatch):
    """Readers may see a partition's rows twice while a fold publishes, never none."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    real = ledger._delete_superseded
    seen: list[int] = []

    def check_then_delete(unit_id: str, deletes: list[str]) -> None:
        seen.append(len(store.glob("*/**/part-r-u00003-fold*.parquet")))
        real(unit_id, deletes)

    monkeypatch.setattr(ledger, "_delete_superseded", check_then_delete)
    _fold(store, ledger, published)
    assert seen == [4]  # all four folded files (2 tables x 2 dates) in place before the deletes


def test_a_reader_that_read_the_ledger_before_a_fold_shows_the_folded_files(tmp_path):
    """The units on record are read once; a table listed after a fold names a fold unit committed since, so they
    are read again (the files it replaced are gone: without it, the reader would show none of those rows)."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    outputs = open_outputs(str(tmp_path))
    scenes = len(outputs.scenes())  # reads the ledger
    tiles = len(read_table(store, "tiles"))
    _fold(store, ledger, published)
    assert len(outputs.tiles()) == tiles and len(outputs.files("tiles")) == 2
    assert scenes == 6


def test_no_fold_unit_publishes_and_deletes_more_than_max_paths(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 6)
    before = _rows(store, "tiles")
    report = _fold(store, ledger, published, max_paths=4)  # 6 files a partition: chunks of 3, each with its fold
    assert len(report.units) == 8 and report.files_in == 24 and report.files_out == 8
    for unit in report.units:
        meta = pq.read_schema(store.full(f"_ledger/{unit}.parquet")).metadata
        paths = len(json.loads(meta[_PUBLISH_KEY])) + len(json.loads(meta[_DELETE_KEY]))
        assert paths <= 4, (unit, paths)
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 4


def test_a_fold_interrupted_after_its_record_leaves_its_staging_to_recovery(tmp_path, monkeypatch):
    """Ctrl-C (or a failing check of the record) after the record: the staging folder must stay, or recovery would
    never finish the publish and the replaced files would show their rows twice for good."""
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    before = _rows(store, "tiles")

    def interrupt(unit_id: str, deletes: list[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger, "_delete_superseded", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _fold(store, ledger, published)
    monkeypatch.undo()
    assert store.exists("_staging/r-u00003") and store.exists("_ledger/r-u00003.parquet")
    assert _recovering(store).recover().rolled_forward == ["r-u00003"]
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 2
