"""The toy world: deterministic, real COGs in several UTM zones, exact ground truth, chips through the recipe."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import CRS
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from catalogs.io import SceneReader
from catalogs.scene import Scene
from catalogs.toyworld import (
    CLASS_NAMES,
    LABELS,
    chip_caption,
    coarse_position,
    generate_toyworld,
    make_scene,
    region_caption,
)


def test_six_scenes_in_under_a_minute(tmp_path: Path) -> None:
    start = time.perf_counter()
    world = generate_toyworld(tmp_path / "w", scenes=6, seed=3, chips_per_scene=400, preview=True)
    seconds = time.perf_counter() - start
    print(f"\ntoy world, 6 scenes, {world.n_chips} chips, {world.n_objects} objects: {seconds:.2f} s "
          f"({ {k: round(v, 2) for k, v in world.timings.items()} })")
    assert seconds < 60
    assert len(world.scene_ids) == 6 and world.n_chips == 3 * 400 + 3 * 100  # one val scene per sensor
    assert world.preview_path is not None
    preview = Image.open(world.preview_path)
    assert preview.mode == "RGB" and preview.width > 3 * 64


def test_same_seed_same_archive(tmp_path: Path) -> None:
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for rel in ("stac/items.ndjson", "annotations.jsonl"):
            h.update((root / rel).read_bytes().replace(str(root).encode(), b""))
        for path in sorted((root / "cogs").glob("*.tif")):
            with rasterio.open(path) as ds:
                h.update(ds.read().tobytes())
        return h.hexdigest()

    a = generate_toyworld(tmp_path / "a", scenes=3, seed=11, chips_per_scene=8)
    b = generate_toyworld(tmp_path / "b", scenes=3, seed=11, chips_per_scene=8)
    c = generate_toyworld(tmp_path / "c", scenes=3, seed=12, chips_per_scene=8)
    assert digest(a.root) == digest(b.root)
    assert digest(a.root) != digest(c.root)


def test_cogs_are_valid_and_in_several_utm_zones(toyworld, toy_items) -> None:  # noqa: ANN001
    crs = set()
    for path in sorted((toyworld.root / "cogs").glob("*.tif")):
        valid, errors, _ = cog_validate(str(path), quiet=True)
        assert valid, (path.name, errors)
        with rasterio.open(path) as ds:
            assert ds.block_shapes[0] == (128, 128) and ds.overviews(1)
            assert 384 <= ds.height <= 512 and ds.height == ds.width
            crs.add(ds.crs.to_epsg())
    assert all(CRS.from_epsg(c).utm_zone for c in crs)
    assert len({CRS.from_epsg(c).utm_zone for c in crs}) >= 2
    assert any(c // 100 == 327 for c in crs), "one scene in the southern hemisphere"
    by_coll = Counter(i["collection"] for i in toy_items)
    assert by_coll == {"toyworld-optical": 2, "toyworld-sar": 2, "toyworld-thermal": 2}


def test_items_carry_extensions_and_timestamps(toy_items) -> None:  # noqa: ANN001
    for item in toy_items:
        props = item["properties"]
        assert props["created"] and props["updated"]
        assert props["proj:code"].startswith("EPSG:32") and len(props["proj:transform"]) >= 6
        exts = " ".join(item["stac_extensions"])
        assert "projection" in exts and "raster" in exts
        if item["collection"] == "toyworld-sar":
            assert "sar" in exts and props["sar:polarizations"] == ["VV", "VH"]
            assert set(item["assets"]) == {"vv", "vh"}
            assert item["assets"]["vv"]["raster:bands"][0]["data_type"] == "float32"
        else:
            assert "eo" in exts and "eo:cloud_cover" in props
        if item["collection"] == "toyworld-optical":
            assert set(item["assets"]) == {"red", "green", "blue", "nir"}
            assert item["assets"]["red"]["raster:bands"][0]["scale"] == pytest.approx(1e-4)
        if item["collection"] == "toyworld-thermal":
            rb = item["assets"]["lwir11"]["raster:bands"][0]
            assert (rb["scale"], rb["offset"], rb["data_type"]) == (pytest.approx(0.00341802), 149.0, "uint16")
    clouds = sorted(i["properties"]["eo:cloud_cover"] for i in toy_items if "eo:cloud_cover" in i["properties"])
    assert sum(c < 20 for c in clouds) == 2 and sum(c >= 20 for c in clouds) == 2


def test_ground_truth_geoparquet(toyworld, toy_items) -> None:  # noqa: ANN001
    import geopandas as gpd
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(toyworld.ground_truth_path).metadata[b"geo"])
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry"
    gt = gpd.read_parquet(toyworld.ground_truth_path)
    assert gt.crs.to_epsg() == 4326
    assert len(gt) == toyworld.n_objects > 20
    assert set(gt["label"]) <= set(LABELS) and {"ship", "vehicle"} <= set(gt["label"])
    footprints = {i["id"]: shape(i["geometry"]) for i in toy_items}
    for row in gt.itertuples():
        x1, y1, x2, y2 = row.pixel_box
        assert 6 <= x2 - x1 <= 20 and 6 <= y2 - y1 <= 20
        assert footprints[row.scene_id].buffer(1e-6).contains(row.geometry)
        cx1, cy1, cx2, cy2 = row.crs_box
        assert cx2 > cx1 and cy2 > cy1
    per_scene = gt.groupby("scene_id").size()
    assert per_scene.min() >= 1


def test_planted_objects_stand_out_in_the_recipe_output(toyworld, toy_items) -> None:  # noqa: ANN001
    import geopandas as gpd

    gt = gpd.read_parquet(toyworld.ground_truth_path)
    for item in toy_items:
        scene = Scene.from_item(item, href_policy=toyworld.href_policy())
        with SceneReader(scene) as reader:
            image = reader.read(rasterio.windows.Window(0, 0, *reversed(reader.shape))).image
        lum = image.mean(axis=0)
        contrasts = []
        for row in gt[gt.scene_id == scene.id].itertuples():
            x1, y1, x2, y2 = row.pixel_box
            inside = lum[y1:y2, x1:x2].max()
            ring = np.concatenate([lum[max(0, y1 - 4):y1, x1:x2].ravel(), lum[y2:y2 + 4, x1:x2].ravel()])
            if ring.size:
                contrasts.append(inside - np.median(ring))
        assert np.median(contrasts) > 0.3, (scene.id, np.median(contrasts))


def test_chips_and_annotations(toyworld) -> None:  # noqa: ANN001
    records = [json.loads(line) for line in toyworld.annotations_path.read_text().splitlines()]
    assert len(records) == toyworld.n_chips
    splits: dict[str, set[str]] = {}
    for rec in records[:: max(1, len(records) // 40)]:
        img = Image.open(toyworld.root / rec["image"])
        assert img.mode == "RGB" and img.size == (64, 64) and rec["size"] == [64, 64]
    for rec in records:
        assert rec["sensor"] in ("optical", "sar", "thermal") and rec["scene_class"] in CLASS_NAMES
        splits.setdefault(rec["scene_id"], set()).add(rec["split"])
        for obj in rec["objects"]:
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        ys = [(o["box"][1], o["box"][0]) for o in rec["objects"]]
        assert ys == sorted(ys)
    assert all(len(s) == 1 for s in splits.values()), "whole scenes are held out"
    val_scenes = {sid for sid, s in splits.items() if s == {"val"}}
    assert len(val_scenes) == 3  # the last scene of each sensor
    assert sum(1 for r in records if r["objects"]) > len(records) // 2  # positives-rich sampling


def test_chip_pixels_match_scene_pixels(toyworld, toy_items) -> None:  # noqa: ANN001
    """Chips are cut from the pipeline's recipe output: a chip equals the same window read by SceneReader."""
    records = [json.loads(line) for line in toyworld.annotations_path.read_text().splitlines()]
    items = {i["id"]: i for i in toy_items}
    for rec in [r for r in records if r["objects"]][:6]:
        scene = Scene.from_item(items[rec["scene_id"]], href_policy=toyworld.href_policy())
        x, y, w, h = rec["window"]
        with SceneReader(scene) as reader:
            tile = reader.read(rasterio.windows.Window(x, y, w, h))
        expected = np.rint(tile.image * 255).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(np.asarray(Image.open(toyworld.root / rec["image"])), expected)


def test_sar_speckle_and_value_ranges() -> None:
    sar = make_scene(1, seed=5, n_sensor_index=0)
    assert sar.sensor == "sar"
    vv = sar.bands["vv"][~sar.nodata]
    assert vv.dtype == np.float32 and (vv > 0).all()
    db = 10 * np.log10(vv)
    assert np.percentile(db, 5) < -20 and np.percentile(db, 99.9) > -3
    optical = make_scene(0, seed=5, n_sensor_index=0)
    assert optical.bands["red"].dtype == np.uint16
    assert optical.bands["red"][optical.nodata].max(initial=0) == 0


def test_chip_caption_reads_the_truth() -> None:
    rng = np.random.default_rng(0)
    ships = [("ship", [2, 2, 14, 9]), ("ship", [12, 10, 20, 19])]
    captions = {chip_caption("sar", "open sea", ships, 64, rng) for _ in range(40)}
    assert "A SAR image of open sea with two ships in the upper left." in captions
    assert len(captions) >= 3  # several wordings
    for text in captions:
        assert text[0].isupper() and text.endswith(".") and text.count(".") == 1
        assert "SAR image" in text and "open sea" in text.lower() and "two ships in the upper left" in text
    mixed = chip_caption("optical", "harbor", [("ship", [2, 50, 14, 60]), ("building", [40, 2, 50, 12])], 64, rng)
    assert "a building in the upper right and a ship in the lower left" in mixed
    spread = chip_caption("optical", "residential",
                          [("building", [2, 2, 9, 9]), ("building", [30, 30, 36, 36]), ("building", [50, 50, 60, 60])],
                          64, rng)  # fmt: skip
    assert "three buildings spread across the image" in spread
    for _ in range(10):
        empty = chip_caption("thermal", "farmland", [], 64, rng)
        assert "infrared image" in empty and "farmland" in empty.lower()
        assert "no objects" in empty or "without any objects" in empty
    with pytest.raises(ValueError, match="scene_class"):
        chip_caption("sar", "forest", [], 64, rng)


def test_coarse_positions_and_region_captions() -> None:
    assert coarse_position([0, 0, 10, 10], 64) == "upper left"
    assert coarse_position([27, 27, 37, 37], 64) == "centre"
    assert coarse_position([50, 27, 60, 37], 64) == "right"
    assert coarse_position([27, 54, 37, 64], 64) == "bottom"
    rng = np.random.default_rng(1)
    texts = {region_caption("ship", [44, 44, 64, 52], 64, rng) for _ in range(30)}
    assert len(texts) >= 2
    assert all("large ship" in t and "lower right" in t and t.endswith(".") for t in texts)
    assert all("small building" in region_caption("building", [0, 0, 6, 6], 64, rng) for _ in range(5))


def test_annotations_carry_captions_and_the_mmrs_files_hold_them(toyworld, tmp_path: Path) -> None:  # noqa: ANN001
    from pipelines.mmrs import write_mmrs

    records = [json.loads(line) for line in toyworld.annotations_path.read_text().splitlines()]
    for rec in records:
        assert rec["caption"].endswith(".") and len(rec["caption"].split()) >= 6
        for obj in rec["objects"]:
            assert obj["caption"].endswith(".") and obj["label"] in obj["caption"]
    written = write_mmrs(toyworld.root, tmp_path, tags=("cap", "region_cap"))
    caps = json.loads(written["cap_train"].read_text()) + json.loads(written["cap_val"].read_text())
    assert len(caps) == len(records) and {r["task"] for r in caps} == {"caption"}
    assert caps[0]["conversations"][0]["value"].startswith("<image>\nDescribe this")
    regions = json.loads(written["region_cap_train"].read_text())
    assert {r["task"] for r in regions} == {"region_caption"}
    assert sum(len(r["objects"]) for r in records if r["split"] == "train") == len(regions)
    assert all("[" in r["conversations"][0]["value"] for r in regions)  # the object's box is in the question
