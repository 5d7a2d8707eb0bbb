"""Scoring generated answers against reference answers, per task: what ``earthgpt eval`` reports and what the
training job logs at each held-out evaluation (one implementation, imported by both).

The prediction and the reference are parsed the same way (``earthgpt.tasks.parse_answer``), so any MMRS-1M-format
record can be scored; the metrics are ``earthgpt.metrics``'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from earthgpt import metrics as M
from earthgpt.data import Record
from earthgpt.tasks import NO_OBJECTS, parse_answer


@dataclass
class ScoredItem:
    """One question put to the model.

    Attributes:
        task: The record's task.
        prediction: Generated answer text.
        reference: Reference answer text.
        image_hw: ``(height, width)`` of the image (to map boxes back to pixels).
    """

    task: str
    prediction: str
    reference: str
    image_hw: tuple[int, int]


def first_turn(record: Record) -> tuple[str, str]:
    """The first (question, reference answer) pair of a record."""
    return record.conversations[0]["value"], record.conversations[1]["value"]


def _count(parsed: Any) -> int | None:
    if parsed.counts:
        return int(sum(parsed.counts.values()))
    if parsed.text.strip().rstrip(".") == NO_OBJECTS.rstrip("."):
        return 0
    return len(parsed.boxes) if parsed.boxes else None


def _detections(parsed: Any, score: float = 1.0) -> list[M.Detection]:
    return [M.Detection(b.label, b.as_tuple(), score) for b in parsed.boxes]


def score_items(items: Sequence[ScoredItem]) -> dict[str, dict[str, float]]:
    """Task metrics over scored items, ``{task: {metric: value}}`` (every task gets ``n``).

    Args:
        items: Predictions with their references.
    """
    by_task: dict[str, list[ScoredItem]] = defaultdict(list)
    for item in items:
        by_task[item.task].append(item)
    out: dict[str, dict[str, float]] = {}
    for task, group in sorted(by_task.items()):
        row: dict[str, float] = {"n": float(len(group))}
        if task == "classify":
            preds = [parse_answer(task, g.prediction).label or "" for g in group]
            refs = [parse_answer(task, g.reference).label or "" for g in group]
            row["accuracy"] = M.accuracy(preds, refs)
        elif task == "vqa":
            row["accuracy"] = M.accuracy([g.prediction for g in group], [g.reference for g in group])
        elif task in ("caption", "region_caption"):
            row.update(M.caption_metrics([g.prediction for g in group], [[g.reference] for g in group]))
        elif task == "ground":
            pred_boxes: list[M.Box | None] = []
            ref_boxes: list[M.Box] = []
            for g in group:
                ref = parse_answer(task, g.reference, g.image_hw)
                if not ref.boxes:
                    continue
                pred = parse_answer(task, g.prediction, g.image_hw)
                pred_boxes.append(pred.boxes[0].as_tuple() if pred.boxes else None)
                ref_boxes.append(ref.boxes[0].as_tuple())
            row.update(M.grounding_accuracy(pred_boxes, ref_boxes))
        elif task == "detect":
            preds_p = [parse_answer(task, g.prediction, g.image_hw) for g in group]
            refs_p = [parse_answer(task, g.reference, g.image_hw) for g in group]
            det = M.detection_metrics([_detections(p) for p in preds_p], [_detections(r) for r in refs_p])
            row.update({k: det[k] for k in ("precision", "recall", "F1", "mAP")})
            true_counts = [_count(r) or 0 for r in refs_p]
            row["count_accuracy"] = M.counting_accuracy([_count(p) for p in preds_p], true_counts)
            row["malformed_boxes"] = float(sum(p.n_malformed for p in preds_p))
        out[task] = row
    return out
