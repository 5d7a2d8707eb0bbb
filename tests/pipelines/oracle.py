"""A perfect model stage for end-to-end tests: it answers every tile from the toy world's ground truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from earthgpt.tasks import format_answer

# (visible boxes, batch, row index) -> (caption, caption log-probability, detect log-probability, embedding)
Describe = Callable[[list[tuple[Any, ...]], dict[str, np.ndarray], int], tuple[str, float, float, np.ndarray]]


def oracle_stage(truth: list[dict[str, Any]], describe: Describe | None = None) -> type:
    """A model-stage class that answers every tile's detection question from ground truth records.

    Args:
        truth: ``ground_truth.parquet`` rows (``collection``, ``scene_id``, ``label``, ``pixel_box``).
        describe: Optional function giving a tile's caption, log-probabilities and embedding from its visible boxes
            ``(label, x1, y1, x2, y2)`` in tile pixels; by default the caption is ``oracle``, log-probabilities 0 and
            the embedding the tile's index in its batch. Define it inside a function so Ray pickles it by value.

    Returns:
        A callable class with :class:`pipelines.archive.stages.ModelStage`'s constructor keywords and output columns;
        defined in this function so Ray pickles it by value.
    """
    by_scene: dict[str, list[tuple[str, list[float]]]] = {}
    for rec in truth:
        by_scene.setdefault(f"{rec['collection']}/{rec['scene_id']}", []).append((rec["label"], rec["pixel_box"]))

    def plain(visible: list[tuple[Any, ...]], batch: dict[str, np.ndarray], i: int) -> tuple[str, float, float, Any]:
        return "oracle", 0.0, 0.0, np.full(4, float(i), np.float32)

    tell = describe or plain

    class OracleStage:
        needs = ("scene_key", "status", "row_off", "col_off", "win_h", "win_w", "sensor")

        def __init__(self, **_: Any) -> None:
            import os
            import time
            import uuid

            self.truth = by_scene
            self.actor_id = f"oracle-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.ready_at = time.time()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            n = len(batch["scene_key"])
            answers, captions, caption_lp, detect_lp, embeddings = [], [], [], [], []
            for i in range(n):
                r0, c0, h, w = (int(batch[k][i]) for k in ("row_off", "col_off", "win_h", "win_w"))
                visible = []
                for label, (x1, y1, x2, y2) in self.truth.get(str(batch["scene_key"][i]), []):
                    box = (max(x1, c0) - c0, max(y1, r0) - r0, min(x2, c0 + w) - c0, min(y2, r0 + h) - r0)
                    if box[2] > box[0] and box[3] > box[1]:
                        visible.append((label, *box))
                ok = batch["status"][i] == "ok"
                caption, lp_caption, lp_detect, emb = tell(visible, batch, i)
                answers.append(format_answer("detect", visible, (h, w)) if ok else "")
                captions.append(caption if ok else "")
                caption_lp.append(lp_caption)
                detect_lp.append(lp_detect)
                embeddings.append(np.asarray(emb, np.float32).tobytes() if ok else b"")
            out = {k: v for k, v in batch.items() if k != "image"}
            out["answer_caption"] = np.array(captions, dtype=object)
            out["logprob_caption"] = np.array(caption_lp, np.float32)
            out["answer_detect"] = np.array(answers, dtype=object)
            out["logprob_detect"] = np.array(detect_lp, np.float32)
            out["vqa_json"] = np.array(["[]"] * n, dtype=object)
            col = np.empty(n, dtype=object)
            col[:] = embeddings
            out["embedding"] = col
            out["tokens_detect"] = np.array([""] * n, dtype=object)  # no tokens: each box gets its tile's confidence
            out["actor_id"] = np.array([self.actor_id] * n, dtype=object)
            out["model_loads"] = np.ones(n, np.int32)
            out["actor_ready_at"] = np.full(n, self.ready_at, np.float64)
            return out

    return OracleStage
