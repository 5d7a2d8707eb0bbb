"""Outcomes of the reliability scenarios: the exactly-once check every scenario ends with, and its record.

Every chaos or bad-input test ends with :func:`check_exactly_once`, which reads the committed tables of an output root
and compares them with the tiles the scenario planned: each planned tile must appear exactly once, as a ``tiles`` row
or as an ``errors`` row (a scene-level error row, ``tile_id`` null, stands for all of that scene's tiles), and nothing
else may be there. The check returns an :class:`Outcome`, which :func:`record` appends as one JSON line to
``$EARTHGPT_RELIABILITY_LOG`` (default ``build/reliability/outcomes.jsonl``); ``python -m tests.reliability.report``
turns that log into the table of ``docs/reliability.md``, so the document states what the suite measured.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LOG_ENV = "EARTHGPT_RELIABILITY_LOG"
DEFAULT_LOG = Path(__file__).resolve().parents[2] / "build" / "reliability" / "outcomes.jsonl"

TileKey = tuple[str, str, str]  # (collection, scene_id, tile_id)


@dataclass
class Outcome:
    """What one scenario left in the committed tables, against what it planned.

    Attributes:
        scenario: Short id of the scenario (``driver-killed``, ``zoo-truncated-cog``...).
        guarantee: The guarantee the scenario checks, one sentence.
        planned: Tiles planned (each scene's tile plan; a scene that could not be planned counts as one tile).
        written: Planned tiles present as ``tiles`` rows (``ok`` or ``skipped``).
        errored: Planned tiles present only as ``errors`` rows (tile rows, or covered by a scene-level error row).
        duplicated: Extra rows for a planned tile beyond its first (two ``tiles`` rows, or a row and an error).
        missing: Planned tiles with neither a row nor an error.
        unexpected: Rows for tiles that were not planned.
        error_types: ``error_type`` counts among the error rows.
        details: Anything else the scenario measured (kills, retries, faults injected).
    """

    scenario: str
    guarantee: str
    planned: int
    written: int
    errored: int
    duplicated: int
    missing: int
    unexpected: int
    error_types: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        """Every planned tile once, nothing else."""
        return self.duplicated == 0 and self.missing == 0 and self.unexpected == 0


def _rows(outputs: Any, table: str, columns: list[str]) -> list[dict[str, Any]]:
    frame = outputs.read(table, columns=columns)
    if frame is None or len(frame) == 0:
        return []
    return frame[[c for c in columns if c in frame.columns]].to_dict("records")


def check_exactly_once(
    root: str,
    planned: Mapping[tuple[str, str], Iterable[str]],
    *,
    scenario: str,
    guarantee: str,
    storage_options: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
) -> Outcome:
    """Compare the committed tables under ``root`` with the planned tiles.

    Args:
        root: Output root (local folder or ``s3://``).
        planned: ``{(collection, scene_id): tile ids}``; a scene whose tiles cannot be planned (a broken item) maps to
            an empty list and counts as one planned unit, satisfied by a scene-level error row.
        scenario: Scenario id for the record.
        guarantee: The guarantee checked, one sentence.
        storage_options: fsspec options for an ``s3://`` root.
        details: Extra figures to keep with the outcome.

    Returns:
        The outcome; callers assert ``outcome.exactly_once`` and then :func:`record` it.
    """
    from pipelines.results.outputs import Outputs

    outputs = Outputs(root, storage_options)
    tiles = _rows(outputs, "tiles", ["collection", "scene_id", "tile_id"])
    errors = _rows(outputs, "errors", ["collection", "scene_id", "tile_id", "error_type"])

    wanted: set[TileKey] = set()
    whole: set[tuple[str, str]] = set()
    for (collection, scene_id), tile_ids in planned.items():
        ids = list(tile_ids)
        if not ids:
            whole.add((collection, scene_id))
        wanted.update((collection, scene_id, t) for t in ids)

    seen: Counter[TileKey] = Counter()
    written_keys: set[TileKey] = set()
    unexpected = 0
    for r in tiles:
        key = (str(r["collection"]), str(r["scene_id"]), str(r["tile_id"]))
        if key not in wanted:
            unexpected += 1
            continue
        seen[key] += 1
        written_keys.add(key)

    scene_errors: Counter[tuple[str, str]] = Counter()
    for r in errors:
        scene = (str(r["collection"]), str(r["scene_id"]))
        tile_id = r.get("tile_id")
        if tile_id is None or tile_id != tile_id:  # null (None or NaN)
            if scene in planned:
                scene_errors[scene] += 1
            else:
                unexpected += 1
            continue
        key = (*scene, str(tile_id))
        if key not in wanted:
            unexpected += 1
            continue
        seen[key] += 1

    # A scene-level error stands for each of the scene's tiles that has no other row.
    by_scene: dict[tuple[str, str], list[TileKey]] = {}
    for key in wanted:
        by_scene.setdefault(key[:2], []).append(key)
    for scene, n in scene_errors.items():
        for key in by_scene.get(scene, []):
            seen[key] += n
    planned_units = len(wanted) + len(whole)
    whole_seen = {s: scene_errors.get(s, 0) for s in whole}

    duplicated = sum(n - 1 for n in seen.values() if n > 1) + sum(n - 1 for n in whole_seen.values() if n > 1)
    missing = sum(1 for k in wanted if seen[k] == 0) + sum(1 for n in whole_seen.values() if n == 0)
    written = len(written_keys)
    errored = sum(1 for k in wanted if seen[k] > 0 and k not in written_keys) + sum(
        1 for n in whole_seen.values() if n > 0
    )
    return Outcome(
        scenario=scenario,
        guarantee=guarantee,
        planned=planned_units,
        written=written,
        errored=errored,
        duplicated=duplicated,
        missing=missing,
        unexpected=unexpected,
        error_types=dict(Counter(str(r["error_type"]) for r in errors)),
        details=dict(details or {}),
    )


def record(outcome: Outcome, log: str | os.PathLike[str] | None = None) -> Path:
    """Append ``outcome`` as one JSON line to the reliability log (replacing an earlier line of the same scenario
    when the report is built: the last line per scenario wins).

    Returns:
        The log's path.
    """
    path = Path(log or os.environ.get(LOG_ENV) or DEFAULT_LOG)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {**asdict(outcome), "exactly_once": outcome.exactly_once}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True, default=str) + "\n")
    return path
