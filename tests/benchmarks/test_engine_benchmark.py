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
