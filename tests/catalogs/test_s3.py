"""Reading scenes from S3 (moto) through GDAL /vsis3/: the same bits as locally, and few GET requests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from catalogs.errors import AssetAccessDenied, AssetNotFound
from catalogs.hrefs import HrefPolicy
from catalogs.io import SceneReader
from catalogs.scene import Scene
from catalogs.tiling import plan_tiles
from tests.catalogs.proxy import StatusServer

pytestmark = pytest.mark.integration

BUCKET = "catalogs-toy"


def upload(s3, toyworld, prefix: str) -> None:  # noqa: ANN001
    client = s3.client()
    s3.make_bucket(BUCKET)
    for path in sorted(Path(toyworld.root / "cogs").glob("*.tif")):
        client.upload_file(str(path), BUCKET, f"{prefix}/cogs/{path.name}")


def on_s3(item: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(item)
    for asset in out["assets"].values():
        asset["href"] = f"s3://{BUCKET}/{prefix}/cogs/{asset['href'].rsplit('/', 1)[1]}"
    return out


@pytest.fixture(scope="module")
def s3_world(s3, toyworld) -> str:  # noqa: ANN001
    upload(s3, toyworld, "world")
    return "world"


def test_tiles_from_s3_equal_local_bit_for_bit(s3_world: str, toyworld, toy_items) -> None:  # noqa: ANN001
    remote_policy = HrefPolicy.for_roots(f"s3://{BUCKET}/{s3_world}")
    for item in toy_items:
        local = Scene.from_item(item, href_policy=toyworld.href_policy())
        remote = Scene.from_item(on_s3(item, s3_world), href_policy=remote_policy)
        assert remote.bands[remote.recipe.reference_band].gdal_path.startswith("/vsis3/")
        with SceneReader(local) as a, SceneReader(remote) as b:
            assert a.stretch == b.stretch
            for tile in plan_tiles(*a.shape, size=64, overlap=8):
                ta = a.read(tile.window, allow_empty=True)
                tb = b.read(tile.window, allow_empty=True)
                np.testing.assert_array_equal(ta.image, tb.image)
                np.testing.assert_array_equal(ta.valid, tb.valid)
            raw_a, raw_b = a.read_bands(tile.window), b.read_bands(tile.window)
            for band in raw_a:
                assert raw_a[band].tobytes() == raw_b[band].tobytes()


def test_get_requests_per_tile(s3, toyworld, toy_items) -> None:  # noqa: ANN001
    """Header once per band file, then about one ranged GET per band per block-aligned tile."""
    prefix = "getcount"  # fresh keys: GDAL caches what it has read per file name within a process
    upload(s3, toyworld, prefix)
    item = next(i for i in toy_items if i["collection"] == "toyworld-optical")
    scene = Scene.from_item(on_s3(item, prefix), href_policy=HrefPolicy.for_roots(f"s3://{BUCKET}/{prefix}"))
    n_bands = len(scene.recipe.used_bands)  # red, green, blue (nir is not read)
    s3.clear_requests()
    with SceneReader(scene) as reader:
        opened = [r for r in s3.requests if BUCKET in r[1]]
        _ = reader.stretch
        after_stretch = [r for r in s3.requests if BUCKET in r[1]]
        size = reader.block_shape[0]
        tiles = plan_tiles(*reader.shape, size=size)
        # shuffled: in row-major order GDAL's read-ahead merges neighbouring blocks into fewer, larger ranges
        order = np.random.default_rng(0).permutation(len(tiles))
        per_tile = []
        for tile in (tiles[i] for i in order):
            before = len(s3.requests)
            reader.read(tile.window, allow_empty=True)
            per_tile.append(len(s3.requests) - before)
    # opening: at most one request per band file (the header, a 16 KiB ranged GET)
    assert len(opened) <= n_bands
    assert all(method == "GET" and rng and rng.startswith("bytes=0-") for method, _, rng in opened)
    assert {path for _, path, _ in opened} == {f"/{BUCKET}/{prefix}/cogs/{scene.id}_{b}.tif" for b in
                                             scene.recipe.used_bands}
    # the stretch reads the overview: a few more ranges per band, once
    assert len(after_stretch) - len(opened) <= 2 * n_bands
    # each block-aligned tile: at most one ranged GET per band, no header re-read (fewer where an earlier range
    # already covered the block)
    assert max(per_tile) <= n_bands
    tile_requests = s3.requests[len(after_stretch):]
    assert all(method == "GET" and rng and not rng.startswith("bytes=0-") for method, _, rng in tile_requests)
    print(f"\nGET counts for {scene.id} ({reader.shape[0]}x{reader.shape[1]}, {n_bands} bands, {size}-px tiles): "
          f"open {len(opened)}, stretch {len(after_stretch) - len(opened)}, tiles {len(tiles)} -> "
          f"{sum(per_tile)} GETs ({sum(per_tile) / len(tiles):.2f} per tile, {sum(per_tile) / len(tiles) / n_bands:.2f}"
          " per band per tile)")


def test_missing_key_is_asset_not_found(s3_world: str, toy_items) -> None:  # noqa: ANN001
    item = on_s3(toy_items[1], s3_world)  # SAR
    item["assets"]["vh"]["href"] = f"s3://{BUCKET}/{s3_world}/cogs/no-such-file_vh.tif"
    scene = Scene.from_item(item, href_policy=HrefPolicy.for_roots(f"s3://{BUCKET}/{s3_world}"))
    with pytest.raises(AssetNotFound) as info, SceneReader(scene):
        pass
    assert info.value.asset == "vh" and info.value.item_id == scene.id


def test_missing_bucket_is_asset_not_found(s3_world: str, toy_items) -> None:  # noqa: ANN001
    item = on_s3(toy_items[2], s3_world)
    item["assets"]["lwir11"]["href"] = "s3://no-such-bucket/x/y_lwir11.tif"
    scene = Scene.from_item(item, href_policy=HrefPolicy(allowed_schemes=frozenset({"s3"})))
    with pytest.raises(AssetNotFound), SceneReader(scene):
        pass


def test_http_403_is_access_denied(toy_items) -> None:  # noqa: ANN001
    server = StatusServer(403)
    try:
        item = copy.deepcopy(toy_items[2])
        item["assets"]["lwir11"]["href"] = f"{server.url}/private/x_lwir11.tif"
        policy = HrefPolicy(allowed_schemes=frozenset({"http"}), allowed_prefixes=(server.url,))
        scene = Scene.from_item(item, href_policy=policy)
        with pytest.raises(AssetAccessDenied) as info, SceneReader(scene):
            pass
        assert info.value.record()["error_type"] == "AssetAccessDenied"
        assert server.hits >= 1
    finally:
        server.stop()
