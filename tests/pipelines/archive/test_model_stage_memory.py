"""The model stage halves a batch that runs out of memory and retries it: every tile is answered, as without the
error, and each row says what was planned. No GPU here: the out-of-memory error is injected where a GPU raises it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.archive.stages import ModelStage

ERRORS = ("error_stage", "error_type", "error_message", "error_asset", "error_href")


def _tiles(n: int, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = np.empty(n, dtype=object)
    images[:] = [rng.random((3, size, size), dtype=np.float32).tobytes() for _ in range(n)]
    status = np.array(["ok"] * n, dtype=object)
    status[2] = "skipped"  # passed through, never sent to the model
    batch = {
        "tile_id": np.arange(n),
        "status": status,
        "sensor": np.array(["optical", "sar", "thermal"] * n, dtype=object)[:n],
        "image": images,
        "image_h": np.full(n, size),
        "image_w": np.full(n, size),
    }
    batch.update({c: np.array([""] * n, dtype=object) for c in ERRORS})
    return batch


def _stage() -> ModelStage:
    return ModelStage("tiny", tasks=["caption", "detect"], max_new_tokens=5)


def _answers(out: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    return list(zip(out["answer_caption"], out["answer_detect"], strict=True))


def _same_embeddings(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    # the encoders run on other batch shapes: equal up to float rounding
    for x, y in zip(a["embedding"], b["embedding"], strict=True):
        assert len(x) == len(y)
        np.testing.assert_allclose(np.frombuffer(x, np.float32), np.frombuffer(y, np.float32), atol=1e-5)


def test_out_of_memory_halves_the_tile_batch_and_loses_no_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _tiles(7)
    expected = _stage()(dict(batch))
    plan = json.loads(expected["batch_plan"][0])
    assert plan["decoding"] == "static" and plan["decode_batch"] >= 1 and plan["prefill_batch"] >= 1
    assert plan["tile_batch"] is None and plan["tile_oom_halvings"] == 0

    stage = _stage()
    real = stage.engine.encode_images
    calls: list[int] = []

    def small_device(images: list[np.ndarray]) -> torch.Tensor:
        calls.append(len(images))
        if len(images) > 2:  # what a GPU does when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(images)

    monkeypatch.setattr(stage.engine, "encode_images", small_device)
    out = stage(dict(batch))
    assert list(out["status"]) == list(expected["status"])  # nothing failed; the skipped tile stays skipped
    assert _answers(out) == _answers(expected)  # the same answers, tile by tile
    _same_embeddings(out, expected)
    assert calls == [6, 3] + [1] * 6  # 6 ok tiles; halved to 3 (too many again), then to 1
    plan = json.loads(out["batch_plan"][0])
    assert plan["tile_batch"] == 1 and plan["tile_oom_halvings"] == 2
    # the next batch starts at the smaller size: no new out-of-memory error
    calls.clear()
    again = stage(dict(batch))
    assert _answers(again) == _answers(expected) and max(calls) == 1
    assert json.loads(again["batch_plan"][0])["tile_oom_halvings"] == 2


def test_a_single_tile_that_does_not_fit_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage()

    def no_device(images: list[np.ndarray]) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(stage.engine, "encode_images", no_device)
    out = stage(_tiles(4))
    ok = [i for i in range(4) if i != 2]
    assert [out["status"][i] for i in ok] == ["failed"] * 3 and out["status"][2] == "skipped"
    assert {out["error_type"][i] for i in ok} == {"ModelError"}  # the model category; the cause in the message
    assert all(out["error_message"][i].startswith("OutOfMemoryError: ") for i in ok)
    assert {out["error_stage"][i] for i in ok} == {"model"}
    assert json.loads(out["batch_plan"][0])["tile_batch"] == 1


def test_runs_row_plan_merges_the_actors() -> None:
    from pipelines.archive.job import _merged_plan
    from pipelines.archive.store import SCHEMAS

    a = json.dumps({"decoding": "static", "decode_batch": 64, "prefill_batch": 16, "oom_halvings": 0,
                    "tile_batch": None, "tile_oom_halvings": 0})  # fmt: skip
    b = json.dumps({"decoding": "static", "decode_batch": 32, "prefill_batch": 8, "oom_halvings": 1,
                    "tile_batch": 4, "tile_oom_halvings": 2})  # fmt: skip
    merged = json.loads(_merged_plan([a, b]) or "")
    assert merged["decode_batch"] == 32 and merged["tile_batch"] == 4  # the smallest batches
    assert merged["oom_halvings"] == 1 and merged["tile_oom_halvings"] == 2 and merged["actors"] == 2
    assert _merged_plan([]) is None
    assert "batch_plan" in SCHEMAS["runs"].names
