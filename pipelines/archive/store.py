"""Where results land: GeoParquet 1.1 tables partitioned by collection and date, and a Zarr v3 store of per-scene
tile-grid arrays. Layout under the output root (a local folder or ``s3://bucket/prefix``)::

    scenes/collection=<c>/date=<YYYY-MM-DD>/part-<unit>.parquet
    tiles/…  detections/…  errors/…          (same partitioning)
    runs/date=<YYYY-MM-DD>/run-<run_id>.parquet
    embeddings.zarr/<output_key>/<collection>/<scene_id>/  (one xarray dataset per scene, scene-CRS coordinates)
    _ledger/, _staging/                      (commit bookkeeping, see pipelines.archive.ledger)

Partition columns live only in the paths (Hive style): geopandas, pyarrow and DuckDB add ``collection`` and ``date``
back as columns and prune on them. Every column is documented in ``docs/outputs.md``; the schemas below are the
single source of truth for types, so files written by different units always union cleanly.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.asyn
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely

TABLES: tuple[str, ...] = ("scenes", "tiles", "detections", "errors", "runs")
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})  # fsspec's listing-caching filesystems
EMBEDDINGS_STORE = "embeddings.zarr"

_TS = pa.timestamp("us", tz="UTC")
_COMMON = [("run_id", pa.string()), ("unit_id", pa.string()), ("output_key", pa.string())]

# Column name -> Arrow type, per table, in file order. ``geometry`` (WGS84) is added by geopandas.
SCHEMAS: dict[str, pa.Schema] = {
    "scenes": pa.schema(
        [
            ("scene_id", pa.string()),
            ("datetime", _TS),
            ("updated", _TS),
            ("sensor", pa.string()),
            ("crs", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("transform", pa.list_(pa.float64())),
            ("tiles_planned", pa.int32()),
            ("tiles_written", pa.int32()),
            ("tiles_skipped", pa.int32()),
            ("detections", pa.int32()),
            ("embeddings_group", pa.string()),
            ("model", pa.string()),
            ("processed_at", _TS),
            *_COMMON,
        ]
    ),
    "tiles": pa.schema(
        [
            ("scene_id", pa.string()),
            ("tile_id", pa.string()),
            ("datetime", _TS),
            ("row", pa.int32()),
            ("col", pa.int32()),
            ("col_off", pa.int32()),
            ("row_off", pa.int32()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("status", pa.string()),
            ("skip_reason", pa.string()),
            ("valid_fraction", pa.float32()),
            ("caption", pa.string()),
            ("caption_logprob", pa.float32()),
            ("class_label", pa.string()),
            ("class_logprob", pa.float32()),
            ("detect_logprob", pa.float32()),
            ("boxes_parsed", pa.int32()),
            ("boxes_malformed", pa.int32()),
            ("detections", pa.int32()),
            ("vqa_questions", pa.list_(pa.string())),
            ("vqa_answers", pa.list_(pa.string())),
            *_COMMON,
        ]
    ),
    "detections": pa.schema(
        [
            ("scene_id", pa.string()),
            ("tile_id", pa.string()),
            ("detection_id", pa.int32()),
            ("datetime", _TS),
            ("label", pa.string()),
            ("confidence", pa.float32()),
            ("tile_x1", pa.float32()),
            ("tile_y1", pa.float32()),
            ("tile_x2", pa.float32()),
            ("tile_y2", pa.float32()),
            ("scene_x1", pa.float64()),
            ("scene_y1", pa.float64()),
            ("scene_x2", pa.float64()),
            ("scene_y2", pa.float64()),
            ("crs", pa.string()),
            ("crs_minx", pa.float64()),
            ("crs_miny", pa.float64()),
            ("crs_maxx", pa.float64()),
            ("crs_maxy", pa.float64()),
            *_COMMON,
        ]
    ),
    "errors": pa.schema(
        [
            ("scene_id", pa.string()),
            ("tile_id", pa.string()),
            ("datetime", _TS),
            ("stage", pa.string()),
            ("error_type", pa.string()),
            ("message", pa.string()),
            ("asset", pa.string()),
            ("href", pa.string()),
            ("occurred_at", _TS),
            *_COMMON,
        ]
    ),
    "runs": pa.schema(
        [
            ("run_id", pa.string()),
            ("status", pa.string()),
            ("started_at", _TS),
            ("finished_at", _TS),
            ("output_key", pa.string()),
            ("model", pa.string()),
            ("engine", pa.string()),
            ("tasks", pa.list_(pa.string())),
            ("collections", pa.list_(pa.string())),
            ("config", pa.string()),
            ("scenes_matched", pa.int64()),
            ("scenes_skipped", pa.int64()),
            ("scenes_processed", pa.int64()),
            ("scenes_failed", pa.int64()),
            ("tiles_planned", pa.int64()),
            ("tiles_written", pa.int64()),
            ("tiles_skipped", pa.int64()),
            ("tiles_failed", pa.int64()),
            ("detections", pa.int64()),
            ("errors", pa.int64()),
            ("units_committed", pa.int64()),
            ("files_folded", pa.int64()),
            ("wall_s", pa.float64()),
            ("tiles_per_s", pa.float64()),
            ("full_scan", pa.bool_()),
            ("updated_since", _TS),
            ("watermark", _TS),
            ("read_tasks", pa.int64()),
            ("startup_s", pa.float64()),
            ("model_actors", pa.int64()),
            ("model_loads", pa.int64()),
            ("batch_plan", pa.string()),
        ]
    ),
}


def write_temporary(path: str, data: bytes) -> str:
    """Write ``data`` durably (fsync) to a unique temporary file beside local ``path``; the caller renames or links
    it into place, so readers see the whole file or none.

    Returns:
        The temporary file's path.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


class OutputStore:
    """The output root on a local disk or an object store, with the few file operations the sinks need.

    Writes are atomic per file: a local file is written under a temporary name and renamed; an object-store PUT is
    atomic by nature. So a reader never sees half a file.

    Args:
        root: A local folder or a URL (``s3://bucket/prefix``).
        storage_options: fsspec options (``endpoint_url``...); credentials come from the environment.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        options = dict(storage_options or {})
        if root.split("://", 1)[0] in _OBJECT_STORES:
            # a run writes then lists; a cached listing would hide what it just wrote (and the ledger's compaction
            # relies on listing the records before the staging folders, each listing fresh)
            options.setdefault("use_listings_cache", False)
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        self.protocol = root.split("://", 1)[0] if "://" in root else "file"
        self.local = self.protocol == "file"
        if self.local:
            path = os.path.abspath(path)
            os.makedirs(path, exist_ok=True)
        self.path = path.rstrip("/")
        self.storage_options = options
        # fsspec's asynchronous filesystems (s3fs, gcsfs, adlfs) run a list of copies or deletes concurrently
        self.batch_copies = not self.local and isinstance(self.fs, fsspec.asyn.AsyncFileSystem)

    def full(self, rel: str) -> str:
        """The filesystem path (no protocol) of ``rel`` under the root."""
        return posixpath.join(self.path, rel) if rel else self.path

    def url(self, rel: str = "") -> str:
        """A URL of ``rel`` under the root that other libraries (xarray, DuckDB, pyarrow) open."""
        return self.full(rel) if self.local else f"{self.protocol}://{self.full(rel)}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically (temporary name + rename locally; one PUT on object stores)."""
        path = self.full(rel)
        if self.local:
            os.replace(write_temporary(path, data), path)
        else:
            self.fs.pipe_file(path, data)

    def read_bytes(self, rel: str) -> bytes:
        """Read a whole file."""
        return bytes(self.fs.cat_file(self.full(rel)))

    def exists(self, rel: str) -> bool:
        """Whether a file or folder exists."""
        return bool(self.fs.exists(self.full(rel)))

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root that match ``pattern`` (sorted)."""
        prefix = self.path + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in self.fs.glob(self.full(pattern)))

    def children(self, folder: str) -> list[str]:
        """The names of the files and folders directly in ``folder``, from one listing (none if it is not there)."""
        try:
            entries = self.fs.ls(self.full(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    def sizes(self, folder: str) -> dict[str, int]:
        """The files directly in ``folder`` (paths relative to the root) and their sizes, from one listing."""
        prefix = self.path + "/"
        try:
            entries = self.fs.ls(self.full(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"][len(prefix):]: int(e["size"]) for e in entries
                if e.get("type") == "file" and e["name"].startswith(prefix)}

    def move(self, src: str, dst: str) -> None:
        """Move a file (a rename locally; copy + delete on object stores)."""
        if self.local:
            os.makedirs(os.path.dirname(self.full(dst)), exist_ok=True)
            os.replace(self.full(src), self.full(dst))
        else:
            self.fs.mv(self.full(src), self.full(dst))

    def copy_many(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Copy files (``(src, dst)`` pairs) in one call: concurrent requests on an asynchronous filesystem."""
        if pairs:
            self.fs.copy([self.full(s) for s, _ in pairs], [self.full(d) for _, d in pairs])

    def remove_many(self, rels: Sequence[str]) -> None:
        """Delete files in one call (bulk deletes on asynchronous object stores); missing files are ignored."""
        if not isinstance(self.fs, fsspec.asyn.AsyncFileSystem):  # one by one: rm of a list stops at a missing file
            for rel in rels:
                self.remove(rel)
        elif rels:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm([self.full(r) for r in rels])

    def remove(self, rel: str, recursive: bool = False) -> None:
        """Delete a file (or a folder with ``recursive``); missing paths are ignored."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.full(rel), recursive=recursive)


# --------------------------------------------------------------------------------------------------------- tables


# part-<unit>.parquet; part-<unit>-cow<i>.parquet for a copy-on-write rewrite published by <unit>;
# part-<unit>-fold<i>.parquet for files of a run's units folded together by <unit> (pipelines/archive/fold.py)
_PART = re.compile(r"^part-(?P<unit>.+?)(?:-(?:cow|fold)\d+)?\.parquet$")


def part_unit(path: str) -> str | None:
    """The commit unit that published a table file (``None`` for files not written per unit, like ``runs``)."""
    match = _PART.match(posixpath.basename(path))
    return match.group("unit") if match else None


def partition_dir(table: str, collection: str | None, date: str) -> str:
    """The Hive partition folder of a table: ``tiles/collection=<c>/date=<d>`` (``runs/date=<d>``)."""
    if table == "runs":
        return f"runs/date={date}"
    return f"{table}/collection={collection}/date={date}"


def build_frame(table: str, records: Sequence[Mapping[str, Any]], geometries: Sequence[Any]) -> gpd.GeoDataFrame:
    """Rows → a GeoDataFrame with the table's exact column types and WGS84 geometry.

    Args:
        table: One of :data:`TABLES`.
        records: One mapping per row; missing columns become nulls, unknown keys are an error.
        geometries: One shapely geometry (or ``None``) per row, in WGS84.

    Returns:
        The frame, ready for :func:`geoparquet_bytes`.
    """
    schema = SCHEMAS[table]
    unknown = {k for r in records for k in r} - set(schema.names)
    if unknown:
        raise KeyError(f"{table}: unknown columns {sorted(unknown)}")
    arrow = pa.Table.from_pylist([dict(r) for r in records], schema=schema)
    frame = arrow.to_pandas(types_mapper=pd.ArrowDtype)
    geoms = np.asarray(list(geometries), dtype=object) if len(records) else np.empty(0, dtype=object)
    if len(geoms) != len(frame):
        raise ValueError(f"{table}: {len(frame)} rows but {len(geoms)} geometries")
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geoms, crs="EPSG:4326"), crs="EPSG:4326")


def geoparquet_bytes(frame: gpd.GeoDataFrame) -> bytes:
    """Serialise a frame as GeoParquet 1.1 (WKB geometry, bbox covering column for spatial pruning)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False, schema_version="1.1.0", write_covering_bbox=True)
    # drop pandas' own metadata: it records Arrow-backed dtypes that older pandas cannot rebuild, and the Arrow
    # schema already says everything (readers must not need our pandas version)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    table = table.replace_schema_metadata({k: v for k, v in (table.schema.metadata or {}).items() if k != b"pandas"})
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    return out.getvalue()


@dataclass(frozen=True)
class StagedFile:
    """A file written under the unit's staging folder, and where it goes when the unit commits."""

    staged: str
    final: str


def stage_table(
    store: OutputStore,
    staging_dir: str,
    table: str,
    unit_id: str,
    rows: Iterable[tuple[str | None, str, Mapping[str, Any], Any]],
) -> list[StagedFile]:
    """Write one unit's rows of a table, one GeoParquet file per partition, into the staging folder.

    Args:
        store: The output root.
        staging_dir: The unit's staging folder (relative to the root).
        table: One of :data:`TABLES`.
        unit_id: Names the files (``part-<unit_id>.parquet``), so units never overwrite each other.
        rows: ``(collection, date, record, wgs84_geometry)`` per row.

    Returns:
        The staged files and their final paths.
    """
    groups: dict[tuple[str | None, str], tuple[list[Mapping[str, Any]], list[Any]]] = {}
    for collection, date, record, geom in rows:
        recs, geoms = groups.setdefault((collection, date), ([], []))
        recs.append(record)
        geoms.append(geom)
    staged = []
    for (collection, date), (recs, geoms) in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        name = f"run-{unit_id}.parquet" if table == "runs" else f"part-{unit_id}.parquet"
        final = f"{partition_dir(table, collection, date)}/{name}"
        path = f"{staging_dir}/{final}"
        store.write_bytes(path, geoparquet_bytes(build_frame(table, recs, geoms)))
        staged.append(StagedFile(staged=path, final=final))
    return staged


def read_table(store: OutputStore, table: str, columns: Sequence[str] | None = None) -> gpd.GeoDataFrame:
    """Read a whole output table (all partitions) with geopandas; empty frame with the schema if none yet.

    Args:
        store: The output root.
        table: One of :data:`TABLES`.
        columns: Columns to read (default all).

    Returns:
        The table, with ``collection``/``date`` partition columns.
    """
    files = store.glob(f"{table}/**/*.parquet")
    if not files:
        return build_frame(table, [], [])
    import pyarrow.dataset as ds

    dataset = ds.dataset(
        [store.full(f) for f in files], filesystem=store.fs, format="parquet", partitioning="hive",
        partition_base_dir=store.full(table),
    )
    cols = None if columns is None else list(dict.fromkeys([*columns, "geometry"]))
    arrow = dataset.to_table(columns=cols)
    meta = dataset.schema.metadata or {}
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **meta})
    return gpd.GeoDataFrame.from_arrow(arrow) if b"geo" in meta else gpd.GeoDataFrame(arrow.to_pandas())


# ---------------------------------------------------------------------------------------------------------- zarr


def embeddings_group(output_key: str, collection: str, scene_id: str) -> str:
    """The Zarr group of a scene's arrays inside ``embeddings.zarr``: ``<output_key>/<collection>/<scene_id>``.

    The output key comes first, so runs of different models (or tasks, tiling) over one root never touch each
    other's arrays.
    """
    safe = scene_id.replace("/", "_")
    return f"{output_key}/{collection}/{safe}"


@dataclass
class SceneGrid:
    """One scene's tile-grid arrays, georeferenced in the scene CRS.

    Attributes:
        collection: Collection id (first level of the group path).
        scene_id: STAC item id.
        crs: The scene CRS (WKT or ``EPSG:n``).
        transform: The scene's pixel-to-CRS affine coefficients ``(a, b, c, d, e, f)``.
        rows: ``(n_rows,)`` row offsets (pixels) of the tile grid's rows; tiles are ``tile_size`` pixels high.
        cols: ``(n_cols,)`` column offsets of the grid's columns.
        tile_size: Tile side in pixels.
        embedding: ``(n_rows, n_cols, d)`` float32 pooled visual embedding per tile (NaN where not computed).
        valid_fraction: ``(n_rows, n_cols)`` share of valid pixels per tile (NaN where not read).
        attrs: Extra attributes for the group (run id, model...).
        output_key: The config's output key (first level of the group path).
    """

    collection: str
    scene_id: str
    crs: str
    transform: Sequence[float]
    rows: np.ndarray
    cols: np.ndarray
    tile_size: int
    embedding: np.ndarray
    valid_fraction: np.ndarray
    attrs: dict[str, Any]
    output_key: str = ""

    def to_xarray(self) -> Any:
        """The grid as an ``xarray.Dataset`` with CF/rioxarray georeferencing (``spatial_ref``, x/y centres)."""
        import xarray as xr
        from pyproj import CRS

        a, b, c, d, e, f = (float(v) for v in list(self.transform)[:6])
        half = self.tile_size / 2.0
        rc = np.asarray(self.rows, dtype=np.float64) + half
        cc = np.asarray(self.cols, dtype=np.float64) + half
        crs = CRS.from_user_input(self.crs)
        spatial_ref = xr.DataArray(0, attrs={"crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt()})
        coords: dict[str, Any] = {
            "row_off": ("y", np.asarray(self.rows, dtype=np.int32)),
            "col_off": ("x", np.asarray(self.cols, dtype=np.int32)),
            "feature": np.arange(self.embedding.shape[-1], dtype=np.int32),
            "spatial_ref": spatial_ref,
        }
        if b == 0.0 and d == 0.0:
            coords["y"] = ("y", e * rc + f, {"standard_name": "projection_y_coordinate", "units": "m"})
            coords["x"] = ("x", a * cc + c, {"standard_name": "projection_x_coordinate", "units": "m"})
        else:  # rotated grid: tile centres need both indices
            cc2, rc2 = np.meshgrid(cc, rc)
            coords["xc"] = (("y", "x"), a * cc2 + b * rc2 + c)
            coords["yc"] = (("y", "x"), d * cc2 + e * rc2 + f)
        grid_attrs = {"grid_mapping": "spatial_ref"}
        return xr.Dataset(
            {
                "embedding": (("y", "x", "feature"), self.embedding.astype(np.float32), grid_attrs),
                "valid_fraction": (("y", "x"), self.valid_fraction.astype(np.float32), grid_attrs),
            },
            coords=coords,
            attrs={
                "collection": self.collection,
                "scene_id": self.scene_id,
                "tile_size": int(self.tile_size),
                "transform": [a, b, c, d, e, f],
                **self.attrs,
            },
        )


def write_scene_grid(store: OutputStore, grid: SceneGrid, under: str = "") -> list[str]:
    """Write one scene's group of ``embeddings.zarr`` as whole chunks, with the group's own consolidated metadata.

    Each array is a single chunk covering the scene's whole tile grid, so exactly one writer ever touches a chunk
    (two processes writing parts of one chunk lose data). The group is written as a store of its own: its
    consolidated metadata lives in the group's ``zarr.json`` and nothing above it is rewritten (a root-level
    consolidation would grow with every scene). The job writes it under its unit's staging folder (``under``) and
    the unit's commit moves it into place, with the unit's rows. Importing ``zarr`` here, not at module level,
    keeps this module picklable by Ray.

    Args:
        store: The output root.
        grid: The scene's arrays.
        under: A folder (relative to the root) holding the ``embeddings.zarr`` tree; ``""`` writes in place.

    Returns:
        The files written, relative to ``under``.
    """
    import zarr.storage

    group = embeddings_group(grid.output_key, grid.collection, grid.scene_id)
    rel = posixpath.join(under, EMBEDDINGS_STORE, group) if under else posixpath.join(EMBEDDINGS_STORE, group)
    ds = grid.to_xarray()
    encoding = {name: {"chunks": ds[name].shape} for name in ("embedding", "valid_fraction")}
    # A staging folder is new and the group's files few (a dozen): on an object store they are made in memory and
    # uploaded in one concurrent call. Written through zarr's fsspec store, each array's "mode w" listed and probed
    # its prefix first: about 80 requests one after another per scene, seconds of a unit's commit at 50 ms each.
    memory: dict[str, Any] | None = {} if under and not store.local else None
    if store.local:
        zstore: Any = zarr.storage.LocalStore(store.full(rel))
    elif memory is not None:
        zstore = zarr.storage.MemoryStore(memory)
    else:  # in place on an object store: "mode w" clears what an older version of the group left
        zstore = zarr.storage.FsspecStore(fs=_async_fs(store), path=store.full(rel))
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is not in the v3 spec yet; xarray reads it, and it saves a
        # round trip per array when a reader opens a scene on object storage
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(zstore, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
    prefix = posixpath.join(under, "") if under else ""
    if memory is not None:
        files = {posixpath.join(rel, key): memory.pop(key).to_bytes() for key in list(memory)}  # one copy held
        store.fs.pipe({store.full(path): data for path, data in files.items()})
        return sorted(path[len(prefix):] for path in files)
    return [p[len(prefix):] for p in store.glob(f"{rel}/**") if not store.fs.isdir(store.full(p))]


_EMPTY_GROUP = b'{"zarr_format": 3, "node_type": "group", "attributes": {}}'


def ensure_parent_groups(store: OutputStore, group: str) -> None:
    """Write the (empty, never changing) group nodes above a scene's group, so that ``xr.open_zarr(root,
    group=...)`` can walk from the store's root. Idempotent; concurrent writers write identical bytes."""
    parts = group.split("/")[:-1]
    for depth in range(len(parts) + 1):
        node = posixpath.join(EMBEDDINGS_STORE, *parts[:depth], "zarr.json")
        if not store.exists(node):
            store.write_bytes(node, _EMPTY_GROUP)


def _async_fs(store: OutputStore) -> Any:
    """An asynchronous twin of the store's filesystem, which zarr's ``FsspecStore`` requires."""
    cls = type(store.fs)
    return cls(asynchronous=True, **{k: v for k, v in store.storage_options.items() if k != "asynchronous"})


def open_scene_grid(store: OutputStore, output_key: str, collection: str, scene_id: str) -> Any:
    """Open one scene's tile-grid dataset lazily (dask-backed) with ``xarray.open_zarr``.

    The scene's group is opened as a store of its own: its consolidated metadata lives in its own ``zarr.json``
    (opened from the root with ``group=``, xarray looks for it at the root, warns, and reads every array's metadata
    instead: a request per array on an object store)."""
    import xarray as xr

    return xr.open_zarr(
        store.url(posixpath.join(EMBEDDINGS_STORE, embeddings_group(output_key, collection, scene_id))),
        storage_options=None if store.local else store.storage_options, zarr_format=3, consolidated=True,
    )


def wgs84_or_none(geom: Any) -> Any:
    """Shapely geometry, or ``None`` for a missing one (GeoParquet allows null geometries)."""
    if geom is None:
        return None
    return geom if isinstance(geom, shapely.Geometry) else shapely.geometry.shape(geom)
