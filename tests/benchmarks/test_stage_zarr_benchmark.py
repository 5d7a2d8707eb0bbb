"""benchmarks/stage_zarr.py: a short run on a real S3 server prints its table and a last JSON line; staging a scene's
Zarr group in memory takes one request a file, far fewer than through zarr's fsspec store."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.integration


def test_short_run_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("stage_zarr")
    assert bench.main(["--latency-ms", "0", "--repeats", "1", "--grid", "3x4", "--features", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "fsspec" in "\n".join(out[:-1]) and "memory" in "\n".join(out[:-1])
    assert summary["requests"]["memory"] == 16  # the group's files, one PUT each
    assert summary["requests"]["fsspec"] > 4 * summary["requests"]["memory"]
