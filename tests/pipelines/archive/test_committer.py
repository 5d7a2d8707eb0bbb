"""Closed commit units that waited for the commit before them are merged when their turn comes (bounded), so a
cluster that finishes units faster than the store commits them does not queue units, and small files, all night."""

from __future__ import annotations

import collections

import pytest

from pipelines.archive import job
from pipelines.archive.job import _merge_waiting, _Unit


def _units(*tiles: int) -> collections.deque[_Unit]:
    return collections.deque(
        _Unit(unit_id=f"r-u{i:05d}", parts=[(f"s{i}", f"r{i}")], tiles=t) for i, t in enumerate(tiles)
    )


def test_a_unit_that_keeps_pace_is_staged_alone() -> None:
    closed = _units(2048)
    unit = _merge_waiting(closed, 2048)
    assert unit.unit_id == "r-u00000" and unit.merged == 0 and unit.parts == [("s0", "r0")] and not closed


def test_waiting_units_are_merged_in_order_up_to_the_bound() -> None:
    closed = _units(2048, 2050, 2100, 2048, 9000)
    unit = _merge_waiting(closed, 518)  # 16 x 518 = 8288: 2048 + 2050 + 2100 + 2048 = 8246 fits; + 9000 not
    assert unit.unit_id == "r-u00000" and unit.merged == 3 and unit.tiles == 8246
    assert unit.parts == [("s0", "r0"), ("s1", "r1"), ("s2", "r2"), ("s3", "r3")]  # every scene once, in order
    assert [u.unit_id for u in closed] == ["r-u00004"]  # the rest waits for the next turn
    nxt = _merge_waiting(closed, 518)
    assert nxt.unit_id == "r-u00004" and nxt.merged == 0 and not closed


def test_without_a_tile_limit_units_merge_up_to_sixteen_times_the_oldest() -> None:
    closed = _units(5, 7, 11, 60)
    unit = _merge_waiting(closed, None)  # 16 x 5 = 80 tiles: 5 + 7 + 11 fit, + 60 would not
    assert unit.merged == 2 and unit.tiles == 23 and len(unit.parts) == 3
    assert [u.tiles for u in closed] == [60]


def test_merging_stops_at_the_scene_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit's record lists every staged file: many one-tile scenes must not merge into a record readers refuse."""
    monkeypatch.setattr(job, "_MERGE_SCENES", 3)
    closed = _units(1, 1, 1, 1, 1)
    unit = _merge_waiting(closed, 2048)
    assert len(unit.parts) == 3 and unit.merged == 2 and len(closed) == 2
