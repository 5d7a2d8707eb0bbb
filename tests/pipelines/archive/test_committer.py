"""Closed commit units that waited for the commit before them are merged when their turn comes (bounded), so a
cluster that finishes units faster than the store commits them does not queue units, and small files, all night."""

from __future__ import annotations

import collections

from pipelines.archive.job import _merge_waiting, _Unit


def _units(*tiles: int) -> collections.deque[_Unit]:
    return collections.deque(
        _Unit(unit_id=f"r-u{i:05d}", parts=[(f"s{i}", f"r{i}")], tiles=t) for i, t in enumerate(tiles)
    )


def test_a_unit_that_keeps_pace_is_staged_alone() -> None:
    closed = _units(2048)
    unit = _merge_waiting(closed, 16 * 2048)
    assert unit.unit_id == "r-u00000" and unit.merged == 0 and unit.parts == [("s0", "r0")] and not closed


def test_waiting_units_are_merged_in_order_up_to_the_bound() -> None:
    closed = _units(2048, 2050, 2100, 2048, 9000)
    unit = _merge_waiting(closed, 4 * 2048 + 100)  # 2048 + 2050 + 2100 + 2048 = 8246 fits; + 9000 would not
    assert unit.unit_id == "r-u00000" and unit.merged == 3 and unit.tiles == 8246
    assert unit.parts == [("s0", "r0"), ("s1", "r1"), ("s2", "r2"), ("s3", "r3")]  # every scene once, in order
    assert [u.unit_id for u in closed] == ["r-u00004"]  # the rest waits for the next turn
    nxt = _merge_waiting(closed, 4 * 2048 + 100)
    assert nxt.unit_id == "r-u00004" and nxt.merged == 0 and not closed


def test_without_a_tile_limit_everything_waiting_is_merged() -> None:
    closed = _units(5, 7, 11)
    unit = _merge_waiting(closed, None)
    assert unit.merged == 2 and unit.tiles == 23 and len(unit.parts) == 3 and not closed
