"""Folding a run's table files: one file per partition, the same rows, committed atomically as a unit of its own;
a fold cut short before or after its record; copy-on-write of a folded file; readers that listed before a fold."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest
import shapely

from pipelines.archive.fold import fold_files, merged_geo_metadata, plan_folds
from pipelines.archive.lease import Lease
from pipelines.archive.ledger import Ledger, UnitRecord, rewrite_without
from pipelines.archive.store import OutputStore, read_table, stage_table
from pipelines.results import open_outputs

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)
DATES = ("2024-05-01", "2024-05-02")


def _commit_units(store: OutputStore, ledger: Ledger, n: int, run: str = "r") -> list[str]:
    """``n`` units of run ``run``, each with two scenes: one on each of two dates (tiles and scenes tables); the
    final paths of the files they published."""
    published: list[str] = []
    for u in range(n):
        unit = f"{run}-u{u:05d}"
        staging = ledger.staging_dir(unit)
        scenes = [(f"s{u}-{d}", date) for d, date in enumerate(DATES)]
        tiles = [("toy", date, {"scene_id": s, "tile_id": f"t{k}", "output_key": "k", "unit_id": unit,
                                "run_id": run, "caption": f"tile {k} of {s}"},
                  shapely.box(u + k, d, u + k + 1, d + 1))
                 for d, (s, date) in enumerate(scenes) for k in range(3)]
        rows = [("toy", date, {"scene_id": s, "output_key": "k", "unit_id": unit, "run_id": run},
                 shapely.box(u, d, u + 3, d + 1)) for d, (s, date) in enumerate(scenes)]
        files = stage_table(store, staging, "tiles", unit, tiles) + stage_table(store, staging, "scenes", unit, rows)
        ledger.commit(UnitRecord(unit, run, "k", scenes=[("toy", s, date, T0) for s, date in scenes], publish=files))
        published += [f.final for f in files]
    return published


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
    report = fold_files(store, ledger, published, "r-u00005", "r", "k", fold_bytes=2**20)
    assert (report.files_in, report.files_out, report.partitions) == (20, 4, 4)  # 5 units x 2 tables x 2 dates
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
    report = fold_files(store, ledger, mine, "new-u00003", "new", "k", fold_bytes=2**20)
    assert report.files_in == len(mine)
    left = set(store.glob("tiles/**/*.parquet")) | set(store.glob("scenes/**/*.parquet"))
    assert set(earlier) <= left and not set(mine) & left


def test_a_fold_cut_short_after_its_record_is_finished_by_recovery(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 4)
    before = _rows(store, "tiles")

    def die(*args: object, **kwargs: object) -> None:
        raise OSError("killed while publishing")

    monkeypatch.setattr(ledger, "_publish", die)
    with pytest.raises(OSError, match="killed"):
        fold_files(store, ledger, published, "r-u00004", "r", "k", fold_bytes=2**20)
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
        fold_files(store, ledger, published, "r-u00004", "r", "k", fold_bytes=2**20)
    monkeypatch.undo()
    assert store.glob("_staging/r-u00004/**/*.parquet")  # staged, never committed: readers never see it
    assert store.glob("tiles/**/*.parquet") == files and _rows(store, "tiles") == before
    assert _recovering(store).recover().rolled_back == ["r-u00004"]
    assert not store.glob("_staging/**/*.parquet") and store.glob("tiles/**/*.parquet") == files


def test_an_updated_scene_is_rewritten_out_of_a_folded_file(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    fold_files(store, ledger, published, "r-u00003", "r", "k", fold_bytes=2**20)
    before = _rows(store, "tiles")
    staged, delete = rewrite_without(store, ledger.staging_dir("n-u00000"), "n-u00000", ["tiles"],
                                     {("toy", "2024-05-01"): ["s1-0"]}, "k")
    assert delete == ["tiles/collection=toy/date=2024-05-01/part-r-u00003-fold0.parquet"]
    ledger.commit(UnitRecord("n-u00000", "n", "k", publish=staged, delete=delete))
    after = _rows(store, "tiles")
    assert after == [row for row in before if row[0] != "s1-0"]
    assert "n-u00000" in open_outputs(str(tmp_path)).committed_units  # the rewrite's file is shown


def test_a_reader_that_listed_before_a_fold_lists_again(tmp_path):
    store = OutputStore(str(tmp_path))
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 3)
    outputs = open_outputs(str(tmp_path))
    expected = len(outputs.tiles())
    fold_files(store, ledger, published, "r-u00003", "r", "k", fold_bytes=2**20)
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
    column = json.loads(merged_geo_metadata([meta(None, ["Polygon"]), meta([0, 0, 1, 1], [])]) or b"")
    assert "bbox" not in column["columns"]["geometry"] and column["columns"]["geometry"]["geometry_types"] == []
    assert merged_geo_metadata([{}]) is None


@pytest.mark.integration
def test_a_fold_on_s3_lists_each_partition_once_and_reads_its_files_concurrently(s3):
    store = OutputStore(f"s3://{s3.make_bucket('fold-test')}/out")
    ledger = Ledger(store)
    published = _commit_units(store, ledger, 6)
    before = _rows(store, "tiles")
    s3.clear_requests()
    report = fold_files(store, ledger, published, "r-u00006", "r", "k", fold_bytes=2**20)
    requests = list(s3.requests)
    assert (report.files_in, report.files_out) == (24, 4)
    assert _rows(store, "tiles") == before and len(store.glob("tiles/**/*.parquet")) == 2
    listings = [path for _, path, _ in requests if "list-type" in path]
    # a partition's listing before its fold and after the deletes (4 + 4), the staging folder's before the record
    # (1); no listing of a whole table, none per file
    assert len(listings) == 4 + 4 + 1, listings
    gets = [path for method, path, _ in requests if method == "GET" and "list-type" not in path]
    assert len(gets) == 24, gets  # each folded file read once, without a HEAD first
    # the rest: 4 folded files staged and copied (a HEAD and a PUT each), the record, 2 bulk deletes
    assert len(requests) == len(listings) + len(gets) + 4 + 2 * 4 + 1 + 2, requests
