"""The output tables as GeoDataFrames (eager, or lazy with dask-geopandas) and the embeddings as xarray.

``open_outputs(root)`` lists what is committed once, then every reader prunes in three steps, cheapest first:

1. **files**: only committed files (a ``part-<unit>.parquet`` whose unit has a record under ``_ledger/``; nothing
   under ``_staging/`` is ever read), and only the Hive partitions (``collection=``, ``date=``) the filters allow;
2. **row groups and rows**: one pyarrow expression on columns (time, ids, label, confidence, the GeoParquet ``bbox``
   covering column for an area), pushed down into the Parquet reader;
3. **geometry**: an exact ``intersects`` test against the area, on the rows that are left.

Filters are keyword arguments shared by all tables (see :meth:`Outputs.detections`); one that makes no sense for a
table (``min_confidence`` on ``tiles``) is refused with an error naming it.
"""

from __future__ import annotations

import datetime as dt
import math
import posixpath
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, TypeAlias, Union

import geopandas as gpd
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import shapely

from pipelines.archive.ledger import LEDGER_DIR
from pipelines.archive.store import EMBEDDINGS_STORE, SCHEMAS, TABLES, OutputStore, build_frame, part_unit

_PARTITIONS = pa.schema([("collection", pa.string()), ("date", pa.string())])
_TIME_COLUMN = {"scenes": "datetime", "tiles": "datetime", "detections": "datetime", "errors": "datetime",
                "runs": "started_at"}
_LABEL_COLUMN = {"tiles": "class_label", "detections": "label"}

BBox: TypeAlias = Sequence[float]
Area: TypeAlias = Union[shapely.Geometry, Mapping[str, Any], str, Sequence[float]]  # noqa: UP007


# ---------------------------------------------------------------------------------------------------------- filters


def to_area(value: Area | None) -> shapely.Geometry | None:
    """A WGS84 area from a bbox ``(west, south, east, north)``, a shapely geometry, GeoJSON or WKT.

    A bbox whose west edge is east of its east edge crosses the antimeridian and becomes two boxes.
    """
    if value is None:
        return None
    if isinstance(value, shapely.Geometry):
        return value
    if isinstance(value, str):
        return shapely.from_wkt(value)
    if isinstance(value, Mapping):
        return shapely.geometry.shape(value.get("geometry", value))
    coords = [float(v) for v in value]
    if len(coords) != 4:
        raise ValueError(f"bbox: expected (west, south, east, north), got {list(value)!r}")
    w, s, e, n = coords
    if s > n:
        raise ValueError(f"bbox: south {s} is north of north {n}")
    if w <= e:
        return shapely.box(w, s, e, n)
    return shapely.MultiPolygon([shapely.box(w, s, 180.0, n), shapely.box(-180.0, s, e, n)])


def _time(value: str | dt.date | dt.datetime | None, *, end: bool, name: str) -> dt.datetime | None:
    """UTC instant; a bare date as ``end`` means the end of that day (ranges are inclusive)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.date.fromisoformat(text) if len(text) == 10 else dt.datetime.fromisoformat(
                text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"{name}: not an ISO date or time: {text!r}") from exc
    if not isinstance(value, dt.datetime):
        day = dt.datetime.combine(value, dt.time(), tzinfo=dt.timezone.utc)
        return day + dt.timedelta(days=1) - dt.timedelta(microseconds=1) if end else day
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _names(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else (str(v) for v in value))


@dataclass(frozen=True)
class Filters:
    """The common filters, normalised once (see :meth:`Outputs.detections` for their meaning)."""

    area: shapely.Geometry | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    collections: frozenset[str] | None = None
    sensors: frozenset[str] | None = None
    labels: frozenset[str] | None = None
    min_confidence: float | None = None
    runs: frozenset[str] | None = None
    output_keys: frozenset[str] | None = None
    scene_ids: frozenset[str] | None = None

    def check(self, table: str) -> None:
        """Refuse filters that do not apply to ``table`` (naming them)."""
        bad = []
        if self.labels is not None and table not in _LABEL_COLUMN:
            bad.append("label")
        if self.min_confidence is not None and table != "detections":
            bad.append("min_confidence")
        if table == "runs":
            bad += [n for n, v in (("bbox/geometry", self.area), ("collection", self.collections),
                                   ("sensor", self.sensors), ("scene", self.scene_ids)) if v is not None]
        if bad:
            raise ValueError(f"{table}: filter(s) {', '.join(bad)} do not apply to this table")

    def expression(self, table: str, columns: Iterable[str]) -> pc.Expression | None:
        """The pyarrow expression of every filter the table's columns can evaluate (pushed into the reader)."""
        have = set(columns)
        parts: list[pc.Expression] = []
        tcol = _TIME_COLUMN[table]
        if self.start is not None:
            parts.append(pc.field(tcol) >= pa.scalar(self.start, pa.timestamp("us", tz="UTC")))
        if self.end is not None:
            parts.append(pc.field(tcol) <= pa.scalar(self.end, pa.timestamp("us", tz="UTC")))
        for values, column in ((self.runs, "run_id"), (self.output_keys, "output_key"),
                               (self.scene_ids, "scene_id"), (self.labels, _LABEL_COLUMN.get(table)),
                               (self.sensors if table == "scenes" else None, "sensor")):
            if values is not None and column in have:
                parts.append(pc.field(column).isin(sorted(values)))
        if self.min_confidence is not None:
            parts.append(pc.field("confidence") >= self.min_confidence)
        if self.area is not None and "bbox" in have:
            w, s, e, n = self.area.bounds
            parts.append((pc.field("bbox", "xmax") >= w) & (pc.field("bbox", "xmin") <= e)
                         & (pc.field("bbox", "ymax") >= s) & (pc.field("bbox", "ymin") <= n))
        if not parts:
            return None
        expr = parts[0]
        for p in parts[1:]:
            expr = expr & p
        return expr

    def keeps_partition(self, collection: str | None, date: str | None) -> bool:
        """Whether a Hive partition can hold matching rows (file pruning, before any file is opened)."""
        if self.collections is not None and collection is not None and collection not in self.collections:
            return False
        if date is None or date == "unknown":
            return True
        if self.start is not None and date < self.start.strftime("%Y-%m-%d"):
            return False
        return not (self.end is not None and date > self.end.strftime("%Y-%m-%d"))


def make_filters(
    *,
    bbox: BBox | None = None,
    geometry: Area | None = None,
    start: str | dt.date | dt.datetime | None = None,
    end: str | dt.date | dt.datetime | None = None,
    collection: str | Iterable[str] | None = None,
    sensor: str | Iterable[str] | None = None,
    label: str | Iterable[str] | None = None,
    min_confidence: float | None = None,
    run: str | Iterable[str] | None = None,
    output_key: str | Iterable[str] | None = None,
    scene: str | Iterable[str] | None = None,
) -> Filters:
    """Normalise loose filter arguments once (see :meth:`Outputs.detections`)."""
    if bbox is not None and geometry is not None:
        raise ValueError("bbox and geometry: give one area, not both")
    area = to_area(bbox) if bbox is not None else to_area(geometry)
    if area is not None and not area.is_valid:
        raise ValueError(f"geometry: not a valid geometry ({shapely.is_valid_reason(area)})")
    lo, hi = _time(start, end=False, name="start"), _time(end, end=True, name="end")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"start {lo.isoformat()} is after end {hi.isoformat()}")
    if min_confidence is not None and not 0.0 <= float(min_confidence) <= 1.0:
        raise ValueError(f"min_confidence: {min_confidence} is not in [0, 1]")
    return Filters(
        area=area, start=lo, end=hi, collections=_names(collection), sensors=_names(sensor), labels=_names(label),
        min_confidence=None if min_confidence is None else float(min_confidence), runs=_names(run),
        output_keys=_names(output_key), scene_ids=_names(scene),
    )


# ---------------------------------------------------------------------------------------------------------- reading


def _partition(path: str) -> tuple[str | None, str | None]:
    """``(collection, date)`` from a Hive path (``tiles/collection=c/date=d/part-u.parquet``)."""
    values: dict[str, str] = {}
    for piece in path.split("/"):
        key, sep, value = piece.partition("=")
        if sep:
            values[key] = value
    return values.get("collection"), values.get("date")


def unit_of(path: str) -> str | None:
    """The commit unit that published a table file (``None`` for files not written per unit, like ``runs``)."""
    return part_unit(path)


@dataclass(frozen=True)
class _FileReader:
    """Reads some committed files of one table into a GeoDataFrame; picklable, so dask can ship it to workers."""

    store: OutputStore
    table: str
    schema: pa.Schema
    filters: Filters
    columns: tuple[str, ...] | None

    def __call__(self, files: str | Sequence[str]) -> gpd.GeoDataFrame:
        paths = [files] if isinstance(files, str) else list(files)
        base = self.store.full(self.table)
        dataset = pads.dataset(
            [self.store.full(p) for p in paths], schema=self.schema, format="parquet", filesystem=self.store.fs,
            partitioning=pads.partitioning(self._partition_schema, flavor="hive"), partition_base_dir=base,
        )
        expr = self.filters.expression(self.table, self.schema.names)
        arrow = dataset.to_table(columns=self._read_columns, filter=expr)
        return self._frame(arrow)

    def lazy(self, path: str) -> gpd.GeoDataFrame:
        """One file of a dask graph, whose file list is fixed when the graph is made."""
        try:
            return self(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{self.table}: {path} was replaced after this dask collection listed the table (a run folded its "
                "files or rewrote an updated scene's, and its rows are in a file the collection does not name); "
                "make the collection again (read_dask lists the table afresh)") from exc

    @property
    def _partition_schema(self) -> pa.Schema:
        return pa.schema([f for f in _PARTITIONS if f.name in self.schema.names])

    @property
    def _read_columns(self) -> list[str]:
        if self.columns is None:
            return [n for n in self.schema.names if n != "bbox"]
        partitions = [f.name for f in self._partition_schema]
        return list(dict.fromkeys([*self.columns, "geometry", *partitions]))

    def _frame(self, arrow: pa.Table) -> gpd.GeoDataFrame:
        frame = gpd.GeoDataFrame.from_arrow(arrow.replace_schema_metadata(self.schema.metadata))
        if self.filters.area is not None and len(frame):
            frame = frame[frame.geometry.intersects(self.filters.area)]
        return frame.reset_index(drop=True)

    def empty(self) -> gpd.GeoDataFrame:
        """A frame with no rows and exactly the columns and dtypes of this reader's results."""
        return self._frame(self.schema.empty_table().select(self._read_columns))


class Outputs:
    """The committed results under one output root.

    Listing is done once, when the object is made (the ledger and each table's files); call :meth:`refresh` to see
    units committed since.

    Args:
        root: A local folder or ``s3://bucket/prefix``.
        storage_options: fsspec options for object storage (``endpoint_url``, ``key``...); credentials otherwise come
            from the usual ``AWS_*`` environment.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if "://" not in root:
            import os

            if not os.path.isdir(root):
                raise FileNotFoundError(f"root: no output folder {root!r}")
        self.store = OutputStore(root, storage_options)
        self.root = self.store.url()
        self._files: dict[str, list[str]] = {}
        self._units_listed_at = -math.inf
        self._schemas: dict[str, pa.Schema] = {}
        self._uniform: dict[str, bool] = {}

    def refresh(self) -> None:
        """Forget the listings, so the next read sees units committed since."""
        self._files.clear()
        self._schemas.clear()
        for name in ("committed_units", "_sensor_collections", "latest_run"):
            self.__dict__.pop(name, None)

    # ----------------------------------------------------------------------------------------------- listings

    @cached_property
    def committed_units(self) -> frozenset[str]:
        """Every unit id with a record under ``_ledger/`` (a record's file name, or a unit listed in one)."""
        self._units_listed_at = time.monotonic()
        records = self.store.glob(f"{LEDGER_DIR}/*.parquet")
        units = {posixpath.basename(p)[: -len(".parquet")] for p in records}
        if records:
            dataset = pads.dataset([self.store.full(p) for p in records], format="parquet", filesystem=self.store.fs)
            if "unit_id" in dataset.schema.names:
                units |= set(pc.unique(dataset.to_table(columns=["unit_id"])["unit_id"]).to_pylist())
        units.discard(None)  # type: ignore[arg-type]
        return frozenset(units)

    def files(self, table: str) -> list[str]:
        """The table's committed files (relative to the root), sorted."""
        if table not in TABLES:
            raise ValueError(f"table: {table!r} is not one of {', '.join(TABLES)}")
        if table not in self._files:
            listed_at = time.monotonic()
            found = self.store.glob(f"{table}/**/*.parquet")
            if table == "runs":
                self._files[table] = found
            else:
                committed = self.committed_units
                if self._units_listed_at < listed_at and any(unit_of(p) not in committed for p in found):
                    # a unit committed since the ledger was read (a record is written before its files are
                    # published): read it again, or a run's fold would hide rows whose old files are gone
                    self.__dict__.pop("committed_units", None)
                    committed = self.committed_units
                self._files[table] = [p for p in found if unit_of(p) in committed]
        return self._files[table]

    def _oldest_and_newest(self, table: str) -> list[str]:
        """The table's files written first and last (unit and run ids start with their run's start time)."""
        files = self.files(table)
        if not files:
            return []
        by_age = sorted(files, key=lambda p: (unit_of(p) or posixpath.basename(p), p))
        return list(dict.fromkeys([by_age[0], by_age[-1]]))

    def schema_is_uniform(self, table: str) -> bool:
        """Whether the table's oldest and newest files have the same columns (columns are only ever added, so
        then all files do, and a reader need not union schemas file by file)."""
        self._schema(table)
        return self._uniform[table]

    def _schema(self, table: str) -> pa.Schema:
        """The table's schema: the documented columns, plus any its newest file adds, plus partition columns."""
        if table not in self._schemas:
            files = self._oldest_and_newest(table)
            known = SCHEMAS[table]
            self._uniform[table] = True
            if files:
                import pyarrow.parquet as pq

                physical = [pq.read_schema(self.store.full(f), filesystem=self.store.fs) for f in files]
                self._uniform[table] = physical[0].remove_metadata().equals(physical[-1].remove_metadata())
                merged = pa.unify_schemas([*physical, known], promote_options="permissive")
                meta = physical[-1].metadata
            else:
                empty = pa.table(build_frame(table, [], []).to_arrow(geometry_encoding="WKB"))
                merged, meta = empty.schema, empty.schema.metadata
            fields = [merged.field(n) for n in merged.names if n not in _PARTITIONS.names]
            if table != "runs":
                fields += list(_PARTITIONS)
            else:
                fields.append(_PARTITIONS.field("date"))
            # pandas' own metadata would bring back the writer's dtypes (Arrow-backed); readers get plain ones
            meta = {k: v for k, v in (meta or {}).items() if k != b"pandas"}
            self._schemas[table] = pa.schema(fields, metadata=meta)
        return self._schemas[table]

    @cached_property
    def _sensor_collections(self) -> dict[str, frozenset[str]]:
        scenes = self._reader("scenes", Filters(), ("sensor", "collection"))(self.files("scenes")) \
            if self.files("scenes") else pd.DataFrame(columns=["sensor", "collection"])
        pairs = scenes[["sensor", "collection"]].drop_duplicates()
        return {str(s): frozenset(pairs.loc[pairs["sensor"] == s, "collection"].astype(str)) for s in
                pairs["sensor"].unique()}

    @cached_property
    def latest_run(self) -> str | None:
        """The id of the run that started last, or ``None`` before any run."""
        files = self.files("runs")
        if not files:
            return None
        runs = self._reader("runs", Filters(), ("run_id", "started_at"))(files)
        return str(runs.sort_values(["started_at", "run_id"]).iloc[-1]["run_id"])

    # ------------------------------------------------------------------------------------------------ readers

    def _resolve(self, table: str, filters: Filters) -> Filters:
        filters.check(table)
        if filters.runs is not None and "latest" in filters.runs:
            latest = self.latest_run
            filters = replace(filters, runs=(filters.runs - {"latest"}) | ({latest} if latest else set()))
        if filters.sensors is not None and table != "scenes":
            mapping = self._sensor_collections
            allowed = frozenset().union(*(mapping.get(s, frozenset()) for s in filters.sensors))
            collections = allowed if filters.collections is None else filters.collections & allowed
            filters = replace(filters, collections=collections)
        return filters

    def _reader(self, table: str, filters: Filters, columns: Sequence[str] | None) -> _FileReader:
        schema = self._schema(table)
        if columns is not None:
            unknown = [c for c in columns if c not in schema.names]
            if unknown:
                raise ValueError(f"{table}: no column(s) {', '.join(unknown)} (columns: {', '.join(schema.names)})")
        return _FileReader(self.store, table, schema, filters, None if columns is None else tuple(columns))

    def _selected(self, table: str, filters: Filters) -> list[str]:
        return [p for p in self.files(table) if filters.keeps_partition(*_partition(p))]

    def read(self, table: str, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """One table as a GeoDataFrame (WGS84), filtered; see :meth:`detections` for the filters.

        Args:
            table: ``scenes``, ``tiles``, ``detections``, ``errors`` or ``runs``.
            columns: Columns to read (``geometry`` and the partition columns always come along); default all but
                the ``bbox`` covering column.
            **filters: Keyword filters.

        Returns:
            The matching rows, with the ``collection`` and ``date`` partition columns (``date`` only for ``runs``).
        """
        try:
            return self._read(table, columns, filters)
        except FileNotFoundError:
            # a listed file was replaced since the listing (a run folded its files, or rewrote an updated scene's):
            # list again, once
            self.refresh()
            return self._read(table, columns, filters)

    def _read(self, table: str, columns: Sequence[str] | None, filters: Mapping[str, Any]) -> gpd.GeoDataFrame:
        spec = self._resolve(table, make_filters(**filters))
        reader = self._reader(table, spec, columns)
        files = self._selected(table, spec)
        return reader(files) if files else reader.empty()

    def read_dask(self, table: str, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """One table as a lazy ``dask_geopandas.GeoDataFrame``, one partition per committed file.

        Same arguments as :meth:`read`. Nothing is read until ``.compute()`` (or ``.head()``, ``.persist()``...);
        files the filters rule out by their partition are never part of the graph. The files are those listed now:
        a run of the job that publishes before the graph is computed (its fold, a copy-on-write of an updated scene)
        may delete one, and computing then fails with a ``FileNotFoundError`` that says so (never silently without
        those rows); make the collection again.
        """
        import dask.dataframe as dd
        import dask_geopandas

        spec = self._resolve(table, make_filters(**filters))
        reader = self._reader(table, spec, columns)
        files = self._selected(table, spec)
        meta = reader.empty()
        if not files:
            return dask_geopandas.from_geopandas(meta, npartitions=1)
        return dd.from_map(reader.lazy, files, meta=meta, enforce_metadata=False, label=f"read-{table}")

    def scenes(self, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """Committed scenes (footprints); see :meth:`detections` for the filters."""
        return self.read("scenes", columns, **filters)

    def tiles(self, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """Tiles of committed scenes (captions, class labels; ``label`` filters ``class_label``)."""
        return self.read("tiles", columns, **filters)

    def detections(self, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """Detections after cross-tile NMS, filtered.

        Filters (all optional, combined with AND):

        - ``bbox=(west, south, east, north)`` or ``geometry=`` (shapely, GeoJSON dict, WKT), WGS84: rows whose
          geometry intersects it (exactly, after a pruning pass on the GeoParquet ``bbox`` column);
        - ``start=``, ``end=``: acquisition time range, inclusive (ISO strings, dates or datetimes; a bare date as
          ``end`` covers that whole day; naive times are UTC); for ``runs``, the run's start time;
        - ``collection=``, ``sensor=`` (``optical``, ``sar``, ``thermal``), ``label=`` (detections ``label``, tiles
          ``class_label``), ``scene=``: a value or a list of values;
        - ``min_confidence=``: detections with ``confidence`` at or above it;
        - ``run=``: run id(s) that wrote the rows, or ``"latest"``; ``output_key=``: a model/config version.

        Args:
            columns: Columns to read (``geometry`` always comes along).
            **filters: As above.

        Returns:
            A GeoDataFrame in EPSG:4326.
        """
        return self.read("detections", columns, **filters)

    def errors(self, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """Failures (one row per failed scene or tile per attempt); see :meth:`detections` for the filters."""
        return self.read("errors", columns, **filters)

    def runs(self, columns: Sequence[str] | None = None, **filters: Any) -> gpd.GeoDataFrame:
        """One row per run; filters ``run``, ``output_key``, ``start``/``end`` (on ``started_at``)."""
        return self.read("runs", columns, **filters)

    def scenes_dask(self, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """:meth:`scenes`, lazily (dask-geopandas)."""
        return self.read_dask("scenes", columns, **filters)

    def tiles_dask(self, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """:meth:`tiles`, lazily (dask-geopandas)."""
        return self.read_dask("tiles", columns, **filters)

    def detections_dask(self, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """:meth:`detections`, lazily (dask-geopandas)."""
        return self.read_dask("detections", columns, **filters)

    def errors_dask(self, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """:meth:`errors`, lazily (dask-geopandas)."""
        return self.read_dask("errors", columns, **filters)

    def runs_dask(self, columns: Sequence[str] | None = None, **filters: Any) -> Any:
        """:meth:`runs`, lazily (dask-geopandas)."""
        return self.read_dask("runs", columns, **filters)

    # --------------------------------------------------------------------------------------------- embeddings

    def scene_row(self, scene: str, *, collection: str | None = None, output_key: str | None = None) -> pd.Series:
        """The committed ``scenes`` row of one scene (one output key: say which when there are several)."""
        rows = self.scenes(scene=scene, collection=collection, output_key=output_key)
        if rows.empty:
            where = "".join(f", {k} {v!r}" for k, v in (("collection", collection), ("output_key", output_key)) if v)
            raise KeyError(f"scene: no committed scene {scene!r}{where} under {self.root}")
        versions = rows[["collection", "output_key"]].drop_duplicates()
        if len(versions) > 1:
            listed = "; ".join(f"collection={c} output_key={k}" for c, k in versions.itertuples(index=False))
            raise ValueError(f"scene: {scene!r} is committed more than once ({listed}); pass collection= "
                             f"and/or output_key=")
        return rows.iloc[0]

    def embeddings(self, scene: str | Mapping[str, Any], *, collection: str | None = None,
                   output_key: str | None = None) -> Any:
        """One scene's tile-grid arrays (``embedding``, ``valid_fraction``) as a lazy ``xarray.Dataset``.

        The group is always the one the ``scenes`` row names (``embeddings_group``), never built from ids.

        Args:
            scene: A scene id, or a ``scenes`` row (anything with ``embeddings_group``).
            collection: Disambiguates a scene id found in several collections.
            output_key: Disambiguates a scene processed under several output keys.

        Returns:
            The dataset (dask-backed), coordinates in the scene CRS.
        """
        if isinstance(scene, str):
            group = str(self.scene_row(scene, collection=collection, output_key=output_key)["embeddings_group"])
        else:
            group = str(scene["embeddings_group"])
        return self.open_group(group)

    def zarr_group(self, group: str) -> Any:
        """One group of the embeddings store (a ``scenes.embeddings_group`` value) as a read-only ``zarr.Group``,
        opened at its own folder (see :meth:`open_group`)."""
        import zarr
        import zarr.storage

        path = self.store.full(f"{EMBEDDINGS_STORE}/{group.strip('/')}")
        if self.store.local:
            zstore: Any = zarr.storage.LocalStore(path, read_only=True)
        else:  # zarr's FsspecStore needs an asynchronous twin of the store's filesystem
            options = {k: v for k, v in self.store.storage_options.items() if k != "asynchronous"}
            zstore = zarr.storage.FsspecStore(fs=type(self.store.fs)(asynchronous=True, **options), path=path,
                                              read_only=True)
        return zarr.open_group(zstore, mode="r", zarr_format=3)

    def open_group(self, group: str) -> Any:
        """Open one group of the embeddings store (a ``scenes.embeddings_group`` value) lazily."""
        import warnings

        import xarray as xr

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            # open the group's own folder as the store: the store root's consolidated metadata lists every scene
            # (reading it costs O(archive) per scene) and misses groups added by another writer since
            url = self.store.url(f"{EMBEDDINGS_STORE}/{group.strip('/')}")
            options = None if self.store.local else self.store.storage_options
            try:
                return xr.open_zarr(url, zarr_format=3, consolidated=True, storage_options=options)
            except (ValueError, KeyError):  # no consolidated metadata at the group itself
                return xr.open_zarr(url, zarr_format=3, consolidated=False, storage_options=options)


def open_outputs(root: str, storage_options: Mapping[str, Any] | None = None) -> Outputs:
    """Open an output root for reading (local folder or ``s3://bucket/prefix``).

    Args:
        root: The job's ``output.root``.
        storage_options: fsspec options for object storage.

    Returns:
        An :class:`Outputs`; only committed units are visible through it.
    """
    return Outputs(root, storage_options)
