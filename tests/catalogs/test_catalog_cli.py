"""``earthgpt catalog toyworld`` and ``earthgpt catalog ingest`` through the real console entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main


def test_toyworld_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world"
    rc = main(["catalog", "toyworld", str(out), "--scenes", "3", "--seed", "2", "--chips-per-scene", "12",
               "--preview"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 scenes" in text and "preview" in text
    for rel in ("stac/items.ndjson", "stac/collections/toyworld-optical.json", "stac/collections/toyworld-sar.json",
                "stac/collections/toyworld-thermal.json", "ground_truth.parquet", "annotations.jsonl",
                "preview.png"):
        assert (out / rel).exists(), rel
    assert len((out / "stac/items.ndjson").read_text().splitlines()) == 3
    det = json.loads((out / "mmrs" / "toyworld_det_train.json").read_text())
    assert det and det[0]["conversations"][0]["value"].startswith("<image>")
    assert (out / det[0]["image"]).exists()


def test_ingest_command(tmp_path: Path, toyworld, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    archive = tmp_path / "archive"
    archive.mkdir()
    for path in (toyworld.root / "cogs").glob("toy-sar-*.tif"):
        shutil.copy(path, archive / path.name)
    rc = main(["catalog", "ingest", str(archive), "--collection", "toyworld-sar", "--out", str(tmp_path / "stac")])
    assert rc == 0
    assert "2 items" in capsys.readouterr().out
    items = [json.loads(line) for line in (tmp_path / "stac" / "items.ndjson").read_text().splitlines()]
    assert {i["collection"] for i in items} == {"toyworld-sar"}
    assert json.loads((tmp_path / "stac" / "collection.json").read_text())["id"] == "toyworld-sar"


def test_ingest_needs_a_sensor_for_unknown_collections(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sensor"):
        main(["catalog", "ingest", str(tmp_path), "--collection", "nobody-knows", "--out", str(tmp_path / "o")])
