"""Folding a run's small table files into larger ones, committed as a unit of their own.

A run commits a unit every ``output.commit_tiles`` tiles, and each unit publishes one file per table and partition
it touches. At archive scale that is thousands of small files a night per table (a night of about 5,000 Sentinel-2
scenes makes about 1,500 units at the defaults), hundreds of thousands in a year: every query lists them and opens
each one's footer, and the copy-on-write of an updated scene reads every file of its partition.

At the end of a run the table files its units published are folded, partition by partition, into files of up to
``output.fold_bytes`` each (files in name order, so a scene's rows stay together). A fold is a commit unit like any
other (a run with more than :data:`FOLD_PATHS` files to fold commits several): its files are staged under
``_staging/<unit>/``, its ledger record (no scenes, a marker row) is the commit point, and publishing it places the
folded files and then deletes the files they replace. A crash before the record leaves the small files as they were
(recovery deletes the staged copies); after it, recovery finishes the publish. Only files of the run's own units are
folded (found by name in a listing of each partition the run wrote to): they hold rows of its output key only, under
its lease.

Rows keep their ``unit_id`` and ``run_id`` columns; the folded files are named ``part-<fold unit>-fold<k>.parquet``,
so readers that show only committed units' files show them. While a fold publishes, a reader that lists the folder
may see a folded file beside the files it replaces (rows twice) for the moment the publish takes, as while a unit
that rewrote an updated scene's files publishes (docs/outputs.md).

A run that ends before its fold (killed, failed) leaves its files to the next run of its output key, which folds
them as its own fold units (``runs``, with the folders :func:`folders_of_runs` finds in the ledger).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.archive.lease import LeaseLost
from pipelines.archive.ledger import STAGING_DIR, Ledger, UnitRecord, run_of
from pipelines.archive.store import TABLES, OutputStore, StagedFile, part_unit, partition_dir

# Tables whose files are written per unit (``runs`` has one file per run).
FOLDED_TABLES: tuple[str, ...] = tuple(t for t in TABLES if t != "runs")
# Rows per row group of a folded file: a reader's filters (time, ids, the bbox covering column) skip row groups, so
# they stay small enough to skip (a unit's file is one row group).
FOLD_ROW_GROUP_ROWS = 65_536


# Paths one fold unit publishes or deletes, at most: its record lists them all in its Parquet footer (readers refuse a
# footer past 100 MB), and a fold cut short loses only its own unit's work. A run with more files to fold commits
# several fold units.
FOLD_PATHS = 4096


class FoldPublishFailed(RuntimeError):
    """A fold unit is committed but its publish did not finish (the next run of the output key finishes it)."""

    def __init__(self, unit_id: str, cause: BaseException, files_in: int = 0) -> None:
        super().__init__(f"fold unit {unit_id} is committed but its publish failed ({type(cause).__name__}: {cause})")
        self.unit_id = unit_id
        self.files_in = files_in  # the files it folds (deleted once its publish is finished)


@dataclass
class FoldReport:
    """What :func:`fold_run` did.

    Attributes:
        units: The fold's committed units, in commit order.
        files_in: Files they fold (deleted once the folded files are published).
        files_out: Folded files they publish.
        bytes_in: Size of the files they fold.
        partitions: Partition folders that had files to fold.
    """

    units: list[str] = field(default_factory=list)
    files_in: int = 0
    files_out: int = 0
    bytes_in: int = 0
    partitions: int = 0


def is_table_file(rel: str) -> bool:
    """Whether a final path is a per-unit table file (``<table>/collection=<c>/date=<d>/part-<unit>....parquet``)."""
    return rel.split("/", 1)[0] in FOLDED_TABLES and part_unit(rel) is not None


def plan_folds(sizes: Mapping[str, int], fold_bytes: int, max_files: int | None = None) -> list[list[str]]:
    """One partition's files (name order) cut into runs of at most ``fold_bytes`` bytes (and ``max_files`` files);
    a file of that size or more, and a run of one file, are left as they are."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    total = 0
    for path in sorted(sizes):
        size = sizes[path]
        if chunk and (total + size > fold_bytes or (max_files is not None and len(chunk) >= max_files)):
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(path)
        total += size
    chunks.append(chunk)
    return [c for c in chunks if len(c) > 1]


def fold_run(
    store: OutputStore,
    ledger: Ledger,
    folders: Iterable[str],
    run_id: str,
    output_key: str,
    fold_bytes: int,
    new_unit_id: Callable[[], str],
    max_paths: int = FOLD_PATHS,
    report: FoldReport | None = None,
    runs: Collection[str] | None = None,
) -> FoldReport:
    """Fold a run's table files in some partition folders into fewer, larger ones, committed as fold units.

    Each folder is listed once; the files of the run's units (``part-<run_id>-u...``) are folded, except those of a
    unit whose staging folder is still there (its publish is not finished: recovery replays it, and must find its
    files where it put them). ``runs`` names other runs of the output key whose files to fold instead (runs that
    ended before their own fold); the fold units are still ``run_id``'s.

    Args:
        store: The output root.
        ledger: Its ledger (holding the output key's lease, when the run has one).
        folders: Partition folders the run's units published table files into (others are ignored).
        run_id: The run.
        output_key: The run's output key (every folded row's).
        fold_bytes: Most bytes of input files per folded file.
        new_unit_id: Gives the run's next unit id (one per fold unit).
        max_paths: Most files one fold unit publishes and deletes (:data:`FOLD_PATHS`).
        report: Filled in as the fold goes (what was committed, also when a later unit fails); a new one if not
            given.
        runs: The runs whose units' files are folded (default: ``run_id`` alone). Each must be ``run_id`` or a run
            of the output key that no longer holds its lease.

    Returns:
        ``report``.

    Raises:
        LeaseLost: The run no longer holds its output key (the unit in hand is not committed; its files stay).
        FoldPublishFailed: A fold unit is committed but its publish failed.
    """
    if max_paths < 3:
        raise ValueError(f"max_paths must be >= 3 (two files and their folded file), got {max_paths}")
    unfinished = set(store.children(STAGING_DIR))
    owners = frozenset((run_id,) if runs is None else runs)
    report = FoldReport() if report is None else report
    batch: list[tuple[list[str], str]] = []  # (files folded, final path of their folded file) staged for one unit
    paths = pending_bytes = 0  # the batch's files and folded files; the bytes of the files it folds
    unit_id = ""
    committing = False  # the unit in hand's record may be written: its staging folder is recovery's

    def commit() -> None:
        nonlocal batch, unit_id, paths, committing, pending_bytes
        publish = [StagedFile(staged=f"{ledger.staging_dir(unit_id)}/{final}", final=final) for _, final in batch]
        delete = [rel for chunk, _ in batch for rel in chunk]
        committing = True
        try:
            ledger.commit(UnitRecord(unit_id=unit_id, run_id=run_id, output_key=output_key, publish=publish,
                                     delete=delete))
        except LeaseLost:
            committing = False  # refused before its record
            raise
        except Exception as exc:
            if ledger.has_record(unit_id):  # if this check fails too, the unit stays to recovery
                raise FoldPublishFailed(unit_id, exc, files_in=len(delete)) from exc
            committing = False
            raise
        report.units.append(unit_id)
        report.files_out += len(publish)
        report.files_in += len(delete)
        report.bytes_in += pending_bytes
        batch, unit_id, paths, committing, pending_bytes = [], "", 0, False, 0

    try:
        for folder in sorted({f for f in folders if f.split("/", 1)[0] in FOLDED_TABLES}):
            listed = store.sizes(folder)
            sizes = {rel: size for rel, size in listed.items() if (unit := part_unit(rel)) is not None
                     and run_of(unit) in owners and unit not in unfinished}
            chunks = plan_folds(sizes, fold_bytes, max_files=max_paths - 1)
            index = 0
            for chunk in chunks:
                if batch and paths + len(chunk) + 1 > max_paths:
                    commit()
                if not unit_id:
                    unit_id, index = new_unit_id(), 0
                final = f"{folder}/part-{unit_id}-fold{index}.parquet"
                index += 1
                store.write_bytes(f"{ledger.staging_dir(unit_id)}/{final}",
                                  _concatenated(store, chunk, [sizes[rel] for rel in chunk]))
                batch.append((chunk, final))
                paths += len(chunk) + 1
                pending_bytes += sum(sizes[rel] for rel in chunk)
            report.partitions += bool(chunks)
        if batch:
            commit()
    except BaseException:
        if unit_id and not committing:  # never committed: its staged files go now, not at the next run
            with contextlib.suppress(Exception):
                store.remove(ledger.staging_dir(unit_id), recursive=True)
        raise
    return report


def folders_of_runs(committed: pa.Table, runs: Collection[str]) -> set[str]:
    """The partition folders of every folded table that units of ``runs`` may have published files into, from the
    output key's ledger entries (``Ledger.committed_table``: a scene's tables are partitioned by its collection and
    date). A scene committed again since by a later run is that run's: its older file was rewritten then."""
    if not runs or committed.num_rows == 0:
        return set()
    import pyarrow.compute as pc

    units = committed["unit_id"]
    mask = pc.starts_with(units, pattern=f"{sorted(runs)[0]}-u")
    for run in sorted(runs)[1:]:  # a few runs: those that ended before their fold
        mask = pc.or_(mask, pc.starts_with(units, pattern=f"{run}-u"))
    pairs = committed.filter(mask).select(["collection", "date"]).group_by(["collection", "date"]).aggregate([])
    return {partition_dir(table, c, d) for c, d in zip(pairs["collection"].to_pylist(), pairs["date"].to_pylist(),
                                                       strict=True) for table in FOLDED_TABLES}


def _concatenated(store: OutputStore, paths: Sequence[str], sizes: Sequence[int]) -> bytes:
    """The files' rows, in order, as one GeoParquet file (their GeoParquet metadata merged)."""
    # one GET a file, concurrent on an object store: ranges of known sizes (``cat`` of a list would first ask of each
    # path whether it is a folder, and a whole-file read its size)
    blobs = store.fs.cat_ranges([store.full(p) for p in paths], [0] * len(paths), list(sizes), on_error="raise")
    tables = [pq.read_table(io.BytesIO(blob)) for blob in blobs]
    geo = merged_geo_metadata([t.schema.metadata or {} for t in tables])
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")
    metadata = dict(tables[-1].schema.metadata or {})
    if geo is not None:
        metadata[b"geo"] = geo
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), out, compression="zstd",
                   row_group_size=FOLD_ROW_GROUP_ROWS)
    return out.getvalue()


def merged_geo_metadata(metadatas: Sequence[Mapping[bytes, bytes]]) -> bytes | None:
    """GeoParquet ``geo`` metadata for files' rows put together: the last file's, with each geometry column's
    ``bbox`` the union of the files' boxes (2D, as geopandas writes them) and its ``geometry_types`` the union of
    theirs (empty, meaning any, if one file's is empty)."""
    docs = [json.loads(m[b"geo"]) for m in metadatas if b"geo" in m]
    if not docs:
        return None
    merged: dict[str, Any] = json.loads(json.dumps(docs[-1]))
    for name, column in merged.get("columns", {}).items():
        cols = [d.get("columns", {}).get(name, {}) for d in docs]
        # a file whose geometries are all null has no bbox (geopandas leaves it out): it adds nothing to the union
        boxes = [c["bbox"] for c in cols if c.get("bbox")]
        if boxes:
            column["bbox"] = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                              max(b[2] for b in boxes), max(b[3] for b in boxes)]
        else:
            column.pop("bbox", None)
        types = [c.get("geometry_types") or [] for c in cols]
        column["geometry_types"] = [] if not all(types) else sorted(set().union(*types))
    return json.dumps(merged).encode()
