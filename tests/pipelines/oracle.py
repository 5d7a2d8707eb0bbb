"""A perfect model stage for end-to-end tests: it answers every tile from the toy world's ground truth."""

from __future__ import annotations

from typing import Any

import numpy as np

from earthgpt.tasks import format_answer


def oracle_stage(truth: list[dict[str, Any]]) -> type:
    """A model-stage class that answers every tile's detection question from ground truth records.

    Args:
        truth: ``ground_truth.parquet`` rows (``collection``, ``scene_id``, ``label``, ``pixel_box``).

    Returns:
        A callable class with :class:`pipelines.archive.stages.ModelStage`'s constructor keywords and output columns;
        defined in this function so Ray pickles it by value.
    """
    by_scene: dict[str, list[tuple[str, list[float]]]] = {}
    for rec in truth:
        by_scene.setdefault(f"{rec['collection']}/{rec['scene_id']}", []).append((rec["label"], rec["pixel_box"]))

    class OracleStage:
        needs = ("scene_key", "status", "row_off", "col_off", "win_h", "win_w")

        def __init__(self, **_: Any) -> None:
            import os
            import uuid

            self.truth = by_scene
            self.actor_id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
            self.ready_at = __import__("time").time()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            n = len(batch["scene_key"])
            answers, embeddings = [], []
            for i in range(n):
                r0, c0, h, w = (int(batch[k][i]) for k in ("row_off", "col_off", "win_h", "win_w"))
                visible = []
                for label, (x1, y1, x2, y2) in self.truth.get(str(batch["scene_key"][i]), []):
                    box = (max(x1, c0) - c0, max(y1, r0) - r0, min(x2, c0 + w) - c0, min(y2, r0 + h) - r0)
                    if box[2] > box[0] and box[3] > box[1]:
                        visible.append((label, *box))
                ok = batch["status"][i] == "ok"
                answers.append(format_answer("detect", visible, (h, w)) if ok else "")
                embeddings.append(np.full(4, float(i), np.float32).tobytes() if ok else b"")
            out = {k: v for k, v in batch.items() if k != "image"}
            out["answer_caption"] = np.array(["oracle"] * n, dtype=object)
            out["logprob_caption"] = np.zeros(n, np.float32)
            out["answer_detect"] = np.array(answers, dtype=object)
            out["logprob_detect"] = np.zeros(n, np.float32)
            out["vqa_json"] = np.array(["[]"] * n, dtype=object)
            emb = np.empty(n, dtype=object)
            emb[:] = embeddings
            out["embedding"] = emb
            out["tokens_detect"] = np.array([""] * n, dtype=object)
            out["actor_id"] = np.array([self.actor_id] * n, dtype=object)
            out["model_loads"] = np.ones(n, np.int32)
            out["actor_ready_at"] = np.full(n, self.ready_at, np.float64)
            return out

    return OracleStage
