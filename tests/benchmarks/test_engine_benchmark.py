"""benchmarks/engine.py: one short run prints its table and a last JSON line with the issue's figures; a batch that
fails still leaves the figures measured before it, and the command fails."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("engine")


ARGS = ["--models", "tiny", "--batches", "2,3", "--repeats", "1", "--new-tokens", "6", "--init-std", "0.5",
        "--threads", "1"]


def _summary(capsys: pytest.CaptureFixture[str]) -> tuple[str, dict[str, Any]]:
    out = capsys.readouterr().out.strip().splitlines()
    return "\n".join(out[:-1]), json.loads(out[-1])


def test_table_then_one_json_line(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*ARGS, "--static-shapes"]) == 0
    table, summary = _summary(capsys)
    assert "baseline" in table and "static" in table and "shapes" in table
    for key in ("prefill_efficiency", "decode_efficiency", "tiles_per_s", "speedup_vs_baseline"):
        assert summary[key] > 0, key
    assert summary["identical_greedy"] is True and summary["shapes_identical_greedy"] is True
    assert summary["same_up_to_ties"] is True and summary["rows"][0]["tie_gaps"] == []
    assert [r["tiles"] for r in summary["rows"]] == [2, 3] and summary["errors"] == []
    row = summary["rows"][-1]
    assert row["static"]["prefill_tokens"] < row["static"]["baseline_prefill_tokens"]  # the shared prefix
    assert row["shapes"]["batch_plan"]["static_shapes"] is True


def test_a_failing_batch_keeps_the_earlier_figures(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = bench.run_batch
    calls = []

    def failing_second(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_batch", failing_second)
    assert bench.main(ARGS) == 1
    _, summary = _summary(capsys)
    assert [r["tiles"] for r in summary["rows"]] == [2]
    assert summary["errors"] == ["tiny x3: RuntimeError: CUDA error: an illegal memory access was encountered"]


def test_a_wrong_token_is_not_called_a_near_tie(bench: ModuleType) -> None:
    """The near-tie check of differing answers: a decoder that picks a token the baseline finds whole nats less likely
    is flagged, and the rounding noise it is judged against comes from the baseline model alone (float32: tiny)."""
    import dataclasses

    import torch

    model, processor = bench.load("tiny", torch.device("cpu"), torch.float32, 0, 0.5)
    engine = bench.InferenceEngine(model, processor, dtype=torch.float32, device="cpu", decoding="baseline")
    work = bench.workload(processor, 2, 0)
    images, prompts, index = work
    base = engine.generate(images, prompts, max_new_tokens=6, image_index=index)

    same = bench.compare(engine, work, base, base)
    assert same["identical_greedy"] and same["same_up_to_ties"] and same["tie_gaps"] == []

    # row 1 takes, at its third token, the token the baseline finds least likely there
    a = base[1]
    ids = processor.encode_prompt(prompts[1]) + a.token_ids[:2]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), image_features=engine.encode_images([images[index[1]]]),
                       image_index=torch.zeros(1, dtype=torch.long)).logits[0, -1]
    worst = int(logits.argmin())
    wrong = [*base]
    wrong[1] = dataclasses.replace(a, token_ids=[*a.token_ids[:2], worst, *a.token_ids[3:]])
    found = bench.compare(engine, work, base, wrong)
    assert not found["identical_greedy"] and found["first_difference"] == [2]
    assert found["tie_gaps"][0] > 1.0  # nats
    assert found["rounding_noise"] < 1e-3  # float32: the baseline computed twice agrees closely
    assert found["same_up_to_ties"] is False


def test_a_failing_graphs_decoder_is_dropped_and_the_batch_timed_again(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the graphs decoder's own failure is retried without it (outside the except block, so the failure's
    tensors are freed first); the run goes on and exits 0, the failure listed."""
    real = bench.run_batch
    calls = []

    def graphs_fail_once(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(args[2])
        if len(calls) == 1:
            raise bench.GraphsFailed("RuntimeError: operation not permitted when stream is capturing")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_batch", graphs_fail_once)
    assert bench.main(ARGS) == 0
    _, summary = _summary(capsys)
    assert calls == [2, 2, 3] and [r["tiles"] for r in summary["rows"]] == [2, 3]
    assert summary["errors"] == ["tiny x2: cuda graphs: RuntimeError: operation not permitted when stream is capturing"]


def test_the_baseline_runs_in_calls_that_fit(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's engine plans no memory: a batch it cannot hold is run in halves (whole tiles per call) until it fits,
    with the same answers as one call."""
    import torch

    model, processor = bench.load("tiny", torch.device("cpu"), torch.float32, 0, 0.5)
    engine = bench.InferenceEngine(model, processor, dtype=torch.float32, device="cpu", decoding="baseline")
    images, prompts, index = bench.workload(processor, 5, 0)
    whole = engine.generate(images, prompts, max_new_tokens=4, image_index=index)
    real = engine.generate

    def small_device(images: list[Any], prompts: list[str], **kwargs: Any) -> Any:
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 39.00 GiB")
        return real(images, prompts, **kwargs)

    monkeypatch.setattr(engine, "generate", small_device)
    baseline = bench._Baseline(engine, 5)
    got = baseline.generate(images, prompts, index, 4)
    assert baseline.tiles_per_call == 2
    assert [g.token_ids for g in got] == [g.token_ids for g in whole]
