"""benchmarks/fold.py: a short run on a real S3 server prints its table and a last JSON line; the folded prefix
answers the same queries (checked by the script) from one file per table and partition, with fewer requests."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.integration


def test_short_run_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("fold")
    assert bench.main(["--units", "4", "--tiles", "3", "--latency-ms", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "committed" in "\n".join(out[:-1]) and "folded" in "\n".join(out[:-1])
    assert summary["files"] == 4 * 3 * 2 and summary["folded_files"] == 3 * 2  # 3 tables x 2 dates
    for query in ("sql", "area"):
        committed, folded = summary[f"{query}_requests"]
        assert folded < committed, summary
