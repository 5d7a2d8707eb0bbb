"""The tile plan: a grid of square windows over a scene.

Rules (the same for every scene, so neighbouring runs tile alike):

- Windows are ``size`` × ``size`` pixels with a stride of ``size - overlap``, starting at the top-left pixel.
- **Edge windows are shifted inward**: the last window of a row or column ends exactly at the scene edge, so it
  overlaps its neighbour by more than ``overlap`` rather than hanging over the edge. Every window then lies inside
  the scene and every pixel is covered.
- **Scenes smaller than a tile** (along an axis) get one window starting at 0 of the full ``size``; it reaches past
  the scene edge and the reader pads the part outside with nodata (``valid`` False there).
- With ``overlap == 0`` and ``size`` a multiple of the COG block size, every window except shifted edge windows is
  block-aligned, so a tile costs about one range request per band.
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window


@dataclass(frozen=True)
class Tile:
    """One window of the plan.

    Attributes:
        row: Tile row index in the grid.
        col: Tile column index in the grid.
        window: Pixel window on the scene's reference grid (may reach past the scene for small scenes).
    """

    row: int
    col: int
    window: Window

    @property
    def tile_id(self) -> str:
        """A stable id within a scene: ``r{row}_c{col}``."""
        return f"r{self.row:04d}_c{self.col:04d}"


def _offsets(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] + size < length:
        offsets.append(length - size)  # shifted inward: ends exactly at the edge
    return offsets


def plan_tiles(height: int, width: int, size: int, overlap: int = 0) -> list[Tile]:
    """Plan the windows covering a ``height`` × ``width`` scene.

    Args:
        height: Scene rows.
        width: Scene columns.
        size: Window side in pixels.
        overlap: Pixels shared by neighbouring windows (``0 <= overlap < size``).

    Returns:
        Tiles in row-major order. See the module docstring for edge handling.

    Raises:
        ValueError: On a non-positive size or scene dimension, or an overlap outside ``[0, size)``.
    """
    if size <= 0 or height <= 0 or width <= 0:
        raise ValueError(f"size and scene dimensions must be positive (size={size}, shape=({height}, {width}))")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size): overlap={overlap}, size={size}")
    stride = size - overlap
    rows = _offsets(height, size, stride)
    cols = _offsets(width, size, stride)
    return [
        Tile(row=i, col=j, window=Window(col_off=c, row_off=r, width=size, height=size))
        for i, r in enumerate(rows)
        for j, c in enumerate(cols)
    ]
