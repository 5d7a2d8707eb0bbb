"""``earthgpt similar SCENE_ID/TILE_ID -k 10``: the tiles whose embeddings are nearest (cosine) to one tile's.

The search streams the archive scene by scene: each scene's tile-grid ``embedding`` array (one Zarr chunk, found
through ``scenes.embeddings_group``, read with zarr directly) is read by a dask task that scores its tiles and keeps only its own top k; a
bounded number of scenes (``batch``) is in flight at a time and a running top k is merged on the driver. Memory is
therefore ``batch`` scene grids plus the ``scenes`` ids, whatever the archive's size; all embeddings are never
loaded together.

Only scenes of the query tile's ``output_key`` are searched (embeddings of another model are not comparable);
``collection=``, ``sensor=``, ``start=``/``end=`` and an area (``bbox=``/``geometry=``) narrow the candidates. With
an area, a tile is a candidate when its centre lies inside it. The query tile itself is left out.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipelines.cli import add_root_argument
from pipelines.results.outputs import Outputs, to_area

RESULT_COLUMNS = ["rank", "score", "collection", "scene_id", "tile_id", "caption", "class_label", "detections",
                  "datetime", "row_off", "col_off"]


@dataclass(frozen=True)
class Hit:
    """One scored tile (before its table row is attached)."""

    score: float
    collection: str
    scene_id: str
    row_off: int
    col_off: int


@dataclass
class SearchStats:
    """What a search read: for the cost figures in ``docs/querying.md``."""

    scenes: int = 0
    tiles_scored: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


def split_tile_ref(ref: str, scene: str | None = None) -> tuple[str, str]:
    """``SCENE_ID/TILE_ID`` (or a bare tile id with ``scene``) → ``(scene_id, tile_id)``."""
    if scene:
        return scene, ref
    scene_id, sep, tile_id = ref.rpartition("/")
    if not sep or not scene_id or not tile_id:
        raise ValueError(f"tile: expected SCENE_ID/TILE_ID (e.g. toy-sar-000-s0/r0002_c0005), got {ref!r}")
    return scene_id, tile_id


def _grid_index(rows: np.ndarray, cols: np.ndarray, row_off: int, col_off: int) -> tuple[int, int]:
    i, j = np.flatnonzero(rows == row_off), np.flatnonzero(cols == col_off)
    if not len(i) or not len(j):
        raise KeyError(f"tile at row_off {row_off}, col_off {col_off} is not on the scene's embedding grid")
    return int(i[0]), int(j[0])


@dataclass
class SceneGrid:
    """The arrays of one scene's group that the search reads (read with zarr directly: no xarray decoding)."""

    embedding: np.ndarray
    row_off: np.ndarray
    col_off: np.ndarray
    group: Any

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Tile-centre coordinates in the scene CRS, as ``(ny, nx)`` arrays."""
        names = set(self.group.array_keys())
        if "xc" in names:
            return np.asarray(self.group["xc"]), np.asarray(self.group["yc"])
        return np.meshgrid(np.asarray(self.group["x"]), np.asarray(self.group["y"]))

    def crs_wkt(self) -> str:
        return str(self.group["spatial_ref"].attrs["crs_wkt"])


def read_grid(outputs: Outputs, group: str) -> SceneGrid:
    """Read one scene group's embedding grid and offsets (one chunk each)."""
    zgroup = outputs.zarr_group(group)
    return SceneGrid(np.asarray(zgroup["embedding"], dtype=np.float32), np.asarray(zgroup["row_off"]),
                     np.asarray(zgroup["col_off"]), zgroup)


def _area_mask(grid: SceneGrid, area: Any) -> np.ndarray:
    """Which tiles have their centre inside a WGS84 area (transformed into the scene CRS)."""
    import shapely
    from pyproj import CRS, Transformer

    to_scene = Transformer.from_crs(4326, CRS.from_wkt(grid.crs_wkt()), always_xy=True)
    local = shapely.ops.transform(to_scene.transform, shapely.segmentize(area, 0.01))
    xs, ys = grid.centres()
    return np.asarray(shapely.contains_xy(local, xs, ys), dtype=bool)


def score_scene(outputs: Outputs, collection: str, scene_id: str, group: str, query: np.ndarray, k: int,
                area: Any = None, exclude: tuple[int, int] | None = None) -> tuple[list[Hit], int, int]:
    """Cosine similarity of every tile of one scene to ``query``; its best ``k``.

    Args:
        outputs: The output root.
        collection: The scene's collection.
        scene_id: The scene id.
        group: Its ``embeddings_group``.
        query: The unit-norm query embedding.
        k: How many to keep.
        area: Optional WGS84 area: only tiles whose centre lies inside.
        exclude: ``(row_off, col_off)`` of a tile to leave out (the query tile).

    Returns:
        The scene's best hits, the number of tiles scored, and the bytes of embeddings read.
    """
    grid = read_grid(outputs, group)
    emb = grid.embedding
    ny, nx, dim = emb.shape
    if dim != query.shape[0]:
        return [], 0, emb.nbytes  # another model's embeddings: not comparable
    flat = emb.reshape(ny * nx, dim)
    norms = np.linalg.norm(flat, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if area is not None:
        ok &= _area_mask(grid, area).reshape(-1)
    rows = np.repeat(grid.row_off, nx)
    cols = np.tile(grid.col_off, ny)
    if exclude is not None:
        ok &= ~((rows == exclude[0]) & (cols == exclude[1]))
    idx = np.flatnonzero(ok)
    if not len(idx):
        return [], 0, emb.nbytes
    scores = flat[idx] @ query / norms[idx]
    top = idx[np.argsort(-scores, kind="stable")[:k]] if len(idx) > k else idx[np.argsort(-scores, kind="stable")]
    by_index = dict(zip(idx.tolist(), scores.tolist(), strict=True))
    hits = [Hit(float(by_index[t]), collection, scene_id, int(rows[t]), int(cols[t])) for t in top.tolist()]
    return hits, len(idx), emb.nbytes


def find_similar(
    outputs: Outputs,
    tile: str,
    *,
    scene: str | None = None,
    k: int = 10,
    query_collection: str | None = None,
    output_key: str | None = None,
    batch: int = 16,
    stats: SearchStats | None = None,
    **filters: Any,
) -> Any:
    """The ``k`` tiles most similar to one tile, by cosine similarity of their embeddings.

    Args:
        outputs: The output root (:func:`~pipelines.results.open_outputs`).
        tile: ``SCENE_ID/TILE_ID``, or a tile id with ``scene``.
        scene: The query tile's scene id.
        k: Number of results.
        query_collection: The query scene's collection, when its id is committed in several.
        output_key: The query scene's output key, when it was processed under several; the search covers only
            scenes of that key.
        batch: Scenes scored concurrently (memory holds about this many scene grids).
        stats: Filled with what was read, if given.
        **filters: Candidate filters on scenes: ``collection``, ``sensor``, ``start``, ``end``, ``bbox``,
            ``geometry``.

    Returns:
        A GeoDataFrame of the hits, best first: ``rank``, ``score``, ids, caption, class label, detections and the
        tile footprint.

    Raises:
        KeyError: The tile or its scene is not committed.
        ValueError: The tile has no embedding (skipped), or bad arguments.
    """
    import dask
    import geopandas as gpd

    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    t0 = time.perf_counter()
    stats = stats if stats is not None else SearchStats()
    scene_id, tile_id = split_tile_ref(tile, scene)
    qrow = outputs.scene_row(scene_id, collection=query_collection, output_key=output_key)
    key, qcollection = str(qrow["output_key"]), str(qrow["collection"])
    when = pd.Timestamp(qrow["datetime"])  # the scene's date partition: read only that one
    qtiles = outputs.tiles(columns=["tile_id", "row_off", "col_off", "status"], scene=scene_id,
                           collection=qcollection, output_key=key, start=when, end=when)
    qtile = qtiles[qtiles["tile_id"] == tile_id]
    if qtile.empty:
        raise KeyError(f"tile: {scene_id} has no tile {tile_id!r} (tile ids look like r0002_c0004)")
    row_off, col_off = int(qtile.iloc[0]["row_off"]), int(qtile.iloc[0]["col_off"])
    qgrid = read_grid(outputs, str(qrow["embeddings_group"]))
    i, j = _grid_index(qgrid.row_off, qgrid.col_off, row_off, col_off)
    query = qgrid.embedding[i, j].astype(np.float32)
    norm = float(np.linalg.norm(query))
    if not math.isfinite(norm) or norm == 0:
        raise ValueError(f"tile: {scene_id}/{tile_id} has no embedding (status {qtile.iloc[0]['status']!r})")
    query = query / norm

    area_arg = filters.pop("bbox", None)
    area_arg = filters.pop("geometry", None) if area_arg is None else area_arg
    area = to_area(area_arg)
    candidates = outputs.scenes(columns=["scene_id", "embeddings_group", "output_key", "datetime"],
                                output_key=key, geometry=area, **filters)
    when_of = dict(zip(zip(candidates["collection"], candidates["scene_id"], strict=True), candidates["datetime"],
                       strict=True))
    best: list[tuple[float, int, Hit]] = []  # min-heap of the running top k
    order = 0
    rows = list(candidates[["collection", "scene_id", "embeddings_group"]].itertuples(index=False, name=None))
    for start in range(0, len(rows), max(1, batch)):
        tasks = [
            dask.delayed(score_scene)(outputs, c, s, g, query, k, area,
                                      (row_off, col_off) if (c, s) == (qcollection, scene_id) else None)
            for c, s, g in rows[start:start + batch]
        ]
        for hits, scored, nbytes in dask.compute(*tasks, scheduler="threads", num_workers=min(batch, 8)):
            stats.scenes += 1
            stats.tiles_scored += scored
            stats.bytes_read += nbytes
            for hit in hits:
                order += 1
                item = (hit.score, -order, hit)
                if len(best) < k:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
    ranked = [h for _, _, h in sorted(best, key=lambda t: (-t[0], -t[1]))]
    stats.seconds = time.perf_counter() - t0
    return _attach_tiles(outputs, ranked, key, when_of) if ranked else gpd.GeoDataFrame(
        pd.DataFrame(columns=RESULT_COLUMNS), geometry=gpd.GeoSeries([], crs=4326))


def _attach_tiles(outputs: Outputs, hits: Sequence[Hit], key: str, when_of: Mapping[tuple[str, str], Any]) -> Any:
    """The hits with their ``tiles`` rows (ids, caption, footprint), in rank order; each hit scene's rows are read
    from its own date partition only."""
    columns = ["scene_id", "tile_id", "row_off", "col_off", "caption", "class_label", "detections", "datetime"]
    parts = [outputs.tiles(columns=columns, scene=s, collection=c, output_key=key, start=when_of[(c, s)],
                           end=when_of[(c, s)]) for c, s in dict.fromkeys((h.collection, h.scene_id) for h in hits)]
    tiles = pd.concat(parts, ignore_index=True)
    ranks = pd.DataFrame([
        {"rank": r + 1, "score": h.score, "collection": h.collection, "scene_id": h.scene_id,
         "row_off": h.row_off, "col_off": h.col_off} for r, h in enumerate(hits)
    ])
    for col in ("row_off", "col_off"):
        tiles[col] = tiles[col].astype("int64")
    merged = ranks.merge(tiles, on=["collection", "scene_id", "row_off", "col_off"], how="left")
    merged = merged.sort_values("rank").reset_index(drop=True)
    import geopandas as gpd

    return gpd.GeoDataFrame(merged[[*RESULT_COLUMNS, "geometry"]], geometry="geometry", crs=4326)


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt similar SCENE_ID/TILE_ID -k 10 [--collection C] [--bbox W S E N] --root ROOT``."""
    from pipelines.query import FORMATS, write_frame

    parser = argparse.ArgumentParser(
        prog="earthgpt similar",
        description="The tiles most similar to one tile (cosine similarity of their embeddings), streamed scene "
        "by scene; only scenes of the query tile's output key are searched.",
    )
    parser.add_argument("tile", help="SCENE_ID/TILE_ID, e.g. toy-sar-000-s0/r0002_c0005 (or a tile id with --scene)")
    parser.add_argument("--scene", help="the query tile's scene id (then TILE is a bare tile id)")
    parser.add_argument("-k", type=int, default=10, help="number of results (default %(default)s)")
    add_root_argument(parser)
    parser.add_argument("--collection", action="append", help="search only this collection (repeatable)")
    parser.add_argument("--sensor", action="append", help="search only this sensor (optical, sar, thermal)")
    parser.add_argument("--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"),
                        help="search only tiles whose centre lies in this WGS84 box")
    parser.add_argument("--start", help="search only scenes acquired at or after this date/time")
    parser.add_argument("--end", help="search only scenes acquired at or before this date/time")
    parser.add_argument("--query-collection", help="the query scene's collection, if its id is in several")
    parser.add_argument("--output-key", help="the query scene's output key, if it was processed under several")
    parser.add_argument("--batch", type=int, default=16, help="scenes scored at a time (memory bound)")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument("--out", help="write the result to this file")
    args = parser.parse_args(argv)
    try:
        outputs = Outputs(args.root)
        stats = SearchStats()
        hits = find_similar(
            outputs, args.tile, scene=args.scene, k=args.k, query_collection=args.query_collection,
            output_key=args.output_key, batch=args.batch, stats=stats, collection=args.collection,
            sensor=args.sensor, bbox=args.bbox, start=args.start, end=args.end,
        )
        write_frame(hits, args.format, args.out)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"earthgpt similar: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(f"earthgpt similar: scored {stats.tiles_scored} tiles in {stats.scenes} scenes "
          f"({stats.bytes_read / 2**20:.1f} MiB of embeddings) in {stats.seconds:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
