"""Sensor recipes: every shipped YAML parses; decode, stretch and render do what the data files say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from catalogs.errors import AllNodata
from catalogs.recipes import Recipe, builtin_recipes, load_recipe, load_recipes, recipe_for

COLLECTION_DIR = Path(__file__).resolve().parents[2] / "catalogs" / "collections"


@pytest.mark.parametrize("path", sorted(COLLECTION_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_parses(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.sensor in ("optical", "sar", "thermal")
    assert len(recipe.channels) == 3
    assert recipe.reference_band in recipe.used_bands


def test_builtin_table_covers_public_and_toy_collections() -> None:
    table = builtin_recipes()
    for cid in ("sentinel-2-l2a", "sentinel-1-rtc", "landsat-c2-l2", "toyworld-optical", "toyworld-sar",
                "toyworld-thermal"):
        assert cid in table
    assert len(list(COLLECTION_DIR.glob("*.yaml"))) >= 6


def test_user_recipe_dir_overrides(tmp_path: Path) -> None:
    (tmp_path / "my.yaml").write_text(
        "collections: [my-s2]\nsensor: optical\nreference_band: r\n"
        "bands: {r: {assets: [B4]}, g: {assets: [B3]}, b: {assets: [B2]}}\n"
        "channels: [{band: r}, {band: g}, {band: b}]\n"
    )
    table = load_recipes(tmp_path)
    assert recipe_for("my-s2", table).bands["r"].assets == ("B4",)
    assert "sentinel-2-l2a" in table


def test_invalid_recipes_are_rejected() -> None:
    base = {"collections": ["x"], "sensor": "sar", "reference_band": "vv", "bands": {"vv": {"assets": ["vv"]}},
            "channels": [{"band": "vv"}, {"band": "vv"}, {"band": "vv"}]}
    Recipe.model_validate(base)
    with pytest.raises(ValidationError, match="fixed"):
        Recipe.model_validate({**base, "stretch": {"method": "fixed"}})
    with pytest.raises(ValidationError, match="unknown band"):
        Recipe.model_validate({**base, "channels": [{"band": "vv"}, {"band": "hh"}, {"band": "vv"}]})
    with pytest.raises(ValidationError):
        Recipe.model_validate({**base, "sensor": "lidar"})
    with pytest.raises(ValidationError):
        Recipe.model_validate({**base, "channels": [{"band": "vv"}, {"band": "vv"}]})


def test_sar_render_maps_db_ranges() -> None:
    recipe = recipe_for("sentinel-1-rtc")
    vv_lin = np.array([[10 ** -2.5, 1.0, 0.01, -32768.0]], np.float32)  # -25 dB, 0 dB, -20 dB, nodata
    vh_lin = np.array([[10 ** -3.2, 10 ** -0.5, 0.001, 0.001]], np.float32)  # -32, -5, -30 dB
    vv, ok_vv = recipe.decode("vv", vv_lin, scale=1.0, offset=0.0, nodata=-32768.0)
    vh, ok_vh = recipe.decode("vh", vh_lin, scale=1.0, offset=0.0, nodata=-32768.0)
    valid = ok_vv & ok_vh
    stretch = recipe.compute_stretch({"vv": vv, "vh": vh}, valid)
    assert stretch == ((-25.0, 0.0), (-32.0, -5.0), (0.0, 15.0))
    out = recipe.render({"vv": vv, "vh": vh}, valid, stretch)
    assert out.image.shape == (3, 1, 4) and out.image.dtype == np.float32
    np.testing.assert_allclose(out.image[0, 0, :3], [0.0, 1.0, 0.2], atol=1e-5)
    np.testing.assert_allclose(out.image[1, 0, :3], [0.0, 1.0, 2 / 27], atol=1e-5)
    # ratio channel: VV - VH in dB = 7, 5, 10 -> /15
    np.testing.assert_allclose(out.image[2, 0, :3], [7 / 15, 5 / 15, 10 / 15], atol=1e-5)
    assert out.valid.tolist() == [[True, True, True, False]]
    assert out.image[:, 0, 3].tolist() == [0.0, 0.0, 0.0]
    assert out.valid_fraction == pytest.approx(0.75)


def test_percentile_stretch_and_min_span() -> None:
    recipe = recipe_for("landsat-c2-l2")  # 2-98 %, min span 10 K
    kelvin = np.linspace(290.0, 330.0, 101, dtype=np.float32).reshape(1, -1)
    valid = np.ones_like(kelvin, dtype=bool)
    (lo, hi), *_ = recipe.compute_stretch({"lwir11": kelvin}, valid)
    assert lo == pytest.approx(290.8, abs=1e-3) and hi == pytest.approx(329.2, abs=1e-3)
    flat = np.full((4, 4), 300.0, np.float32)
    (lo, hi), *_ = recipe.compute_stretch({"lwir11": flat}, np.ones((4, 4), bool))
    assert (lo, hi) == (300.0, 310.0)  # a uniform scene is not blown up
    out = recipe.render({"lwir11": kelvin}, valid, recipe.compute_stretch({"lwir11": kelvin}, valid))
    assert out.image.min() == 0.0 and out.image.max() == 1.0
    np.testing.assert_array_equal(out.image[0], out.image[1])  # thermal is replicated


def test_stretch_ignores_nodata_and_fails_on_empty() -> None:
    recipe = recipe_for("toyworld-optical")
    dn = np.array([[0, 0, 500, 1500]], np.uint16)
    vals = {}
    valid = np.ones(dn.shape, bool)
    for band in ("red", "green", "blue"):
        vals[band], ok = recipe.decode(band, dn, scale=1e-4, offset=0.0, nodata=0)
        valid &= ok
    (lo, hi), *_ = recipe.compute_stretch(vals, valid)
    assert lo >= 0.05 - 1e-6  # the nodata zeros are not the low end
    with pytest.raises(AllNodata):
        recipe.compute_stretch(vals, np.zeros(dn.shape, bool))
