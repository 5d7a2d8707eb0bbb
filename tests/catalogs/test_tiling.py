"""The tile plan: full coverage, windows inside the scene, edge windows shifted inward, small scenes padded."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalogs.tiling import plan_tiles


def test_regular_grid() -> None:
    tiles = plan_tiles(256, 256, 64)
    assert len(tiles) == 16
    assert {(t.window.col_off, t.window.row_off) for t in tiles} == {(c, r) for r in range(0, 256, 64)
                                                                     for c in range(0, 256, 64)}
    assert tiles[5].tile_id == "r0001_c0001"


def test_edge_windows_shift_inward() -> None:
    tiles = plan_tiles(100, 150, 64, overlap=8)
    rows = sorted({t.window.row_off for t in tiles})
    cols = sorted({t.window.col_off for t in tiles})
    assert rows == [0, 36]  # 0, then the last window ends at 100
    assert cols == [0, 56, 86]  # stride 56; the last one ends at 150
    assert all(t.window.width == 64 and t.window.height == 64 for t in tiles)


def test_small_scene_is_one_padded_window() -> None:
    tiles = plan_tiles(40, 30, 64)
    assert len(tiles) == 1
    w = tiles[0].window
    assert (w.col_off, w.row_off, w.width, w.height) == (0, 0, 64, 64)


@pytest.mark.parametrize("args", [(0, 10, 4, 0), (10, 10, 0, 0), (10, 10, 4, 4), (10, 10, 4, -1)])
def test_bad_arguments(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        plan_tiles(*args)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), size=st.integers(1, 96), data=st.data())
def test_plan_covers_every_pixel_and_stays_inside(h: int, w: int, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    tiles = plan_tiles(h, w, size, overlap)
    cover = np.zeros((h, w), dtype=np.int32)
    for t in tiles:
        r, c = int(t.window.row_off), int(t.window.col_off)
        assert t.window.width == size and t.window.height == size
        assert r >= 0 and c >= 0
        if h >= size:
            assert r + size <= h
        if w >= size:
            assert c + size <= w
        cover[r:r + size, c:c + size] += 1
    assert cover.min() >= 1
    assert len({(t.row, t.col) for t in tiles}) == len(tiles)
