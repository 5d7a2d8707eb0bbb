"""The training records: which record each rank trains on next, and where a resumed run picks up.

A **pass** is the weighted mixture of the sources, once: a source of weight ``w`` contributes ``floor(w)`` copies of
each record plus one more with probability ``w - floor(w)`` (stochastic rounding), and the pass is one seeded
permutation of all those copies (:func:`pass_order`), so sources interleave and every pass is shuffled anew. Rank
``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` of each pass (:class:`RecordStream`), so ranks never share
a record, and passes follow each other for as long as the job trains.

Everything about a pass follows from ``(seed, pass)``, so a rank's place in the stream is two integers,
:class:`StreamPosition` ``(pass, next position)``. The checkpoint records every rank's position with the samples
consumed; a resumed run continues from there, so no record is trained on twice within a pass (and none is skipped).

Records are read in the training worker itself (raw JSON text, cached per process): parsing, image loading and the
processor run there anyway, and a Ray Data stream on a small box costs a split-coordinator actor that competes with
the training processes for CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pipelines.train_config import ConfigError, SourceConfig


class StreamPosition(NamedTuple):
    """Where a rank's stream continues: ``next`` is the next position of pass ``pass_`` that the rank takes."""

    pass_: int
    next: int


@dataclass(frozen=True)
class StreamRow:
    """One record of a rank's stream.

    Attributes:
        raw: The record's JSON text.
        source: Index of its source in ``data.train``.
        index: Its index in the source file.
        pass_: The pass it belongs to.
        position: Its position in the pass's order.
        after: The stream position once this row is consumed.
    """

    raw: str
    source: int
    index: int
    pass_: int
    position: int
    after: StreamPosition


@functools.lru_cache(maxsize=16)
def source_records(path: str) -> tuple[str, ...]:
    """Every record of a source file as JSON text (read once per process)."""
    from earthgpt.data import iter_raw_records

    return tuple(iter_raw_records(path))


def source_sizes(sources: Sequence[SourceConfig], section: str = "data.train") -> list[int]:
    """Records per source file; reading them up front refuses a missing or unreadable file before any work.

    Args:
        sources: The sources.
        section: Their config field, for messages.

    Raises:
        ConfigError: naming the source that cannot be read.
    """
    from earthgpt.data import count_records

    sizes = []
    for i, src in enumerate(sources):
        try:
            sizes.append(count_records(src.path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{section}.{i}.path: data source {i} ({src.path}): cannot read it: {exc}") from None
    return sizes


def pass_order(
    sizes: Sequence[int], weights: Sequence[float], seed: int, pass_: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(source, index)`` of every record copy of one pass, in the pass's order.

    Args:
        sizes: Records per source.
        weights: Sampling rate per source (copies per record per pass, stochastically rounded).
        seed: The job's data seed.
        pass_: The pass.

    Returns:
        Two int64 arrays of equal length.
    """
    sources, indices = [], []
    for s, (n, w) in enumerate(zip(sizes, weights, strict=True)):
        whole = int(np.floor(w))
        copies = np.full(n, whole, dtype=np.int64)
        if w - whole > 0:
            copies += np.random.default_rng([seed, pass_, s]).random(n) < (w - whole)
        idx = np.repeat(np.arange(n, dtype=np.int64), copies)
        sources.append(np.full(len(idx), s, dtype=np.int64))
        indices.append(idx)
    src, idx = np.concatenate(sources), np.concatenate(indices)
    perm = np.random.default_rng([seed, pass_]).permutation(len(src))
    return src[perm], idx[perm]


def resume_position(saved: dict[str, Any] | None, rank: int, world: int) -> StreamPosition:
    """Where rank ``rank`` of ``world`` continues, from the positions a checkpoint saved.

    With the same number of ranks each continues exactly where it stopped. With another number, every rank starts at
    the slowest saved position of the earliest pass (every position before it was consumed; a few records that faster
    ranks consumed beyond it come again).

    Args:
        saved: ``{"world": W, "positions": [[pass, next], ...]}`` from the checkpoint, or ``None`` (a fresh run).
        rank: This rank.
        world: Ranks now.
    """
    if not saved or not saved.get("positions"):
        return StreamPosition(0, rank)
    positions = [StreamPosition(int(p), int(g)) for p, g in saved["positions"]]
    if int(saved.get("world", 0)) == world and len(positions) == world:
        return positions[rank]
    first = min(p.pass_ for p in positions)
    start = min(p.next for p in positions if p.pass_ == first)
    return StreamPosition(first, start + rank)


class RecordStream:
    """One rank's endless record stream: pass after pass, every ``world``-th position from ``start``.

    Args:
        sources: The training sources.
        seed: The data seed (the same on every rank).
        rank: This rank.
        world: Number of ranks.
        start: Where to begin (:func:`resume_position`).
    """

    def __init__(
        self, sources: Sequence[SourceConfig], seed: int, rank: int, world: int, start: StreamPosition
    ) -> None:
        self.records = [source_records(s.path) for s in sources]
        self.weights = [s.weight for s in sources]
        self.seed, self.rank, self.world, self.start = seed, rank, world, start
        sizes = [len(r) for r in self.records]
        if sum(n * w for n, w in zip(sizes, self.weights, strict=True)) <= 0:
            raise ConfigError("data.train: the sources hold no records at their weights")

    def __iter__(self) -> Iterator[StreamRow]:
        pass_, g = self.start
        sizes = [len(r) for r in self.records]
        while True:
            src, idx = pass_order(sizes, self.weights, self.seed, pass_)
            while g < len(src):
                s, i = int(src[g]), int(idx[g])
                yield StreamRow(self.records[s][i], s, i, pass_, g, StreamPosition(pass_, g + self.world))
                g += self.world
            pass_, g = pass_ + 1, self.rank


def eval_rows(sources: Sequence[SourceConfig], limit: int, rank: int, world: int) -> list[tuple[str, int, int]]:
    """This rank's share (every world-th) of ``limit`` held-out records spread evenly over the held-out files.

    Evenly spaced rather than the first ones: held-out files are often ordered by scene or sensor.

    Returns:
        ``(raw JSON, source, index)`` triples.
    """
    rows = [(raw, i, j) for i, src in enumerate(sources) for j, raw in enumerate(source_records(src.path))]
    if len(rows) > limit > 0:
        rows = [rows[int(k * len(rows) / limit)] for k in range(limit)]
    return rows[rank::world]
