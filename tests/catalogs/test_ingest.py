"""Ingest: STAC items for folders and S3 prefixes of COGs; NDJSON + collection; load into pgstac."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rasterio.windows import Window

from catalogs.errors import CorruptRaster
from catalogs.hrefs import HrefPolicy
from catalogs.ingest import group_scenes, ingest, iter_cogs, read_ndjson
from catalogs.io import SceneReader
from catalogs.recipes import recipe_for
from catalogs.scene import Scene
from catalogs.search import search_scenes


def copy_cogs(toyworld, sensor: str, dest: Path) -> Path:  # noqa: ANN001
    dest.mkdir(parents=True)
    for path in sorted((toyworld.root / "cogs").glob(f"toy-{sensor}-*.tif")):
        shutil.copy(path, dest / path.name)
    return dest


def test_group_scenes_streams_runs_of_files() -> None:
    hrefs = ["s3://b/p/a_red.tif", "s3://b/p/a_green.tif", "s3://b/p/b_vv.tif", "s3://b/p/notes.tif",
             "s3://b/q/a_red.tif"]
    groups = list(group_scenes(iter(hrefs)))
    assert [(g.scene, sorted(g.assets)) for g in groups] == [("a", ["green", "red"]), ("b", ["vv"]),
                                                             ("a", ["red"])]
    dated = list(group_scenes(["file:///x/S1_20240105_vv.tif"],
                              pattern=r"^(?P<scene>S1_(?P<date>\d{8}))_(?P<band>\w+)\.tif$"))
    assert dated[0].date == "20240105"


def test_ingest_local_folder_reproduces_the_toy_items(tmp_path: Path, toyworld, toy_items) -> None:  # noqa: ANN001
    folder = copy_cogs(toyworld, "optical", tmp_path / "archive")
    result = ingest(str(folder), tmp_path / "stac", collection="toyworld-optical")
    assert result.count == 2 and result.errors == []
    items = list(read_ndjson(result.items_path))
    collection = json.loads(result.collection_path.read_text())
    assert collection["id"] == "toyworld-optical" and collection["type"] == "Collection"
    assert collection["extent"]["spatial"]["bbox"][0][0] < collection["extent"]["spatial"]["bbox"][0][2]
    originals = {i["id"]: i for i in toy_items}
    for item in items:
        ref = originals[item["id"]]
        assert item["properties"]["datetime"] == ref["properties"]["datetime"]  # from TIFFTAG_DATETIME
        assert item["properties"]["proj:code"] == ref["properties"]["proj:code"]
        assert item["properties"]["proj:transform"] == ref["properties"]["proj:transform"]
        assert next(iter(item["assets"])) == "red"  # the reference band defines the grid
        assert item["assets"]["red"]["raster:bands"][0]["scale"] == pytest.approx(1e-4)
        assert item["assets"]["red"]["href"].startswith("file://")
        policy = HrefPolicy.for_roots(folder)
        a = Scene.from_item(item, href_policy=policy)
        b = Scene.from_item(ref, href_policy=toyworld.href_policy())
        with SceneReader(a) as ra, SceneReader(b) as rb:
            np.testing.assert_array_equal(ra.read(Window(0, 0, 96, 96)).image, rb.read(Window(0, 0, 96, 96)).image)


def test_ingest_records_bad_files_and_goes_on(tmp_path: Path, toyworld) -> None:  # noqa: ANN001
    folder = copy_cogs(toyworld, "thermal", tmp_path / "archive")
    (folder / "broken-scene_lwir11.tif").write_bytes(b"not a tiff")
    result = ingest(str(folder), tmp_path / "stac", collection="toyworld-thermal")
    assert result.count == 2
    assert [e["error_type"] for e in result.errors] == [CorruptRaster.__name__]
    assert result.errors[0]["item_id"] == "broken-scene" and result.errors[0]["stage"] == "ingest"


@pytest.mark.integration
def test_ingest_s3_prefix(tmp_path: Path, s3, toyworld, toy_items) -> None:  # noqa: ANN001
    bucket = s3.make_bucket("catalogs-ingest")
    client = s3.client()
    for path in sorted((toyworld.root / "cogs").glob("toy-sar-*.tif")):
        client.upload_file(str(path), bucket, f"archive/sar/{path.name}")
    assert list(iter_cogs(f"s3://{bucket}/archive/sar"))[0].startswith(f"s3://{bucket}/archive/sar/")
    result = ingest(f"s3://{bucket}/archive/sar", tmp_path / "stac", collection="toyworld-sar")
    assert result.count == 2 and not result.errors
    items = list(read_ndjson(result.items_path))
    assert all("sar" in " ".join(i["stac_extensions"]) for i in items)
    assert all(i["properties"]["sar:polarizations"] == ["VV", "VH"] for i in items)
    scene = Scene.from_item(items[0], href_policy=HrefPolicy.for_roots(f"s3://{bucket}/archive"))
    assert scene.bands["vv"].gdal_path.startswith(f"/vsis3/{bucket}/archive/sar/")
    with SceneReader(scene) as reader:
        assert reader.read(Window(0, 0, 64, 64), allow_empty=True).image.shape == (3, 64, 64)


@pytest.mark.integration
def test_ingest_into_pgstac_then_search(tmp_path: Path, pgstac, toyworld) -> None:  # noqa: ANN001
    folder = copy_cogs(toyworld, "thermal", tmp_path / "archive")
    recipe = recipe_for("toyworld-thermal")
    result = ingest(str(folder), tmp_path / "stac", collection="ingested-thermal", recipe=recipe,
                    pgstac_dsn=pgstac.dsn)
    assert result.count == 2
    scenes = list(search_scenes(pgstac.url, collections=["ingested-thermal"], recipes={"ingested-thermal": recipe},
                                href_policy=HrefPolicy.for_roots(folder)))
    assert sorted(s.id for s in scenes) == sorted(i["id"] for i in read_ndjson(result.items_path))
    assert all(s.sensor == "thermal" and s.bands["lwir11"].scale == pytest.approx(0.00341802) for s in scenes)
