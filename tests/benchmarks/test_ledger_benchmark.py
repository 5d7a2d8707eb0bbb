"""benchmarks/ledger.py: a short run on a real S3 server prints its table and a last JSON line; the quiet night's
lookup of the newest ids reads fewer bytes than the whole index (ids that start with the date or not), a night's
compaction fewer than a rewrite."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks import load_script

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("ids", ["sentinel-2", "landsat"])
def test_short_run_prints_the_figures(ids: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.archive import ledger

    monkeypatch.setattr(ledger, "ROW_GROUP_ROWS", 1_000)  # 20 row groups at this size, as 10^6 scenes make 16
    bench = load_script("ledger")
    assert bench.main(["--scenes", "20000", "--page", "10", "--night-units", "3", "--repeats", "1", "--ids", ids]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "quiet night, newest date" in "\n".join(out[:-1])
    assert summary["lookup_mb"][1] < summary["lookup_mb"][0] / 4  # two or three row groups of twenty
    assert summary["spread_lookup_bytes_ratio"] > 2 * summary["lookup_bytes_ratio"]  # ids over the year: more groups
    assert summary["compaction_bytes_ratio"] < 0.5
