"""benchmarks/cow.py: a short run on a real S3 server prints its table and a last JSON line; the probed
copy-on-write rewrites the same file as whole reads (checked by the script) and reads fewer bytes."""

from __future__ import annotations

import json

import pytest

from pipelines.archive import ledger
from pipelines.archive.store import OutputStore
from tests.benchmarks import load_script

pytestmark = pytest.mark.integration


def test_short_run_prints_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    before = (OutputStore.read_bytes, ledger._Ranges.read, ledger.WHOLE_READ_BYTES)
    bench = load_script("cow")
    assert bench.main(["--files", "3", "--mib", "1.5", "--latency-ms", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "whole" in "\n".join(out[:-1]) and "probed" in "\n".join(out[:-1])
    whole, probed = summary["bytes_read"]
    assert probed < whole * 0.6, summary  # the holder read whole, two footers and id columns instead of two files
    assert (OutputStore.read_bytes, ledger._Ranges.read, ledger.WHOLE_READ_BYTES) == before  # restored
