"""Folding a run's small table files into larger ones, committed as a unit of their own.

A run commits a unit every ``output.commit_tiles`` tiles, and each unit publishes one file per table and partition
it touches. At archive scale that is thousands of small files a night per table (a night of about 5,000 Sentinel-2
scenes makes about 1,500 units at the defaults), hundreds of thousands in a year: every query lists them and opens
each one's footer, and the copy-on-write of an updated scene reads every file of its partition.

At the end of a run the table files its units published are folded, partition by partition, into files of up to
``output.fold_bytes`` each (files in name order, so a scene's rows stay together). The fold is a commit unit like
any other: its files are staged under ``_staging/<unit>/``, its ledger record (no scenes, a marker row) is the
commit point, and publishing it places the folded files and deletes the files they replace. A crash before the
record leaves the small files as they were (recovery deletes the staged copies); after it, recovery finishes the
publish. Only files of the run's own units are folded: they hold rows of its output key only, under its lease.

Rows keep their ``unit_id`` and ``run_id`` columns; the folded files are named ``part-<fold unit>-fold<k>.parquet``,
so readers that show only committed units' files show them. While a fold publishes, a reader that lists the folder
may see a folded file beside the files it replaces (rows twice) for the moment the publish takes, as while a unit
that rewrote an updated scene's files publishes (docs/outputs.md).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.archive.ledger import Ledger, UnitRecord
from pipelines.archive.store import TABLES, OutputStore, StagedFile

# Tables whose files are written per unit (``runs`` has one file per run).
FOLDED_TABLES: tuple[str, ...] = tuple(t for t in TABLES if t != "runs")
# Rows per row group of a folded file: a reader's filters (time, ids, the bbox covering column) skip row groups, so
# they stay small enough to skip (a unit's file is one row group).
FOLD_ROW_GROUP_ROWS = 65_536


@dataclass
class FoldReport:
    """What :func:`fold_files` did.

    Attributes:
        unit_id: The fold's commit unit (``None`` when nothing was folded).
        files_in: Files folded (deleted once the folded files are published).
        files_out: Folded files written.
        bytes_in: Their size.
        partitions: Partition folders that had files folded.
    """

    unit_id: str | None = None
    files_in: int = 0
    files_out: int = 0
    bytes_in: int = 0
    partitions: int = 0


def is_table_file(rel: str) -> bool:
    """Whether a final path is a per-unit table file (``<table>/collection=<c>/date=<d>/part-<unit>....parquet``)."""
    return rel.split("/", 1)[0] in FOLDED_TABLES and posixpath.basename(rel).startswith("part-")


def plan_folds(sizes: Mapping[str, int], fold_bytes: int) -> list[list[str]]:
    """One partition's files (name order) cut into runs of at most ``fold_bytes`` bytes; a file of that size or
    more, and a run of one file, are left as they are."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    total = 0
    for path in sorted(sizes):
        size = sizes[path]
        if chunk and total + size > fold_bytes:
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(path)
        total += size
    chunks.append(chunk)
    return [c for c in chunks if len(c) > 1]


def fold_files(
    store: OutputStore,
    ledger: Ledger,
    files: Iterable[str],
    unit_id: str,
    run_id: str,
    output_key: str,
    fold_bytes: int,
) -> FoldReport:
    """Fold table files into fewer, larger ones and commit them as one unit.

    Args:
        store: The output root.
        ledger: Its ledger (holding the output key's lease, when the run has one).
        files: Final paths of table files published by the run's units (other paths are ignored; a file gone since
            is left out).
        unit_id: The fold's unit id (a new unit of the run).
        run_id: The run.
        output_key: The run's output key (every folded row's).
        fold_bytes: Most bytes of input files per folded file.

    Returns:
        What was folded.

    Raises:
        LeaseLost: The run no longer holds its output key (nothing is committed; the files stay as they were).
    """
    by_dir: dict[str, list[str]] = {}
    for rel in files:
        if is_table_file(rel):
            by_dir.setdefault(posixpath.dirname(rel), []).append(rel)
    staging = ledger.staging_dir(unit_id)
    report = FoldReport()
    publish: list[StagedFile] = []
    delete: list[str] = []
    for folder, names in sorted(by_dir.items()):
        if len(names) < 2:
            continue
        listed = store.sizes(folder)
        sizes = {rel: listed[rel] for rel in names if rel in listed}
        chunks = plan_folds(sizes, fold_bytes)
        for k, chunk in enumerate(chunks):
            final = f"{folder}/part-{unit_id}-fold{k}.parquet"
            store.write_bytes(f"{staging}/{final}", _concatenated(store, chunk, [sizes[rel] for rel in chunk]))
            publish.append(StagedFile(staged=f"{staging}/{final}", final=final))
            delete.extend(chunk)
            report.files_in += len(chunk)
            report.bytes_in += sum(sizes[rel] for rel in chunk)
        report.partitions += bool(chunks)
    if not publish:
        return report
    ledger.commit(UnitRecord(unit_id=unit_id, run_id=run_id, output_key=output_key, publish=publish, delete=delete))
    report.unit_id = unit_id
    report.files_out = len(publish)
    return report


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
    ``bbox`` the union of the files' boxes and its ``geometry_types`` the union of theirs (empty, meaning any, if
    one file's is empty)."""
    docs = [json.loads(m[b"geo"]) for m in metadatas if b"geo" in m]
    if not docs:
        return None
    merged: dict[str, Any] = json.loads(json.dumps(docs[-1]))
    for name, column in merged.get("columns", {}).items():
        cols = [d.get("columns", {}).get(name, {}) for d in docs]
        boxes = [c.get("bbox") for c in cols]
        if all(boxes):
            column["bbox"] = [min(b[0] for b in boxes), min(b[1] for b in boxes),
                              max(b[2] for b in boxes), max(b[3] for b in boxes)]
        else:
            column.pop("bbox", None)
        types = [c.get("geometry_types") or [] for c in cols]
        column["geometry_types"] = [] if not all(types) else sorted(set().union(*types))
    return json.dumps(merged).encode()
