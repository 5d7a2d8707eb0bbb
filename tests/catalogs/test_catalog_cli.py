"""``earthgpt catalog toyworld``, ``ingest``, ``collections`` and ``check`` through the real console entry point."""

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


def test_collections_command_lists_every_public_collection(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["catalog", "collections"])
    assert rc == 0
    text = capsys.readouterr().out
    for cid in ("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-s2-l2a-cogs", "sentinel-1-rtc", "sentinel-1-grd",
                "landsat-c2-l2", "landsat-c2l2-st", "landsat-c2l2-sr", "example-own-optical"):
        assert f"\n{cid}  [" in "\n" + text, cid
    for source in ("Earth Search v0", "Earth Search v1", "Microsoft Planetary Computer",
                   "Copernicus Data Space Ecosystem", "USGS LandsatLook"):
        assert source in text
    assert "REFUSED" in text and "use sentinel-1-rtc" in text
    assert "lwir11 (K)" in text and "red, green, blue, nir (reflectance)" in text and "vv, vh (dB)" in text
    main(["catalog", "collections", "--json"])
    rows = json.loads(capsys.readouterr().out)
    s2 = next(r for r in rows if r["collection"] == "sentinel-2-l2a")
    assert {s["name"] for s in s2["sources"]} == {"Earth Search v1", "Microsoft Planetary Computer",
                                                  "Copernicus Data Space Ecosystem"}


@pytest.mark.integration
def test_check_command_reads_a_window_per_item(servers, rustac_server, tmp_path: Path,  # noqa: ANN001
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Two Sentinel-2 items (plain HTTPS-style and PC-signed) read; a third with a missing file is reported."""
    import copy

    from tests.catalogs.test_public_collections import CASES, publish

    items = []
    for name in ("earth-search-sentinel-2-l2a", "planetary-computer-sentinel-2-l2a"):
        item, _ = publish(name, CASES[name], servers, tmp_path)
        items.append(item)
    broken = copy.deepcopy(items[0])
    broken["id"] = "S2B_33TUL_20230709_0_L2A"
    broken["properties"]["datetime"] = "2023-07-09T10:04:19Z"
    broken["assets"]["red"]["href"] = broken["assets"]["red"]["href"].replace("B04.tif", "B04-missing.tif")
    items.append(broken)
    collection = {"type": "Collection", "stac_version": "1.0.0", "id": "sentinel-2-l2a", "description": "S2 L2A",
                  "license": "proprietary", "links": [],
                  "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                             "temporal": {"interval": [["2015-06-27T00:00:00Z", None]]}}}
    url = rustac_server([collection], items)
    rc = main(["catalog", "check", url, "--collection", "sentinel-2-l2a", "--bbox", "12", "45", "14", "46.5",
               "--limit", "5", "--window", "128", "--allow-scheme", "http"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 1  # one item failed
    assert "check: 2 of 3 items read" in out
    lines = out.splitlines()
    es = lines.index(next(line for line in lines if line.startswith("S2B_33TUL_20230704_0_L2A:")))
    assert "EPSG:32633 grid 512x512 @ 10 m" in lines[es] and "valid 100.0 %" in lines[es]
    assert lines[es + 1] == "  note: the raster is 512x512, the item's proj:shape says 10980x10980"
    assert "via vsicurl" in lines[es + 2] and "0.05 / 0.05 / 0.05 reflectance" in lines[es + 2]
    pc = next(line for line in lines if line.startswith("S2B_MSIL2A_20230704T095559_R122_T33TUL_20230704T122516:"))
    red_pc = lines[lines.index(pc) + 2]
    assert "via signed https (planetary-computer)" in red_pc and "DN*0.0001-0.1" in red_pc
    assert any(line.startswith("S2B_33TUL_20230709_0_L2A: FAILED AssetNotFound at open") for line in lines)
