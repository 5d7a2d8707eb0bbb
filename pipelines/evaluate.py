"""``earthgpt eval CHECKPOINT DATA...``: answer held-out MMRS-1M-format records and score every task.

For each record the first question is put to the model (the inference engine's greedy decoding, the same prompt
template as the archive job) and the answer is parsed with ``earthgpt.tasks.parse_answer``; the reference answer is
parsed the same way, so any MMRS-1M-format file can be scored. Metrics (``earthgpt.metrics``, coco-caption
conventions, see its docstring):

- ``classify``: accuracy; ``vqa``: exact-match accuracy;
- ``caption`` / ``region_caption``: BLEU-1..4, METEOR (exact-match module), ROUGE-L, CIDEr;
- ``ground``: Acc@0.5 and mean IoU;
- ``detect``: precision / recall / F1 at IoU 0.5, mAP@0.5, counting accuracy (stated count equals the true count).
  mAP ranks the boxes by each box's own confidence: ``exp`` of the mean log-probability of the generated tokens that
  wrote its coordinates (``earthgpt.tasks.span_confidence``, as the archive job's ``detections.confidence``).

CHECKPOINT is a ``save_pretrained`` folder (the training job's export), a Ray Train checkpoint folder of the training
job (exported on the fly), or a preset name (``small``: random weights, the untrained baseline). Prints a table and
writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from earthgpt import metrics as M
from earthgpt.data import MalformedRecord, Record, iter_raw_records, load_image, parse_record
from pipelines.scoring import ScoredItem, first_turn, score_items, scored_item

__all__ = ["ScoredItem", "answer_records", "cli", "evaluate", "first_turn", "load_records", "score_items"]


def load_records(
    paths: Sequence[str], image_root: str | None = None, limit: int | None = None, per_task: bool = False
) -> tuple[list[Record], int]:
    """Reads evaluation records (first ``limit`` per file, or per task with ``per_task``), skipping malformed ones.

    Returns:
        ``(records with a known task, number of malformed or task-less records skipped)``.
    """
    records: list[Record] = []
    skipped = 0
    for path in paths:
        taken: dict[str | None, int] = defaultdict(int)
        for i, raw in enumerate(iter_raw_records(path)):
            try:
                rec = parse_record(raw, source=Path(path).name, image_root=image_root, index=i)
            except MalformedRecord:
                skipped += 1
                continue
            if rec.task is None or len(rec.conversations) < 2:
                skipped += 1
                continue
            key = rec.task if per_task else None
            if limit is not None and taken[key] >= limit:
                continue
            taken[key] += 1
            records.append(rec)
    return records, skipped


def answer_records(
    engine: Any, records: Sequence[Record], batch_size: int = 32, max_new_tokens: int = 96
) -> list[ScoredItem]:
    """Generates the answer to each record's first question (greedy) with an ``InferenceEngine``-like object.

    Unreadable images are skipped (counted by the caller through the shorter result).
    """
    items: list[ScoredItem] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images, prompts = [], []
        kept: list[Record] = []
        for rec in chunk:
            try:
                images.append(load_image(rec.image))
            except MalformedRecord:
                continue
            prompts.append(first_turn(rec)[0])
            kept.append(rec)
        if not kept:
            continue
        generations = engine.generate(images, prompts, max_new_tokens=max_new_tokens)
        for rec, img, gen in zip(kept, images, generations, strict=True):
            items.append(scored_item(rec, (int(img.shape[0]), int(img.shape[1])), gen, engine.processor))
    return items


def _guess_image_root(path: str) -> str:
    """The folder a local file's relative image paths start from: its own folder, else its parent (toy world)."""
    here = Path(path).absolute().parent
    for raw in iter_raw_records(path):
        try:
            image = json.loads(raw).get("image", "")
        except (json.JSONDecodeError, AttributeError):
            continue
        for root in (here, here.parent):
            if isinstance(image, str) and (root / image).exists():
                return str(root)
        break
    return str(here)


def evaluate(
    checkpoint: str,
    data: Sequence[str],
    *,
    image_root: str | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    seed: int = 0,
) -> dict[str, Any]:
    """Loads a model and scores it on MMRS-1M-format files.

    Args:
        checkpoint: ``save_pretrained`` folder, training-job checkpoint folder, or preset name (random weights).
        data: Evaluation JSON files.
        image_root: Root of relative image paths (default: each file's folder, or its parent when the images are
            there, as in the toy world's ``mmrs/`` folder).
        limit: At most this many records per task.
        batch_size: Prompts per generate call.
        max_new_tokens: Answer budget.
        seed: Weight seed for a preset.

    Returns:
        ``{"checkpoint", "metrics": {task: {...}}, "records", "skipped", "seconds", "samples_per_s"}``.
    """
    from earthgpt.engine import InferenceEngine

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(checkpoint)
        if path.is_dir() and (path / "trainer_state.json").exists():
            from pipelines.training.export import export_checkpoint

            export_checkpoint(str(path), tmp)
            path = Path(tmp)
        engine = InferenceEngine.from_pretrained(str(path) if path.exists() else checkpoint, seed=seed)
    records: list[Record] = []
    skipped = 0
    for file in data:
        root = image_root if image_root is not None else _guess_image_root(file)
        recs, n_bad = load_records([file], root, limit=limit, per_task=True)
        records.extend(recs)
        skipped += n_bad
    t_gen = time.perf_counter()
    items = answer_records(engine, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    gen_seconds = time.perf_counter() - t_gen
    return {
        "checkpoint": str(checkpoint),
        "metrics": score_items(items),
        "records": len(items),
        "skipped": skipped + (len(records) - len(items)),
        "seconds": time.perf_counter() - t0,
        "samples_per_s": len(items) / gen_seconds if gen_seconds > 0 else 0.0,
    }


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt eval CHECKPOINT DATA... [--image-root R] [--limit N] [--out FILE]``."""
    parser = argparse.ArgumentParser(prog="earthgpt eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint", help="save_pretrained folder, training checkpoint folder, or preset name"
    )
    parser.add_argument("data", nargs="+", help="MMRS-1M-format JSON files")
    parser.add_argument(
        "--image-root", default=None, help="root of relative image paths (default: each file's dir)"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N records per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="answer budget (default %(default)s: a seven-object detection answer fits)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    missing = [d for d in args.data if "://" not in d and not Path(d).exists()]
    if missing:
        print(f"earthgpt eval: data file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    result = evaluate(
        args.checkpoint,
        args.data,
        image_root=args.image_root,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print(M.format_table(result["metrics"]))
    print(f"\n{result['records']} records scored, {result['skipped']} skipped, {result['seconds']:.1f} s")
    if result["records"] == 0 and result["skipped"]:
        print(
            "earthgpt eval: no record could be scored (images not found? pass --image-root)", file=sys.stderr
        )
        return 1
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
