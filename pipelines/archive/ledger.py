"""The run ledger: commit units atomically, make reruns incremental, never duplicate rows.

A *unit* is a group of finished scenes (closed by tile count or age, see ``output.commit_tiles``). Its table files are first written under ``_staging/<unit>/``; then one small
ledger record, ``_ledger/<unit>.parquet``, is written in a single atomic PUT (or rename) — that write **is** the
commit. The record lists the unit's committed scenes (id, STAC ``updated``, output key) and, in its metadata, which
staged files to publish to their final paths and which superseded files to delete. Publishing happens right after
and is idempotent, so:

- a crash before the record leaves only staging files, rolled back (deleted) by the next run: the unit is lost and
  redone, nothing of it was visible;
- a crash after the record is rolled forward by the next run (:meth:`Ledger.recover` finishes the moves);
- a scene whose STAC ``updated`` moved forward is reprocessed, and the unit that commits the new version also
  rewrites, without that scene's rows, every older file holding it (copy-on-write), so the tables never hold two
  versions of a scene for one output key.

One writer per output key: a run holds its output key's lease (:mod:`pipelines.archive.lease`) from before recovery
to its last commit. The ledger checks the lease, and that every staged file is there, before each commit point; a
unit's publish that finds a staged file neither staged nor published fails loudly. Recovery needs the lease too,
and touches only units whose run holds no live lease (see :meth:`Ledger.recover`).
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.archive.lease import Lease, live_holders
from pipelines.archive.store import OutputStore, StagedFile, geoparquet_bytes, partition_dir

LEDGER_DIR = "_ledger"
STAGING_DIR = "_staging"
# on a remote store without batched copies: holds a unit's staging folder while its files are moved (see _publish)
_PUBLISHING_MARKER = "_publishing"
STATE_DIR = "_state"

_LEDGER_SCHEMA = pa.schema(
    [
        ("collection", pa.string()),
        ("scene_id", pa.string()),
        ("date", pa.string()),
        ("updated", pa.timestamp("us", tz="UTC")),
        ("output_key", pa.string()),
        ("unit_id", pa.string()),
        ("run_id", pa.string()),
        ("committed_at", pa.timestamp("us", tz="UTC")),
    ]
)
_PUBLISH_KEY = b"earthgpt:publish"
_DELETE_KEY = b"earthgpt:delete"


@dataclass(frozen=True)
class CommittedScene:
    """What the ledger knows about one committed scene."""

    collection: str
    scene_id: str
    date: str
    updated: datetime | None
    unit_id: str


@dataclass
class UnitRecord:
    """One unit of work, ready to commit.

    Attributes:
        unit_id: Unique id (``<run_id>-w<wave>``).
        run_id: The run that produced it.
        output_key: The config's output key (model, tasks, tiling).
        scenes: ``(collection, scene_id, date, updated)`` of each scene whose rows the unit commits. Failed scenes
            are not listed: their errors rows are published, and the next run tries them again.
        publish: Staged files and their final paths.
        delete: Final paths of superseded files to remove once the rewritten copies are published.
    """

    unit_id: str
    run_id: str
    output_key: str
    scenes: list[tuple[str, str, str, datetime | None]] = field(default_factory=list)
    publish: list[StagedFile] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)


@dataclass
class Recovery:
    """What :meth:`Ledger.recover` did.

    Attributes:
        rolled_forward: Committed units whose publish was finished.
        rolled_back: Uncommitted units whose staging was deleted.
        left_live: Units of runs that hold a live lease: not touched.
        left_other_key: Committed units of another output key: finished by that key's next run.
    """

    rolled_forward: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    left_live: list[str] = field(default_factory=list)
    left_other_key: list[str] = field(default_factory=list)


class StagedFileMissing(RuntimeError):
    """A unit's staged file is gone before it was published: its rows cannot be published."""


def run_of(unit_id: str) -> str:
    """The run a unit belongs to (unit ids are ``<run_id>-u<n>``)."""
    return unit_id.rsplit("-u", 1)[0]


def new_run_id() -> str:
    """A sortable, unique run id: ``20250101T120000Z-1a2b3c``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


class Ledger:
    """Commit bookkeeping under an output root.

    Args:
        store: The output root.
        lease: The run's lease of its output key: checked before every commit point, required by :meth:`recover`.
    """

    def __init__(self, store: OutputStore, lease: Lease | None = None) -> None:
        self.store = store
        self.lease = lease

    # ------------------------------------------------------------------------------------------------- staging

    def staging_dir(self, unit_id: str) -> str:
        """The folder a unit writes its files into before it commits."""
        return f"{STAGING_DIR}/{unit_id}"

    def _record_path(self, unit_id: str) -> str:
        return f"{LEDGER_DIR}/{unit_id}.parquet"

    def has_record(self, unit_id: str) -> bool:
        """Whether the unit's own record is there (it is committed, and not yet folded by a compaction)."""
        return self.store.exists(self._record_path(unit_id))

    # -------------------------------------------------------------------------------------------------- commit

    def commit(self, unit: UnitRecord) -> None:
        """Commit a unit: check that every staged file is there and the lease is still held, write the unit's ledger
        record (the atomic commit point), then publish its staged files.

        Args:
            unit: The unit, with its files already staged.

        Raises:
            StagedFileMissing: A staged file is gone (nothing is committed).
            LeaseLost: This run no longer holds its output key (nothing is committed).
        """
        present: set[str] | None = None
        if unit.publish:
            present = set(self.store.glob(f"{self.staging_dir(unit.unit_id)}/**"))
            missing = [f.staged for f in unit.publish if f.staged not in present]
            if missing:
                raise StagedFileMissing(
                    f"unit {unit.unit_id}: {len(missing)} staged files are missing before its commit (first: "
                    f"{missing[0]}); nothing of it was committed, its scenes are redone by the next run")
        if self.lease is not None:
            self.lease.check()  # the fence: a run that lost its lease commits nothing more
        now = datetime.now(timezone.utc)
        rows = [
            {
                "collection": c, "scene_id": s, "date": d, "updated": u, "output_key": unit.output_key,
                "unit_id": unit.unit_id, "run_id": unit.run_id, "committed_at": now,
            }
            for c, s, d, u in unit.scenes
        ] or [  # a unit of failed scenes only: a marker row keeps its id on record (errors rows are its files)
            {"collection": None, "scene_id": None, "date": None, "updated": None, "output_key": unit.output_key,
             "unit_id": unit.unit_id, "run_id": unit.run_id, "committed_at": now}
        ]
        table = pa.Table.from_pylist(rows, schema=_LEDGER_SCHEMA).replace_schema_metadata(
            {
                _PUBLISH_KEY: json.dumps([[f.staged, f.final] for f in unit.publish]).encode(),
                _DELETE_KEY: json.dumps(list(unit.delete)).encode(),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.store.write_bytes(self._record_path(unit.unit_id), buf.getvalue())
        self._publish(unit.unit_id, [(f.staged, f.final) for f in unit.publish], unit.delete, strict=True,
                      staged=present)

    def _publish(self, unit_id: str, moves: Sequence[Sequence[str]], deletes: Sequence[str],
                 strict: bool = False, staged: set[str] | None = None) -> None:
        def missing(staged: str, final: str) -> StagedFileMissing:
            return StagedFileMissing(
                f"unit {unit_id} is committed but its staged file {staged} is gone and {final} was never "
                f"published: the unit's scenes are on record without all their rows. Remove "
                f"{self._record_path(unit_id)} (and the unit's published part-{unit_id}*.parquet files) "
                "and rerun with --full-scan to redo them (a fold unit, whose record lists no scenes, deletes the "
                "files it folds only once every folded file is in place: those removals alone restore its rows)")

        # The record is written: what follows may run in any order, and be replayed (recover).
        if self.store.batch_copies:
            # an object store's "move" is a copy and a delete: copy every file (concurrent requests, one each
            # after a HEAD), then delete the superseded files and the whole staging folder in bulk (DeleteObjects,
            # 1,000 keys a request). A replay copies again what is still staged; a file no longer staged was
            # copied before the staging folder's deletion began, unless it was lost.
            if staged is None:  # a replay lists the staging folder; a commit has just listed it
                staged = set(self.store.glob(f"{self.staging_dir(unit_id)}/**"))
            for src, final in moves:
                if src not in staged and (strict or not self.store.exists(final)):
                    raise missing(src, final)
            self.store.copy_many([(src, final) for src, final in moves if src in staged])
            self._delete_superseded(unit_id, deletes)
            # the staging folder holds what was just listed (nothing stages into a unit once it commits): its keys
            # go in bulk, without the listing a recursive delete would make again
            self.store.remove_many(sorted(staged))
            return

        def move(pair: Sequence[str]) -> None:
            staged, final = pair
            try:
                self.store.move(staged, final)
            except FileNotFoundError:
                # a replay finds the files an interrupted publish moved already at their final paths; a file that
                # is in neither place is lost, and the unit's scenes are on record without their rows
                if strict or not self.store.exists(final):
                    raise missing(staged, final) from None

        # every file is in place before a file it replaces goes (readers may see rows twice for a moment, never
        # none), and the staging folder stays until the deletes are done, so that a crash before then leaves the unit
        # to recovery, which replays them: a local folder stays when emptied; on an object store a folder exists only
        # while it holds a key, so a marker holds it
        if not self.store.local:
            marker = f"{self.staging_dir(unit_id)}/{_PUBLISHING_MARKER}"
            if not self.store.exists(marker):
                self.store.write_bytes(marker, b"")
        _each(move, moves, serial=self.store.local)
        self._delete_superseded(unit_id, deletes)
        self.store.remove(self.staging_dir(unit_id), recursive=True)

    def _delete_superseded(self, unit_id: str, deletes: Sequence[str]) -> None:
        """Delete the files a unit supersedes, and check they are gone (an object store's bulk delete reports a
        key it could not delete only in its answer, which fsspec does not raise): a superseded file left published
        would show a scene's old rows beside its new ones. Raised before the staging folder goes, so the next
        run's recovery tries again."""
        if not deletes:
            return
        self.store.remove_many(deletes)
        if self.store.local:  # a local delete that fails raises
            return
        # one listing per folder (a file's own check would be a HEAD, and a listing more for a key that is gone)
        still: set[str] = set()
        for folder in sorted({posixpath.dirname(d) for d in deletes}):
            still.update(self.store.sizes(folder))
        left = [d for d in deletes if d in still]
        if left:
            raise OSError(f"unit {unit_id}: {len(left)} superseded files could not be deleted (first: {left[0]}); "
                          "the unit stays staged and the next run's recovery deletes them")

    def recover(self) -> Recovery:
        """Finish what crashed runs left: publish committed units' files, delete uncommitted units' files.

        Only units whose run holds no live lease are touched (the staging folders are listed before the leases are
        read: a run takes its lease before it stages anything, so a listed unit of a live run is always seen live).
        Uncommitted units of dead runs are deleted whatever their output key (a deletion is idempotent); committed
        ones are finished only under their own output key's lease, so that no run of that key rewrites their files
        meanwhile.

        Returns:
            The unit ids rolled forward, rolled back and left alone.

        Raises:
            RuntimeError: The ledger holds no lease (every recovery takes its output key's lease first).
            StagedFileMissing: A committed unit's file is neither staged nor published.
        """
        if self.lease is None or not self.lease.held:
            raise RuntimeError("recovery needs this output key's lease: Ledger(store, lease) with the lease taken")
        report = Recovery()
        units = sorted({p.split("/")[1] for p in self.store.glob(f"{STAGING_DIR}/*")})
        if not units:
            return report
        live = {h.run_id for h in live_holders(self.store)} - {self.lease.run_id}
        for unit_id in units:
            if run_of(unit_id) in live:
                report.left_live.append(unit_id)
                continue
            record = self._record_path(unit_id)
            try:
                data = self.store.read_bytes(record)
            except FileNotFoundError:
                # never committed; or committed, published and folded since by another output key's compaction
                # (it folds only records of published units), whose staging folder is gone: either way, deleted
                data = None
            if data is not None:
                table = pq.read_table(io.BytesIO(data))
                if set(table["output_key"].to_pylist()) != {self.lease.name}:
                    report.left_other_key.append(unit_id)
                    continue
                meta = table.schema.metadata or {}
                moves = json.loads(meta.get(_PUBLISH_KEY, b"[]"))
                deletes = json.loads(meta.get(_DELETE_KEY, b"[]"))
                self._publish(unit_id, moves, deletes)
                report.rolled_forward.append(unit_id)
            else:
                self.store.remove(self.staging_dir(unit_id), recursive=True)
                report.rolled_back.append(unit_id)
        return report

    # --------------------------------------------------------------------------------------------------- index

    def _read_records(self, output_key: str | None = None, files: Sequence[str] | None = None) -> pa.Table:
        if files is None:
            return _relisting(lambda: self._read_records(output_key, self.store.glob(f"{LEDGER_DIR}/*.parquet")))
        if not files:
            return _LEDGER_SCHEMA.empty_table()
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        dataset = ds.dataset([self.store.full(f) for f in files], filesystem=self.store.fs, format="parquet",
                             schema=_LEDGER_SCHEMA)
        expr = None if output_key is None else pc.field("output_key") == output_key
        return dataset.to_table(filter=expr)

    def committed_table(self, output_key: str) -> pa.Table:
        """The latest ledger entry of every committed scene of one output key, as an Arrow table.

        Columns ``collection, scene_id, date, updated, unit_id``: a few tens of bytes per scene, columnar, so the
        job shares it with its read tasks through the object store once (each task cuts it to its dates).
        """
        return _latest(self._read_records(output_key))

    def committed_entries(self, output_key: str, scene_ids: Iterable[str],
                          dates: Iterable[str] | None = None) -> pa.Table:
        """The latest ledger entries of some scene ids only (``committed_table``'s columns), without reading the
        whole ledger.

        Compaction keeps the ledger sorted by output key, acquisition date and scene id, in row groups of
        :data:`ROW_GROUP_ROWS` entries: from each ledger file only the footer and the row groups whose statistics
        can hold one of the ids (and, with ``dates``, one of the dates) are read. A quiet night looks up its one
        page of listed ids this way: at 10^7 committed scenes the whole index is hundreds of megabytes, a page's
        entries a few row groups, whatever the catalog's id scheme.

        Args:
            output_key: The config's output key.
            scene_ids: The ids to look up (any collection).
            dates: Acquisition dates (``YYYY-MM-DD`` or ``unknown``) the entries may have (none: by ids alone): an
                entry committed under another date is not returned, so a caller must take a missing entry for "maybe not committed" (the
                job's quiet-night check then runs the job, which reads the whole index).
        """
        ids = sorted({str(s) for s in scene_ids})
        if not ids:
            return _latest(_LEDGER_SCHEMA.empty_table())
        days = sorted({str(d) for d in dates}) if dates is not None else None
        if days == []:
            days = None  # no date known: by ids alone
        return _relisting(lambda: self._entries(output_key, ids, days))

    def _entries(self, output_key: str, ids: list[str], dates: list[str] | None) -> pa.Table:
        parts = []
        for f in self.store.glob(f"{LEDGER_DIR}/*.parquet"):
            with self._open(f) as fh:
                reader = pq.ParquetFile(fh, pre_buffer=True)
                groups = _groups_holding(reader.metadata, output_key, ids, dates)
                if groups:
                    parts.append(reader.read_row_groups(groups, columns=_LEDGER_SCHEMA.names))
        import pyarrow.compute as pc

        table = pa.concat_tables(parts).cast(_LEDGER_SCHEMA) if parts else _LEDGER_SCHEMA.empty_table()
        mask = pc.and_(pc.equal(table["output_key"], output_key),
                       pc.is_in(table["scene_id"], value_set=pa.array(ids, pa.string())))
        return _latest(table.filter(mask))

    # --------------------------------------------------------------------------------------------------- state

    def read_state(self, name: str) -> dict[str, Any] | None:
        """A small JSON document under ``_state/`` (a search's watermark and retry list), or None."""
        path = f"{STATE_DIR}/{name}.json"
        if not self.store.exists(path):
            return None
        return dict(json.loads(self.store.read_bytes(path)))

    def write_state(self, name: str, state: Mapping[str, Any]) -> None:
        """Replace a state document (one atomic write)."""
        self.store.write_bytes(f"{STATE_DIR}/{name}.json", json.dumps(state, sort_keys=True, default=str).encode())

    def committed(self, output_key: str) -> dict[tuple[str, str], CommittedScene]:
        """The latest committed version of every scene for one output key.

        Memory is a few hundred bytes per committed scene (ids and timestamps), never the scenes' data.

        Args:
            output_key: The config's output key.

        Returns:
            ``(collection, scene_id) -> CommittedScene``.
        """
        table = self._read_records(output_key).sort_by([("committed_at", "ascending")])
        index: dict[tuple[str, str], CommittedScene] = {}
        for row in table.select(["collection", "scene_id", "date", "updated", "unit_id"]).to_pylist():
            if row["scene_id"] is None:  # a unit's marker row (see compact)
                continue
            index[(row["collection"], row["scene_id"])] = CommittedScene(
                row["collection"], row["scene_id"], row["date"], row["updated"], row["unit_id"]
            )
        return index

    def compact(self, min_files: int = 16, merge_ratio: float = 8.0) -> int:
        """Fold the small ledger records into one file (after recovery; keeps the latest entry per scene).

        Size-tiered: the records are folded together with the compacted files, smallest first, as long as each one
        holds at most ``merge_ratio`` times the entries folded so far. A nightly run thus rewrites about its own
        nights' entries, not the whole ledger (10^7 scenes); a file is rewritten once the smaller ones add up to an
        eighth of it, so an entry is rewritten about log8(ledger / night) times in all, and a few compacted files
        remain (sizes about eight times apart). Compacted files are sorted by output key, date and scene id, in row
        groups of :data:`ROW_GROUP_ROWS` entries, for :meth:`committed_entries`.

        The records of units still staged (committed but not yet published, or of a live run) stay as they are:
        recovery finds a unit's record by its name.

        Args:
            min_files: Compact only when at least this many records can be folded (a quiet night's lookup opens
                each record's footer).
            merge_ratio: How much larger than what is folded so far a compacted file may be and still be folded.

        Returns:
            The number of files folded (0 when below ``min_files``).
        """
        # ledger files first, then staging: a record listed before a staging listing that lacks its unit was
        # published (a unit stages before its record is written and unstages after its files are published)
        files = self.store.glob(f"{LEDGER_DIR}/*.parquet")
        staged = {p.split("/")[1] for p in self.store.glob(f"{STAGING_DIR}/*")}
        records = [f for f in files if not _is_compacted(f) and _unit_of(f) not in staged]
        if len(records) < min_files:
            return 0
        footers = {f: self._footer(f) for f in files if _is_compacted(f)}
        table = self._read_records(files=records)
        fold, folded_rows = list(records), table.num_rows
        # a compacted file written before the ledger was sorted is folded once, whatever its size
        for f in sorted(footers, key=lambda f: (_sorted(footers[f]), footers[f].num_rows, f)):
            if _sorted(footers[f]) and folded_rows * merge_ratio < footers[f].num_rows:
                break
            fold.append(f)
            folded_rows += footers[f].num_rows
        if len(fold) > len(records):
            table = pa.concat_tables([table, self._read_records(files=fold[len(records):])])
        frame = table.sort_by([("committed_at", "ascending")]).to_pandas(types_mapper=pd.ArrowDtype)
        scenes = frame[frame["scene_id"].notna()].drop_duplicates(["collection", "scene_id", "output_key"],
                                                                   keep="last")
        # every folded unit stays on record (readers show a unit's files only if its id is here): a unit whose
        # scenes were all superseded, or that committed only errors rows, keeps a marker row without a scene
        gone = frame[~frame["unit_id"].isin(set(scenes["unit_id"]))].drop_duplicates(["unit_id"], keep="last")
        gone = gone.assign(collection=None, scene_id=None, date=None, updated=None)
        frame = pd.concat([scenes, gone], ignore_index=True)
        out = pa.Table.from_pandas(frame, schema=_LEDGER_SCHEMA, preserve_index=False).sort_by(
            [(column, "ascending") for column in _SORT_ORDER])
        out = out.replace_schema_metadata({**(out.schema.metadata or {}), _SORTED_KEY: ",".join(_SORT_ORDER).encode()})
        buf = io.BytesIO()
        pq.write_table(out, buf, row_group_size=ROW_GROUP_ROWS)
        self.store.write_bytes(f"{LEDGER_DIR}/{COMPACTED_PREFIX}{new_run_id()}.parquet", buf.getvalue())
        self.store.remove_many(fold)  # in bulk; a crash here leaves duplicate entries, which readers fold anyway
        return len(fold)

    def _footer(self, rel: str) -> Any:
        """A ledger file's Parquet footer (row count, row groups, key-value metadata)."""
        with self._open(rel) as fh:
            return pq.ParquetFile(fh).metadata

    def _open(self, rel: str) -> Any:
        """A ledger file opened for ranged reads: on an object store each read is one request (fsspec's default
        read-ahead would fetch 50 MB blocks)."""
        return self.store.fs.open(self.store.full(rel), "rb", **({} if self.store.local else {"cache_type": "none"}))


# Entries per row group of a compacted ledger file: a lookup of a few ids reads a few of these (about 0.5 MB each).
ROW_GROUP_ROWS = 65_536
COMPACTED_PREFIX = "compact-"


_SORTED_KEY = b"earthgpt:sorted_by"
# the date before the id: a night's new items have recent acquisition dates whatever their ids look like (Landsat's
# start with the path and row, Sentinel-2's with the date), so their entries lie in the last row groups
_SORT_ORDER = ("output_key", "date", "collection", "scene_id")


def _sorted(metadata: Any) -> bool:
    """Whether a compacted file is sorted for :meth:`Ledger.committed_entries` (written in today's order)."""
    return (metadata.metadata or {}).get(_SORTED_KEY) == ",".join(_SORT_ORDER).encode()


def _is_compacted(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)


def _unit_of(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].removesuffix(".parquet")


def _groups_holding(metadata: Any, output_key: str, ids: Sequence[str], dates: Sequence[str] | None) -> list[int]:
    """Row groups whose statistics allow ``output_key``, one of the sorted ``ids`` and, given, one of the sorted
    ``dates`` (a group without statistics is kept)."""
    names = [metadata.schema.column(j).name for j in range(metadata.num_columns)]
    key_col, id_col, date_col = names.index("output_key"), names.index("scene_id"), names.index("date")
    keep = []
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        key_stats, id_stats = group.column(key_col).statistics, group.column(id_col).statistics
        if key_stats is not None and key_stats.has_min_max and not key_stats.min <= output_key <= key_stats.max:
            continue
        if id_stats is not None and not id_stats.has_min_max and id_stats.null_count == group.num_rows:
            continue  # marker rows only
        if not _may_hold(id_stats, ids):
            continue
        if dates is not None and not _may_hold(group.column(date_col).statistics, dates):
            continue
        keep.append(g)
    return keep


def _may_hold(stats: Any, values: Sequence[str]) -> bool:
    """Whether a column chunk whose statistics are ``stats`` may hold one of the sorted ``values``."""
    import bisect

    if stats is None or not stats.has_min_max or not isinstance(stats.min, str) or not isinstance(stats.max, str):
        return True  # no statistics, or of bytes (a column written without the UTF-8 annotation): may hold
    at = bisect.bisect_left(values, stats.min)
    return at < len(values) and values[at] <= stats.max


def _relisting(read: Any, tries: int = 3) -> Any:
    """``read()``, listed and read again when a listed ledger file is gone: another output key's run compacted the
    ledger meanwhile (it writes the folded file before it removes the records, so a new listing holds every entry)."""
    for attempt in range(tries):
        try:
            return read()
        except FileNotFoundError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _latest(table: pa.Table) -> pa.Table:
    """The latest entry (by ``committed_at``) of each scene in ledger rows, as ``committed_table`` returns it."""
    columns = ["collection", "scene_id", "date", "updated", "unit_id"]
    table = table.filter(pc_is_valid(table["scene_id"])) if table.num_rows else table
    if table.num_rows == 0:
        return table.select(columns)
    frame = table.sort_by([("committed_at", "ascending")]).to_pandas(types_mapper=pd.ArrowDtype)
    frame = frame.drop_duplicates(["collection", "scene_id"], keep="last")
    return pa.Table.from_pandas(frame[columns], preserve_index=False)


def pc_is_valid(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Which entries of a column are not null (pyarrow.compute, imported late like the rest of this module)."""
    import pyarrow.compute as pc

    return pc.is_valid(column)


def skip_reason(previous: CommittedScene | None, updated: datetime | None) -> str | None:
    """Why a scene need not be processed again, or ``None`` if it must be.

    Args:
        previous: The ledger's entry for the scene under this output key, if any.
        updated: The item's STAC ``updated`` now (``None`` if the catalog gives none).

    Returns:
        A human-readable reason to skip, or ``None``.
    """
    if previous is None:
        return None
    if updated is None or previous.updated is None:
        if updated is not None:
            return None  # committed without a timestamp, now has one: treat as new information
        return f"already committed (unit {previous.unit_id}); the item has no `updated` to compare"
    if updated <= previous.updated:
        return f"already committed (unit {previous.unit_id}, item updated {previous.updated:%Y-%m-%dT%H:%M:%SZ})"
    return None


def rewrite_without(
    store: OutputStore,
    staging_dir: str,
    unit_id: str,
    tables: Iterable[str],
    superseded: Mapping[tuple[str, str], Iterable[str]],
    output_key: str,
) -> tuple[list[StagedFile], list[str]]:
    """Copy-on-write: stage rewritten copies of the files that hold superseded scenes, without those scenes.

    Args:
        store: The output root.
        staging_dir: The committing unit's staging folder.
        unit_id: The committing unit (names the rewritten files).
        tables: Tables to rewrite (``scenes``, ``tiles``, ``detections``).
        superseded: ``(collection, date) -> scene ids`` whose old rows must go.
        output_key: Only rows of this output key are removed.

    Returns:
        The staged rewritten files, and the old files to delete when the unit publishes.
    """
    import geopandas as gpd

    staged: list[StagedFile] = []
    delete: list[str] = []
    for table in tables:
        for (collection, date), ids in superseded.items():
            drop = set(ids)
            sizes = store.sizes(partition_dir(table, collection, date))
            names = sorted(p for p in sizes if p.endswith(".parquet"))
            for i, path, data in _files_holding(store, names, sizes, sorted(drop), output_key):
                keys = pq.read_table(io.BytesIO(data), columns=["scene_id", "output_key"])
                hit = [s in drop and k == output_key for s, k in zip(keys["scene_id"].to_pylist(),
                                                                    keys["output_key"].to_pylist(), strict=True)]
                if not any(hit):
                    continue
                frame = gpd.read_parquet(io.BytesIO(data),
                                         to_pandas_kwargs={"types_mapper": pd.ArrowDtype})
                delete.append(path)
                kept = frame[[not h for h in hit]]
                if len(kept):
                    final = f"{partition_dir(table, collection, date)}/part-{unit_id}-cow{i}.parquet"
                    store.write_bytes(f"{staging_dir}/{final}", geoparquet_bytes(kept))
                    staged.append(StagedFile(staged=f"{staging_dir}/{final}", final=final))
    return staged, delete


# A partition's files larger than this (a run's folded files, up to ``output.fold_bytes``) are probed by their footer
# and scene ids before a copy-on-write reads one whole; smaller ones (a unit's) are read whole at once, one request.
WHOLE_READ_BYTES = 1 << 20


def _may_hold_ids(store: OutputStore, path: str, size: int, ids: Sequence[str], output_key: str) -> bool:
    """Whether a table file may hold rows of some scene ids (sorted) under one output key, from its footer (row
    groups whose ``scene_id`` or ``output_key`` statistics rule them out are skipped) and those two columns of the
    others: ranged reads of a few hundred KB, where reading the file would fetch up to ``output.fold_bytes``."""
    with (open(store.full(path), "rb") if store.local else _Ranges(store, path, size)) as fh:
        parquet = pq.ParquetFile(fh)
        meta = parquet.metadata
        where = {meta.schema.column(c).path: c for c in range(meta.num_columns)}
        if "scene_id" not in where or "output_key" not in where:
            return True  # not a table file this job wrote: read it whole, as a small one
        groups = [g for g in range(meta.num_row_groups)
                  if _may_hold(meta.row_group(g).column(where["scene_id"]).statistics, ids)
                  and _may_hold(meta.row_group(g).column(where["output_key"]).statistics, [output_key])]
        if not groups:
            return False
        found = parquet.read_row_groups(groups, columns=["scene_id", "output_key"])
    import pyarrow.compute as pc

    hits = pc.and_(pc.is_in(found["scene_id"], value_set=pa.array(ids, found.schema.field("scene_id").type)),
                   pc.equal(found["output_key"], output_key))
    return bool(pc.any(hits).as_py())


# Bytes of a partition's small files fetched at once (concurrently on an object store) by a copy-on-write.
READ_BATCH_BYTES = 64 << 20


def _files_holding(store: OutputStore, names: Sequence[str], sizes: Mapping[str, int], ids: Sequence[str],
                   output_key: str) -> Iterable[tuple[int, str, bytes]]:
    """``(index in names, path, contents)`` of the files of one partition that may hold rows of some scene ids
    under one output key, in ``names`` order: files over :data:`WHOLE_READ_BYTES` are probed first
    (:func:`_may_hold_ids`, concurrently on a remote store) and read whole only if they may; smaller ones are read
    whole in batches of about :data:`READ_BATCH_BYTES` (one concurrent call each on an object store). A file gone
    since the listing is passed over: it was replaced by a run of another output key (this key's files change only
    under its lease, which this run holds), so it held none of this key's rows."""
    large = [p for p in names if sizes[p] > WHOLE_READ_BYTES]

    def probe(path: str) -> bool:
        try:
            return _may_hold_ids(store, path, sizes[path], ids, output_key)
        except FileNotFoundError:
            return False

    if store.local or len(large) <= 1:
        maybe = {p for p in large if probe(p)}
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(PUBLISH_THREADS, len(large))) as pool:
            maybe = {p for p, hit in zip(large, pool.map(probe, large), strict=True) if hit}
    wanted = [(i, p) for i, p in enumerate(names) if sizes[p] <= WHOLE_READ_BYTES or p in maybe]
    start = 0
    while start < len(wanted):
        end, total = start, 0
        while end < len(wanted) and (end == start or total + sizes[wanted[end][1]] <= READ_BATCH_BYTES):
            total += sizes[wanted[end][1]]
            end += 1
        batch = wanted[start:end]
        start = end
        paths = [p for _, p in batch]
        if store.local:
            blobs: list[Any] = []
            for path in paths:
                try:
                    blobs.append(store.read_bytes(path))
                except FileNotFoundError as exc:
                    blobs.append(exc)
        else:  # one GET a file, concurrent: ranges of known sizes (no HEAD first)
            blobs = store.fs.cat_ranges([store.full(p) for p in paths], [0] * len(paths),
                                        [sizes[p] for p in paths], on_error="return")
        for (i, path), blob in zip(batch, blobs, strict=True):
            if isinstance(blob, FileNotFoundError):
                continue
            if isinstance(blob, BaseException):
                raise blob
            yield i, path, bytes(blob)


class _Ranges(io.RawIOBase):
    """A remote file of known size read by ranged GETs, one per read (no HEAD first, no read-ahead): what Parquet's
    footer and column-chunk reads need."""

    def __init__(self, store: OutputStore, path: str, size: int) -> None:
        super().__init__()
        self._fs, self._path, self._size, self._pos = store.fs, store.full(path), size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}
        if whence not in bases or bases[whence] + offset < 0:
            raise ValueError(f"seek to {offset} from {whence}: outside the file")
        self._pos = bases[whence] + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = bytes(self._fs.cat_file(self._path, start=self._pos, end=end))
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# On an object store a move is a copy and a delete: several requests, each a round trip. One after another, a unit's
# files (its tables' parts and its scenes' Zarr chunks: about 60 for three Sentinel-2 scenes) held the driver, and
# with it every model actor's next batch, for seconds per unit (benchmarks/publish.py). On a store whose fsspec
# filesystem is asynchronous (S3, GCS, Azure) a unit's files are copied concurrently and deleted in bulk (about two
# requests a file instead of six; ``OutputStore.batch_copies``); on other remote stores each file is moved on a pool
# of threads.
PUBLISH_THREADS = 16


def _each(fn: Any, items: Sequence[Any], serial: bool) -> None:
    """``fn(item)`` for every item: in turn (a local disk), or on up to :data:`PUBLISH_THREADS` threads. The first
    error is raised once every call has ended."""
    if serial or PUBLISH_THREADS <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(PUBLISH_THREADS, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    for future in futures:
        future.result()

