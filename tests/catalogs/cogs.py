"""Small COGs with the structure a catalog's assets have (data type, nodata, CRS, grid origin, blocks, overviews).

Generated in the tests from a parsed :class:`catalogs.scene.Scene`, never committed: each band's file holds one known
DN everywhere except a nodata strip on the left, so a test can check the physical value a window decodes to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine

NODATA_COLUMNS = 16


def write_cog(
    path: Path, value: float, *, dtype: str, nodata: float | None, crs: str, transform: tuple[float, ...],
    size: int = 512, block: int = 256,
) -> bytes:
    """Write a ``size``² single-band COG (``block``-px tiles, overviews) and return its bytes.

    Args:
        path: Where to write it.
        value: The DN of every valid pixel.
        dtype: Data type (``uint16``, ``float32``...).
        nodata: Nodata value, written into the header and the left strip; None for no nodata.
        crs: CRS of the grid.
        transform: Affine terms of the grid (only the first 6 are used).
        size: Width and height.
        block: Tile size.
    """
    data = np.full((size, size), value, dtype=dtype)
    if nodata is not None:
        data[:, :NODATA_COLUMNS] = nodata
    tmp = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 1, "dtype": dtype, "crs": crs,
               "transform": Affine(*transform[:6]), "nodata": nodata}
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data, 1)
    rasterio.shutil.copy(tmp, path, driver="COG", BLOCKSIZE=block, OVERVIEW_RESAMPLING="NEAREST")
    tmp.unlink()
    return path.read_bytes()
