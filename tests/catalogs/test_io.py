"""SceneReader on local COGs: windows, padding, resampling, stretch once, and a typed error for each bad input."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window

from catalogs.errors import (
    ERROR_CATEGORIES,
    AllNodata,
    AssetNotFound,
    BandShapeMismatch,
    CorruptRaster,
    NetworkError,
    NoGeoreference,
    SceneError,
    UnsupportedDataType,
    error_category,
)
from catalogs.hrefs import HrefPolicy
from catalogs.ingest import build_item
from catalogs.io import GDAL_CLOUD_DEFAULTS, SceneReader, configure_gdal
from catalogs.recipes import load_recipes
from catalogs.scene import Scene
from catalogs.tiling import plan_tiles

WHEN = dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc)
RECIPE_YAML = """collections: [test-mixed]
sensor: optical
reference_band: red
bands:
  red: {assets: [red], nodata: 0}
  nir08: {assets: [nir08], nodata: 0}
  blue: {assets: [blue], nodata: 0}
channels: [{band: red, range: [0, 1000]}, {band: nir08, range: [0, 1000]}, {band: blue, range: [0, 1000]}]
stretch: {method: fixed}
"""


def write_cog(path: Path, data: np.ndarray, *, res: float = 10.0, origin: tuple[float, float] = (500_000, 4_000_000),
              crs: str | None = "EPSG:32633", nodata: float | None = 0, driver: str = "COG") -> str:
    """Write a one-band raster (COG by default, 128-px blocks)."""
    profile: dict[str, Any] = {"driver": driver, "width": data.shape[1], "height": data.shape[0], "count": 1,
                               "dtype": data.dtype.name, "nodata": nodata}
    if crs:
        profile.update(crs=crs, transform=from_origin(*origin, res, res))
    if driver == "COG":
        profile.update(blocksize=128, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return str(path)


@pytest.fixture()
def mixed(tmp_path: Path) -> dict[str, Any]:
    """A 256x256 10 m scene with a 20 m band: red = column + 1, blue = row + 1, nir08 = one value per 2x2 block."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mixed.yaml").write_text(RECIPE_YAML)
    rr, cc = np.mgrid[0:256, 0:256]
    coarse = (np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) % 900) + 1
    assets = {
        "red": write_cog(tmp_path / "s_red.tif", (cc + 1).astype(np.uint16)),
        "nir08": write_cog(tmp_path / "s_nir08.tif", coarse, res=20.0),
        "blue": write_cog(tmp_path / "s_blue.tif", (rr + 1).astype(np.uint16)),
    }
    recipes = load_recipes(tmp_path / "recipes")
    item = build_item("s", assets, collection="test-mixed", sensor="optical", datetime=WHEN)
    return {"item": item.to_dict(), "recipes": recipes, "policy": HrefPolicy.for_roots(tmp_path), "coarse": coarse,
            "dir": tmp_path}


def scene_of(mixed: dict[str, Any], **changes: Any) -> Scene:
    item = mixed["item"]
    for key, href in changes.items():
        item["assets"][key]["href"] = href
    return Scene.from_item(item, recipes=mixed["recipes"], href_policy=mixed["policy"])


def test_configure_gdal_is_idempotent_and_keeps_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GDAL_CACHEMAX", "64")
    applied = configure_gdal()
    assert applied["GDAL_CACHEMAX"] == os.environ["GDAL_CACHEMAX"]
    assert os.environ["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert set(GDAL_CLOUD_DEFAULTS) <= set(applied)
    assert configure_gdal({"GDAL_HTTP_MAX_RETRY": "7"})["GDAL_HTTP_MAX_RETRY"] == "7"
    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", GDAL_CLOUD_DEFAULTS["GDAL_HTTP_MAX_RETRY"])


def test_read_window_and_coarse_band_resampling(mixed: dict[str, Any]) -> None:
    scene = scene_of(mixed)
    with SceneReader(scene, resampling=Resampling.nearest) as reader:
        assert reader.shape == (256, 256) and reader.block_shape == (128, 128)
        raw = reader.read_bands(Window(10, 20, 50, 40))
        np.testing.assert_array_equal(raw["red"][0], np.arange(10, 60) + 1)
        np.testing.assert_array_equal(raw["blue"][:, 0], np.arange(20, 60) + 1)
        rr, cc = np.mgrid[20:60, 10:60]
        np.testing.assert_array_equal(raw["nir08"], mixed["coarse"][rr // 2, cc // 2])
        out = reader.read(Window(10, 20, 50, 40))
        assert out.image.shape == (3, 40, 50) and out.image.dtype == np.float32
        np.testing.assert_allclose(out.image[1], mixed["coarse"][rr // 2, cc // 2] / 1000.0, rtol=1e-6)
        assert out.valid.all() and out.valid_fraction == 1.0
        assert out.transform.c == 500_000 + 10 * 10 and out.transform.f == 4_000_000 - 20 * 10


def test_bilinear_resampling_of_a_linear_ramp(tmp_path: Path, mixed: dict[str, Any]) -> None:
    ramp = np.tile((np.arange(128, dtype=np.float32) * 4 + 100)[None, :], (128, 1)).astype(np.uint16)
    href = write_cog(tmp_path / "ramp_nir08.tif", ramp, res=20.0)
    scene = scene_of(mixed, nir08=href)
    with SceneReader(scene) as reader:  # bilinear by default
        nir = reader.read(Window(32, 32, 64, 64)).image[1] * 1000.0
    # fine pixel centre x = col + 0.5 lies at coarse coordinate (col + 0.5) / 2 - 0.5 -> value 100 + 8 * that
    cols = np.arange(32, 96)
    expected = 100 + 4 * ((cols + 0.5) / 2 - 0.5)
    np.testing.assert_allclose(nir[10], expected, atol=0.51)


def test_small_scene_window_is_padded(mixed: dict[str, Any]) -> None:
    scene = scene_of(mixed)
    with SceneReader(scene) as reader:
        tile = plan_tiles(*reader.shape, size=300)[0]
        out = reader.read(tile.window)
    assert out.image.shape == (3, 300, 300)
    assert out.valid[:256, :256].all() and not out.valid[256:, :].any() and not out.valid[:, 256:].any()
    assert out.valid_fraction == pytest.approx(256 * 256 / 300 / 300)
    assert (out.image[:, 256:, :] == 0).all()


def test_stretch_is_computed_once_from_an_overview(toyworld, toy_items) -> None:  # noqa: ANN001
    scene = Scene.from_item(toy_items[0], href_policy=toyworld.href_policy())  # optical: percentile stretch
    with SceneReader(scene) as reader:
        first = reader.stretch
        calls = []
        original = reader._read_decoded

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs.get("out_shape"))
            return original(*args, **kwargs)

        reader._read_decoded = counting  # type: ignore[method-assign]
        for tile in plan_tiles(*reader.shape, size=128)[:3]:
            reader.read(tile.window)
        assert reader.stretch is first
        assert all(shape == (128, 128) for shape in calls)  # only tile reads, no second overview read
    assert all(lo < hi for lo, hi in first)
    # a reader given the stretch of an earlier one renders identical tiles
    with SceneReader(scene) as a, SceneReader(scene, stretch=first) as b:
        np.testing.assert_array_equal(a.read(Window(0, 0, 64, 64)).image, b.read(Window(0, 0, 64, 64)).image)


def test_reader_requires_open(mixed: dict[str, Any]) -> None:
    reader = SceneReader(scene_of(mixed))
    with pytest.raises(RuntimeError):
        reader.read(Window(0, 0, 8, 8))


# ------------------------------------------------------------------------------------------------ typed bad inputs


def expect(error: type[SceneError], scene: Scene, window: Window = Window(0, 0, 64, 64)) -> SceneError:
    with pytest.raises(error) as info, SceneReader(scene) as reader:
        reader.read(window)
    assert info.value.item_id == scene.id
    record = info.value.record()
    assert record["error_type"] == error.__name__ and record["stage"] in ("open", "read")
    return info.value


def test_missing_file_is_asset_not_found(mixed: dict[str, Any]) -> None:
    err = expect(AssetNotFound, scene_of(mixed, blue=str(mixed["dir"] / "gone_blue.tif")))
    assert err.asset == "blue" and err.stage == "open"


def test_garbage_file_is_corrupt(mixed: dict[str, Any]) -> None:
    bad = mixed["dir"] / "bad_blue.tif"
    bad.write_bytes(b"II*\x00" + b"\x00garbage" * 64)
    err = expect(CorruptRaster, scene_of(mixed, blue=str(bad)))
    assert err.stage == "open"


def test_truncated_cog_is_corrupt_on_read(mixed: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    full = mixed["dir"] / "full_blue.tif"
    write_cog(full, rng.integers(1, 60000, (256, 256), dtype=np.uint16))
    data = full.read_bytes()
    cut = mixed["dir"] / "cut_blue.tif"
    cut.write_bytes(data[: len(data) // 2])
    err = expect(CorruptRaster, scene_of(mixed, blue=str(cut)), Window(192, 192, 64, 64))  # the last block
    assert err.stage == "read"
    # rasterio's own message ("Read failed. See previous exception for details.") names no cause: GDAL's is kept
    assert "IReadBlock failed" in err.message and "TIFFReadEncodedTile" in err.message


def test_dns_failure_is_a_network_error_retried_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    import catalogs.io as cio

    monkeypatch.setenv("GDAL_HTTP_MAX_RETRY", "0")
    monkeypatch.setattr(cio, "NETWORK_BACKOFF_S", 0.01)
    opens: list[str] = []
    real_open = cio.rasterio.open

    def counting_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opens.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cio.rasterio, "open", counting_open)
    with pytest.raises(NetworkError) as info:
        cio.open_raster("/vsicurl/http://no-such-host.invalid/scene_red.tif", item_id="i", asset="red")
    assert "Could not resolve host" in info.value.message and "after 4 attempts" in info.value.message
    assert len(opens) == 1 + cio.NETWORK_RETRIES  # every retry asked the network again (GDAL's cache bypassed)
    assert error_category(info.value.error_type) == "network"


def test_connection_refused_is_a_network_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import catalogs.io as cio

    monkeypatch.setattr(cio, "NETWORK_RETRIES", 0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(NetworkError):
        cio.open_raster(f"/vsicurl/http://127.0.0.1:{port}/x.tif")


def test_every_scene_error_has_a_category() -> None:
    import catalogs.errors as errors_module

    def subclasses(cls: type) -> set[type]:
        return {c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))}

    names = {c.__name__ for c in subclasses(SceneError) if c.__module__ == errors_module.__name__}
    assert names == set(ERROR_CATEGORIES)
    assert set(ERROR_CATEGORIES.values()) == {"network", "access", "corrupt", "unsupported", "model"}


def test_complex_data_is_unsupported(mixed: dict[str, Any]) -> None:
    href = write_cog(mixed["dir"] / "c_blue.tif", np.ones((256, 256), np.complex64), driver="GTiff", nodata=None)
    expect(UnsupportedDataType, scene_of(mixed, blue=href))


def test_no_georeference(mixed: dict[str, Any]) -> None:
    href = write_cog(mixed["dir"] / "plain_red.tif", np.ones((256, 256), np.uint16), crs=None, driver="GTiff")
    item = mixed["item"]
    item["assets"]["red"]["href"] = href
    for key in [k for k in item["properties"] if k.startswith("proj:")]:
        del item["properties"][key]
    with pytest.raises(NoGeoreference) as info:
        Scene.from_item(item, recipes=mixed["recipes"], href_policy=mixed["policy"])
    assert info.value.item_id == "s"


def test_bands_on_different_grids(mixed: dict[str, Any]) -> None:
    shifted = write_cog(mixed["dir"] / "far_blue.tif", np.ones((256, 256), np.uint16), origin=(540_000, 4_000_000))
    expect(BandShapeMismatch, scene_of(mixed, blue=shifted))
    other_crs = write_cog(mixed["dir"] / "crs_blue.tif", np.ones((256, 256), np.uint16), crs="EPSG:32634")
    expect(BandShapeMismatch, scene_of(mixed, blue=other_crs))


def test_all_nodata_window(mixed: dict[str, Any]) -> None:
    data = np.ones((256, 256), np.uint16)
    data[:64, :64] = 0
    href = write_cog(mixed["dir"] / "hole_blue.tif", data)
    scene = scene_of(mixed, blue=href)
    expect(AllNodata, scene, Window(0, 0, 64, 64))
    with SceneReader(scene) as reader:
        assert reader.read(Window(0, 0, 64, 64), allow_empty=True).valid_fraction == 0.0
        assert reader.read(Window(32, 32, 64, 64)).valid_fraction == pytest.approx(0.75)
