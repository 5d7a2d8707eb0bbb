"""Items in the exact shapes public catalogs publish become the right scenes and recipes."""

from __future__ import annotations

import copy
import datetime as dt

import numpy as np
import pytest

from catalogs.errors import HrefNotAllowed, MissingAsset, NoGeoreference, UnknownCollection
from catalogs.hrefs import HrefPolicy
from catalogs.recipes import recipe_for
from catalogs.scene import Scene
from tests.catalogs.conftest import fixture_item

REMOTE = HrefPolicy(allowed_schemes=frozenset({"https", "s3"}))


def test_earth_search_sentinel2_l2a() -> None:
    scene = Scene.from_item(fixture_item("earth-search-sentinel-2-l2a"), href_policy=REMOTE)
    assert scene.id == "S2B_33TUL_20230704_0_L2A"
    assert scene.collection == "sentinel-2-l2a"
    assert scene.sensor == "optical"
    assert scene.crs == "EPSG:32633"
    assert scene.shape == (10980, 10980)
    assert scene.transform == (10.0, 0.0, 300000.0, 0.0, -10.0, 5100000.0)
    assert scene.datetime == dt.datetime(2023, 7, 4, 10, 4, 19, 254000, tzinfo=dt.timezone.utc)
    assert scene.updated == dt.datetime(2023, 7, 4, 15, 36, 27, 802000, tzinfo=dt.timezone.utc)
    assert scene.cloud_cover == pytest.approx(12.478953)
    assert set(scene.bands) == {"red", "green", "blue", "nir", "nir08", "swir22"}
    red = scene.bands["red"]
    assert red.key == "red" and red.href.endswith("/B04.tif")
    # the item's raster:bands (processing baseline 05.09: offset -0.1) win over the recipe default
    assert (red.scale, red.offset, red.nodata) == (0.0001, -0.1, 0.0)
    assert red.gdal_path.startswith("/vsicurl/https://sentinel-cogs.s3.us-west-2.amazonaws.com/")
    assert [c.band for c in scene.recipe.channels] == ["red", "green", "blue"]
    assert scene.recipe.stretch.method == "percentile"


def test_planetary_computer_sentinel1_rtc() -> None:
    scene = Scene.from_item(fixture_item("planetary-computer-sentinel-1-rtc"), href_policy=REMOTE)
    assert scene.sensor == "sar"
    assert scene.crs == "EPSG:32631"
    assert scene.shape == (22354, 21699)
    # a 9-term proj:transform is cut to the 6 affine terms
    assert scene.transform == (10.0, 0.0, 585880.0, 0.0, -10.0, 5930910.0)
    assert set(scene.bands) == {"vv", "vh"}
    assert scene.bands["vv"].nodata == -32768.0
    assert scene.bands["vv"].scale == 1.0  # no scale in the item, none in the recipe
    assert scene.cloud_cover is None
    recipe = scene.recipe
    assert recipe.stretch.method == "fixed"
    assert recipe.channels[2].band == "vv" and recipe.channels[2].minus == "vh"


def test_planetary_computer_landsat_c2_l2() -> None:
    scene = Scene.from_item(fixture_item("planetary-computer-landsat-c2-l2"), href_policy=REMOTE)
    assert scene.sensor == "thermal"
    assert scene.crs == "EPSG:32612"
    assert scene.shape == (7821, 7701)
    # lwir11 feeds the channels; the item's surface-reflectance `red` is kept as an optional band with its own scale
    assert set(scene.bands) == {"lwir11", "red"}
    assert (scene.bands["red"].scale, scene.bands["red"].offset) == (0.0000275, -0.2)
    lwir = scene.bands["lwir11"]
    assert lwir.href.endswith("_ST_B10.TIF")
    assert (lwir.scale, lwir.offset, lwir.nodata) == (0.00341802, 149.0, 0.0)
    assert scene.cloud_cover == pytest.approx(0.47)
    assert [c.band for c in scene.recipe.channels] == ["lwir11"] * 3


def test_recipes_decode_published_units() -> None:
    """Each fixture's recipe turns the catalog's DN into the physical values the catalog documents."""
    s2 = Scene.from_item(fixture_item("earth-search-sentinel-2-l2a"), href_policy=REMOTE)
    b = s2.bands["red"]
    values, valid = s2.recipe.decode("red", np.array([0, 1000, 3000], np.uint16), scale=b.scale, offset=b.offset,
                                     nodata=b.nodata)
    np.testing.assert_allclose(values[1:], [0.0, 0.2], atol=1e-6)
    assert valid.tolist() == [False, True, True]

    s1 = Scene.from_item(fixture_item("planetary-computer-sentinel-1-rtc"), href_policy=REMOTE)
    b = s1.bands["vv"]
    values, valid = s1.recipe.decode("vv", np.array([0.1, 1.0, -32768.0, np.nan], np.float32), scale=b.scale,
                                     offset=b.offset, nodata=b.nodata)
    np.testing.assert_allclose(values[:2], [-10.0, 0.0], atol=1e-5)
    assert valid.tolist() == [True, True, False, False]

    ls = Scene.from_item(fixture_item("planetary-computer-landsat-c2-l2"), href_policy=REMOTE)
    b = ls.bands["lwir11"]
    values, _ = ls.recipe.decode("lwir11", np.array([44000], np.uint16), scale=b.scale, offset=b.offset,
                                 nodata=b.nodata)
    assert values[0] == pytest.approx(44000 * 0.00341802 + 149.0, abs=1e-3)


def test_planetary_computer_asset_keys_for_s2() -> None:
    """PC names Sentinel-2 assets B04/B03/B02: the recipe's alternatives find them."""
    item = fixture_item("earth-search-sentinel-2-l2a")
    item["assets"] = {pc: item["assets"][es] for es, pc in (("red", "B04"), ("green", "B03"), ("blue", "B02"),
                                                          ("nir", "B08"))}
    for asset in item["assets"].values():  # no band names either: the keys alone must match
        asset.pop("eo:bands", None)
    scene = Scene.from_item(item, href_policy=REMOTE)
    assert {b: a.key for b, a in scene.bands.items()} == {"red": "B04", "green": "B03", "blue": "B02", "nir": "B08"}


def test_optional_band_may_be_missing_required_may_not() -> None:
    item = fixture_item("earth-search-sentinel-2-l2a")
    del item["assets"]["nir"]
    assert "nir" not in Scene.from_item(item, href_policy=REMOTE).bands
    del item["assets"]["green"]
    with pytest.raises(MissingAsset) as err:
        Scene.from_item(item, href_policy=REMOTE)
    assert err.value.item_id == "S2B_33TUL_20230704_0_L2A" and err.value.asset == "green"


def test_unknown_collection() -> None:
    item = fixture_item("earth-search-sentinel-2-l2a")
    item["collection"] = "no-such-collection"
    with pytest.raises(UnknownCollection):
        Scene.from_item(item, href_policy=REMOTE)


def test_default_policy_refuses_local_files() -> None:
    item = fixture_item("planetary-computer-landsat-c2-l2")
    item["assets"]["lwir11"]["href"] = "file:///etc/passwd"
    with pytest.raises(HrefNotAllowed) as err:
        Scene.from_item(item)
    assert err.value.asset == "lwir11" and err.value.stage == "scene"


def test_proj_code_and_stac11_bands_shapes() -> None:
    """Newer items: ``proj:code`` instead of ``proj:epsg``; STAC 1.1 ``bands`` with ``raster:*`` fields."""
    item = fixture_item("planetary-computer-landsat-c2-l2")
    props = item["properties"]
    props["proj:code"] = "EPSG:32612"
    del props["proj:epsg"]
    asset = item["assets"]["lwir11"]
    del asset["raster:bands"]
    asset["bands"] = [{"name": "lwir11", "nodata": 0, "data_type": "uint16", "raster:scale": 0.5,
                       "raster:offset": 100.0}]
    scene = Scene.from_item(item, href_policy=REMOTE)
    assert scene.crs == "EPSG:32612"
    assert (scene.bands["lwir11"].scale, scene.bands["lwir11"].offset) == (0.5, 100.0)


def test_missing_proj_without_header_read() -> None:
    item = copy.deepcopy(fixture_item("planetary-computer-sentinel-1-rtc"))
    for key in ("proj:epsg", "proj:shape", "proj:transform"):
        del item["properties"][key]
    with pytest.raises(NoGeoreference):
        Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)


def test_missing_proj_falls_back_to_header(toy_items: list[dict], toyworld) -> None:  # noqa: ANN001
    item = copy.deepcopy(toy_items[0])
    expected = Scene.from_item(item, href_policy=toyworld.href_policy())
    for key in [k for k in item["properties"] if k.startswith("proj:")]:
        del item["properties"][key]
    scene = Scene.from_item(item, href_policy=toyworld.href_policy())
    assert (scene.crs, scene.shape, scene.transform) == (expected.crs, expected.shape, expected.transform)


def test_scene_round_trips_through_json(toy_items: list[dict], toyworld) -> None:  # noqa: ANN001
    """Scenes travel between processes (Ray rows): a JSON round trip keeps them equal."""
    scene = Scene.from_item(toy_items[1], href_policy=toyworld.href_policy())
    assert Scene.model_validate_json(scene.model_dump_json()) == scene


def test_recipe_for_fixture_collections() -> None:
    assert recipe_for("sentinel-2-l2a").sensor == "optical"
    assert recipe_for("sentinel-1-rtc").sensor == "sar"
    assert recipe_for("landsat-c2-l2").sensor == "thermal"
