"""The run's source without a server: windows split time exactly once, items stream lazily into scene rows,
committed scenes are skipped with a reason, and any item that cannot become a scene is a row with its error."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from catalogs.hrefs import HrefPolicy
from pipelines.archive.job import RunSummary
from pipelines.archive.ledger import CommittedScene
from pipelines.archive.source import Window, scene_rows

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def _stream(items: list[dict], n: int, pulled: list[int]) -> Iterator[dict]:
    """``n`` distinct items cycling over ``items``, counting how many were pulled."""
    for k in range(n):
        item = copy.deepcopy(items[k % len(items)])
        item["id"] = f"{item['id']}-{k}"
        pulled[0] += 1
        yield item


def _rows(blocks) -> list[dict]:
    return [r for b in blocks for r in b.to_pylist()]


@pytest.fixture()
def policy(world):
    return HrefPolicy.for_roots((world.root / "cogs").as_uri())


def test_scene_rows_pull_the_search_lazily(world_items, policy):
    pulled = [0]
    blocks = scene_rows(_stream(world_items, 100_000, pulled), Window(), {}, policy, {}, block_scenes=4)
    first = next(blocks)
    assert first.num_rows == 4 and all(first["scene"].to_pylist())
    assert pulled[0] == 4  # one block in memory, not the archive
    next(blocks)
    assert pulled[0] == 8


def test_committed_scenes_are_skipped_with_a_reason(world_items, policy):
    when = datetime(2024, 9, 1, tzinfo=timezone.utc)
    index = {(i["collection"], i["id"]): CommittedScene(i["collection"], i["id"], "d", when, "u0")
             for i in world_items[:2]}
    counts: dict = {}
    rows = _rows(scene_rows(iter(world_items), Window(), index, policy, counts))
    assert [r["scene_key"] for r in rows] == [f"{world_items[2]['collection']}/{world_items[2]['id']}"]
    assert counts["matched"] == 3 and counts["skipped"] == 2 and counts["planned"] == 1
    assert counts["skip_reasons"] == {"already committed": 2}


def test_an_updated_item_carries_the_version_it_supersedes(world_items, policy):
    item = copy.deepcopy(world_items[0])
    item["properties"]["updated"] = "2030-01-01T00:00:00Z"
    index = {(item["collection"], item["id"]): CommittedScene(item["collection"], item["id"], "2024-05-01",
                                                             T0, "u7")}
    (row,) = _rows(scene_rows(iter([item]), Window(), index, policy, {}))
    meta = json.loads(row["meta"])
    assert meta["prev_date"] == "2024-05-01" and meta["prev_unit"] == "u7" and row["scene"]


def test_items_that_cannot_become_scenes_are_error_rows_not_crashes(world_items, policy):
    missing_asset = copy.deepcopy(world_items[0])
    del missing_asset["assets"]["green"]
    outside = copy.deepcopy(world_items[1])
    for asset in outside["assets"].values():
        asset["href"] = "s3://someone-else/secret.tif"
    bad_date = copy.deepcopy(world_items[2])
    bad_date["id"] = "bad-date"
    bad_date["properties"]["datetime"] = "not-a-date"
    no_range = copy.deepcopy(world_items[2])
    no_range["id"] = "no-range"
    no_range["properties"]["datetime"] = None
    no_id = copy.deepcopy(world_items[2])
    del no_id["id"]
    counts: dict = {}
    items = [missing_asset, outside, bad_date, no_range, no_id, world_items[2]]
    rows = _rows(scene_rows(iter(items), Window(), {}, policy, counts))
    assert [r["error_type"] for r in rows] == ["MissingAsset", "HrefNotAllowed", "InvalidItem", "InvalidItem",
                                               "InvalidItem", ""]
    assert "not-a-date" in rows[2]["error_message"]
    assert json.loads(rows[2]["meta"])["id"] == "bad-date" and rows[-1]["scene"]
    assert counts["failed_items"] == 5 and counts["planned"] == 1


def test_duplicate_items_in_a_search_are_kept_once(world_items, policy):
    counts: dict = {}
    rows = _rows(scene_rows(iter(world_items + world_items[:1]), Window(), {}, policy, counts))
    assert len(rows) == 3 and counts["matched"] == 3


def test_adjacent_windows_keep_a_boundary_item_exactly_once(world_items, policy):
    cut = T0 + timedelta(days=1)
    items = []
    for k, t in enumerate([T0, cut - timedelta(microseconds=1), cut, cut + timedelta(hours=1)]):
        item = copy.deepcopy(world_items[0])
        item["id"] = f"t{k}"
        item["properties"]["datetime"] = t.isoformat().replace("+00:00", "Z")
        items.append(item)
    # each window's API answer is inclusive, so both see the boundary item; only one keeps it
    left = _rows(scene_rows(iter(items), Window(end=cut), {}, policy, {}))
    right = _rows(scene_rows(iter(items), Window(start=cut), {}, policy, {}))
    assert [json.loads(r["meta"])["id"] for r in left] == ["t0", "t1"]
    assert [json.loads(r["meta"])["id"] for r in right] == ["t2", "t3"]


def test_window_datetime_param_intersects_the_users_interval():
    window = Window(start=T0, end=T0 + timedelta(days=10))
    assert window.datetime_param(None) == "2024-05-01T00:00:00.000000Z/2024-05-11T00:00:00.000000Z"
    assert window.datetime_param("2024-05-05/..") == "2024-05-05T00:00:00.000000Z/2024-05-11T00:00:00.000000Z"
    assert Window().datetime_param(None) is None


def test_summary_reconciles_and_reads_well():
    summary = RunSummary("r", "/out", status="ok", tiles_planned=10, tiles_written=7, tiles_skipped=2,
                         tiles_failed=1, wall_s=2.0)
    assert summary.reconciles and summary.tiles_per_s == 3.5
    text = "\n".join(summary.lines())
    assert "planned 10 = written 7 + skipped 2 + failed 1" in text and "DOES NOT ADD UP" not in text
    summary.tiles_failed = 0
    assert not summary.reconciles and "DOES NOT ADD UP" in "\n".join(summary.lines())


def test_an_item_the_filter_cannot_evaluate_is_an_error_row(world_items, policy):
    from catalogs.search import FILTER_ERROR_KEY

    flagged = {**copy.deepcopy(world_items[0]), FILTER_ERROR_KEY: "CQL2 filter cannot be evaluated: updated='x'"}
    counts: dict = {}
    (row,) = _rows(scene_rows(iter([flagged]), Window(), {}, policy, counts))
    assert (row["error_type"], row["error_stage"]) == ("InvalidItem", "search")
    assert "cannot be evaluated" in row["error_message"] and counts["failed_items"] == 1


def test_a_quarantined_scene_is_skipped_until_its_item_is_updated(world_items, policy):
    item = copy.deepcopy(world_items[0])
    key = f"{item['collection']}/{item['id']}"
    item["properties"]["updated"] = "2024-09-01T00:00:00Z"
    held = {key: {"attempts": 3, "updated": "2024-09-01T00:00:00.000000Z", "error_type": "CorruptRaster"}}
    counts: dict = {}
    assert _rows(scene_rows(iter([item]), Window(), {}, policy, counts, quarantined=held)) == []
    assert counts["skipped"] == 1 and list(counts["skip_reasons"]) == ["quarantined"]
    newer = copy.deepcopy(item)
    newer["properties"]["updated"] = "2024-10-01T00:00:00Z"
    (row,) = _rows(scene_rows(iter([newer]), Window(), {}, policy, {}, quarantined=held))
    assert row["scene"]  # a new version of the item is tried again
    # --retry-quarantined lists it in a retry window (by id): processed whatever the quarantine and the ledger say
    index = {(item["collection"], item["id"]): CommittedScene(item["collection"], item["id"], "2024-05-01", T0, "u1")}
    (row,) = _rows(scene_rows(iter([item]), Window(ids=(item["id"],)), index, policy, {}, quarantined=held))
    assert row["scene"] and json.loads(row["meta"])["prev_unit"] == "u1"  # the new version supersedes u1's


def test_attempts_count_failed_runs_in_a_row_and_quarantine_at_the_limit():
    from pipelines.archive.source import next_attempts

    bad = {"a/x": {"updated": datetime(2024, 9, 1, tzinfo=timezone.utc), "error_type": "CorruptRaster",
                   "message": "unreadable raster: TIFFReadEncodedTile() failed"}}
    state: dict = {}
    for run in range(1, 4):
        attempts, held = next_attempts(state, bad, [], max_attempts=3, run_id=f"r{run}")
        state = {"attempts": attempts, "quarantined": held}
        assert attempts == {"a/x": run} and (("a/x" in held) == (run == 3))
    assert held["a/x"]["attempts"] == 3 and held["a/x"]["updated"] == "2024-09-01T00:00:00.000000Z"
    assert held["a/x"]["error_type"] == "CorruptRaster" and held["a/x"]["run_id"] == "r3"
    # the item is updated and fails again: it counts afresh; a success clears it
    newer = {"a/x": {**bad["a/x"], "updated": datetime(2024, 10, 1, tzinfo=timezone.utc)}}
    attempts, held = next_attempts(state, newer, [], max_attempts=3, run_id="r4")
    assert attempts == {"a/x": 1} and held == {}
    attempts, held = next_attempts({"attempts": attempts, "quarantined": held}, {}, ["a/x"], max_attempts=3,
                                   run_id="r5")
    assert attempts == {} and held == {}



def test_a_retried_scene_the_catalog_no_longer_lists_is_quarantined_not_retried_for_ever():
    """Before: a failed scene whose item was then deleted stayed in the retry list for ever, so every night ran a
    retry task (Ray, the model) instead of the quiet path. Now each run that cannot list it counts as a failure."""
    from pipelines.archive.source import settle_retries

    bad = {"a/gone": {"updated": "2024-09-01T00:00:00Z", "error_type": "AssetNotFound", "message": "missing"}}
    retry, attempts, held = settle_retries({}, [], [], bad, [], max_attempts=3, run_id="r1")
    assert retry == ["a/gone"] and attempts == {"a/gone": 1} and held == {}
    state: dict = {"retry": retry, "attempts": attempts, "quarantined": held}
    for run in (2, 3):  # the item is deleted: its retry task lists nothing
        retry, attempts, held = settle_retries(state, state["retry"], [], {}, [], max_attempts=3, run_id=f"r{run}")
        state = {"retry": retry, "attempts": attempts, "quarantined": held}
    assert retry == [] and held["a/gone"]["error_type"] == "NotListed" and held["a/gone"]["attempts"] == 3
    assert held["a/gone"]["run_id"] == "r3"
    # listed again and committed, or listed and failing: the usual rules
    retry, attempts, held = settle_retries({"attempts": {"a/x": 1, "a/y": 1}}, ["a/x", "a/y"], ["a/x", "a/y"],
                                           {"a/y": bad["a/gone"]}, ["a/x"], max_attempts=3, run_id="r4")
    assert retry == ["a/y"] and attempts == {"a/y": 2} and held == {}
    # listed but not processed here (left to another window): it leaves the list, as before
    retry, attempts, held = settle_retries({}, ["a/z"], ["a/z"], {}, [], max_attempts=3, run_id="r5")
    assert retry == [] and attempts == {}
    # no retry task searched for it (a run without a watermark): it stays in the list, no failure counted
    retry, attempts, held = settle_retries({}, ["a/w"], [], {}, [], max_attempts=3, run_id="r6", searched=())
    assert retry == ["a/w"] and attempts == {} and held == {}

def test_a_read_task_looks_up_the_ledger_a_chunk_of_items_at_a_time(world_items, policy):
    """A window without a start (the first window of an incremental run) can span nearly the whole index: the read
    task keeps it as Arrow and turns only the current chunk's entries into Python objects, still skipping every
    committed item and still pulling the search lazily."""
    import pyarrow as pa

    from pipelines.archive.source import _PagedIndex, _window_table

    n, chunk = 1_000, 64
    proto = [f"{world_items[k % len(world_items)]['id']}-{k}" for k in range(n)]
    committed_ids = proto[::3]  # every third streamed item is committed...
    noise = [f"elsewhere-{k}" for k in range(50_000)]  # ...among many entries of other scenes
    collections = {i["id"]: i["collection"] for i in world_items}
    rows = [(collections[s.rsplit("-", 1)[0]], s) for s in committed_ids] + [("toyworld-optical", s) for s in noise]
    table = pa.table({
        "collection": [c for c, _ in rows], "scene_id": [s for _, s in rows], "date": ["unknown"] * len(rows),
        "updated": pa.array([datetime(2030, 1, 1, tzinfo=timezone.utc)] * len(rows)),
        "unit_id": ["u0"] * len(rows),
    })
    index = _PagedIndex(_window_table(table, Window()), first=chunk, largest=2 * chunk)
    largest = [0]

    class Watched(dict):  # scene_rows' view of the index: record its size at every lookup
        def get(self, key, default=None):  # type: ignore[override]
            largest[0] = max(largest[0], len(index))
            return index.get(key, default)

    pulled = [0]
    counts: dict = {}
    blocks = scene_rows(index.track(_stream(world_items, n, pulled)), Window(), Watched(), policy, counts,
                        build_scenes=False)
    next(blocks)
    assert pulled[0] == chunk  # lazy: one chunk listed, not the window
    for _ in blocks:
        pass
    assert counts["matched"] == n and counts["skip_reasons"] == {"already committed": len(committed_ids)}
    assert counts["planned"] == n - len(committed_ids)
    assert 0 < largest[0] <= 2 * chunk  # never more than one chunk's entries as Python objects
