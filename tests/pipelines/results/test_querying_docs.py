"""docs/querying.md: ten questions, each answered by one command or at most five lines of Python, each run here as
written against toy-world outputs placed where the page says (``demo-out/outputs``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "querying.md"


def _questions() -> list[tuple[str, str, str]]:
    text = DOC.read_text()
    section = text.split("## Ten questions", 1)[1].split("\n## ", 1)[0]
    found = []
    for block in section.split("\n### ")[1:]:
        title = block.splitlines()[0]
        (lang, code), = re.findall(r"```(sh|python)\n(.*?)```", block, flags=re.S)
        found.append((title, lang, code))
    return found


def test_there_are_ten_short_answers():
    questions = _questions()
    assert len(questions) == 10
    for title, lang, code in questions:
        lines = code.strip().splitlines()
        assert (lang == "sh" and len(lines) == 1) or (lang == "python" and len(lines) <= 5), title


@pytest.fixture(scope="module")
def workdir(toy_outputs, tmp_path_factory) -> Path:
    """A folder with ``demo-out/outputs`` and an ``earthgpt`` on PATH that runs this checkout."""
    work = tmp_path_factory.mktemp("docs")
    (work / "demo-out").mkdir()
    (work / "demo-out" / "outputs").symlink_to(toy_outputs.root)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "earthgpt"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m pipelines.cli \"$@\"\n")
    shim.chmod(0o755)
    return work


@pytest.mark.parametrize("index", range(10), ids=lambda i: f"q{i + 1}")
def test_each_answer_runs_as_written(workdir, index):
    title, lang, code = _questions()[index]
    env = {**os.environ, "PATH": f"{workdir / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "MPLBACKEND": "Agg"}
    argv = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{title}\n{done.stdout}\n{done.stderr}"
    produced = [p for p in ("report.html", "ships.geojson", "confident.geojson", "tile.png") if p in code]
    if produced:
        path = workdir / produced[0]
        assert path.stat().st_size > 0, title
        if path.suffix == ".geojson":
            features = json.loads(path.read_text())["features"]
            assert features, f"{title}: no features"
    else:
        rows = [line for line in done.stdout.splitlines() if line.strip()]
        assert len(rows) >= 3, f"{title}: too little output\n{done.stdout}"
