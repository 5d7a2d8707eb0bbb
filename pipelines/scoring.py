"""Scoring generated answers against reference answers, per task: what ``earthgpt eval`` reports and what the
training job logs at each held-out evaluation (one implementation, imported by both).

The prediction and the reference are parsed the same way (``earthgpt.tasks.parse_answer``), so any MMRS-1M-format
record can be scored; the metrics are ``earthgpt.metrics``'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from earthgpt import metrics as M
from earthgpt.data import Record
from earthgpt.tasks import NO_OBJECTS, parse_answer, span_confidence


@dataclass
class ScoredItem:
    """One question put to the model.

    Attributes:
        task: The record's task.
        prediction: Generated answer text.
        reference: Reference answer text.
        image_hw: ``(height, width)`` of the image (to map boxes back to pixels).
        token_ends: For each generated token, where its text ends in ``prediction`` (empty when unknown).
        token_logprobs: Each generated token's log-probability, aligned with ``token_ends``; with them every
            predicted box is scored by its own tokens (:func:`earthgpt.tasks.span_confidence`), else by 1.
    """

    task: str
    prediction: str
    reference: str
    image_hw: tuple[int, int]
    token_ends: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)


def scored_item(record: Record, image_hw: tuple[int, int], generation: Any, processor: Any) -> ScoredItem:
    """A generated answer to ``record``'s first question, ready to score; a detection answer keeps its tokens'
    text ends and log-probabilities, so each box is ranked by its own confidence (mAP).

    Args:
        record: The record asked (its ``task`` set).
        image_hw: ``(height, width)`` of its image.
        generation: The engine's ``Generation`` (``text``, ``token_ids``, ``token_logprobs``).
        processor: The model's processor (maps token ids to text ends).
    """
    assert record.task is not None
    item = ScoredItem(record.task, generation.text, first_turn(record)[1], image_hw)
    if record.task == "detect" and getattr(generation, "token_logprobs", None):
        item.token_ends = processor.answer_token_ends(generation.token_ids)
        item.token_logprobs = list(generation.token_logprobs)
    return item


def first_turn(record: Record) -> tuple[str, str]:
    """The first (question, reference answer) pair of a record."""
    return record.conversations[0]["value"], record.conversations[1]["value"]


def _count(parsed: Any) -> int | None:
    if parsed.counts:
        return int(sum(parsed.counts.values()))
    if parsed.text.strip().rstrip(".") == NO_OBJECTS.rstrip("."):
        return 0
    return len(parsed.boxes) if parsed.boxes else None


def _detections(parsed: Any, item: ScoredItem | None = None) -> list[M.Detection]:
    """The parsed boxes as detections, each scored by its own tokens when ``item`` carries them (else 1)."""
    scores = [1.0] * len(parsed.boxes)
    if item is not None and item.token_logprobs:
        # a box no token covers cannot happen for generated text; rank it last rather than drop it
        scores = [0.0 if c != c else c for c in span_confidence(parsed.box_spans, item.token_ends,
                                                                item.token_logprobs)]  # fmt: skip
    return [M.Detection(b.label, b.as_tuple(), s) for b, s in zip(parsed.boxes, scores, strict=True)]


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
            det = M.detection_metrics(
                [_detections(p, g) for p, g in zip(preds_p, group, strict=True)], [_detections(r) for r in refs_p]
            )
            row.update({k: det[k] for k in ("precision", "recall", "F1", "mAP")})
            true_counts = [_count(r) or 0 for r in refs_p]
            row["count_accuracy"] = M.counting_accuracy([_count(p) for p in preds_p], true_counts)
            row["malformed_boxes"] = float(sum(p.n_malformed for p in preds_p))
        out[task] = row
    return out
