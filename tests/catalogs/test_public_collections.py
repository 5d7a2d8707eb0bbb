"""Every public collection's item, in the shape its service publishes, becomes the right scene and reads right.

Fixtures (``fixtures/*.json``) are written from each service's public documentation and examples. Parsing is checked
offline (grid, CRS, bands, units, scale/offset); reading is checked through the access path a real deployment uses,
against local servers: plain HTTP (``/vsicurl/``, a loopback server that honours ranges), Planetary Computer SAS-signed
blob URLs (a loopback token endpoint and blob server that refuses unsigned requests), S3 (moto), requester-pays S3
and CDSE's own S3 endpoint with its own credentials.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rasterio.windows import Window

from catalogs.errors import UnsupportedGeoreference
from catalogs.hrefs import HrefPolicy
from catalogs.io import SceneReader
from catalogs.scene import Scene
from tests.catalogs.blobserver import RangeServer, TokenServer
from tests.catalogs.cogs import NODATA_COLUMNS, write_cog
from tests.catalogs.conftest import Servers, fixture_item
from tests.harness.servers import env_vars

REMOTE = HrefPolicy(allowed_schemes=frozenset({"https", "s3"}))
UTM33_10M = (10.0, 0.0, 300000.0, 0.0, -10.0, 5100000.0)


@dataclass(frozen=True)
class Case:
    """What one fixture must parse to, and how its assets are read."""

    collection: str
    crs: str
    shape: tuple[int, int]
    transform: tuple[float, ...]
    # band -> (asset key, scale, offset, unit)
    bands: dict[str, tuple[str, float, float, str]]
    # band -> (a DN, the physical value it means)
    known: dict[str, tuple[float, float]]
    access: str  # http | pc | s3 | s3-requester-pays | cdse
    dtype: str = "uint16"


S2_BANDS = {b: (k, 0.0001, -0.1, "reflectance") for b, k in
            (("red", "red"), ("green", "green"), ("blue", "blue"), ("nir", "nir"))}
S2_KNOWN = {"red": (1500, 0.05), "green": (1800, 0.08), "blue": (1100, 0.01)}

CASES: dict[str, Case] = {
    "earth-search-sentinel-2-l2a": Case("sentinel-2-l2a", "EPSG:32633", (10980, 10980), UTM33_10M, S2_BANDS,
                                        S2_KNOWN, "http"),
    "earth-search-sentinel-2-c1-l2a": Case("sentinel-2-c1-l2a", "EPSG:32633", (10980, 10980), UTM33_10M, S2_BANDS,
                                           S2_KNOWN, "http"),
    # v0: keys B04..., no raster extension: offset -0.1 from the product id's baseline N0400
    "earth-search-v0-sentinel-s2-l2a-cogs": Case(
        "sentinel-s2-l2a-cogs", "EPSG:32633", (10980, 10980), UTM33_10M,
        {b: (k, 0.0001, -0.1, "reflectance") for b, k in (("red", "B04"), ("green", "B03"), ("blue", "B02"))},
        S2_KNOWN, "http"),
    # PC: keys B04..., no raster extension: offset -0.1 from s2:processing_baseline 05.09
    "planetary-computer-sentinel-2-l2a": Case(
        "sentinel-2-l2a", "EPSG:32633", (10980, 10980), UTM33_10M,
        {b: (k, 0.0001, -0.1, "reflectance") for b, k in (("red", "B04"), ("green", "B03"), ("blue", "B02"))},
        S2_KNOWN, "pc"),
    # CDSE: STAC 1.1, keys B04_10m/B04_20m/B04_60m found by bands[].name (finest wins), proj:code, raster:* at asset
    "cdse-sentinel-2-l2a": Case(
        "sentinel-2-l2a", "EPSG:32633", (10980, 10980), UTM33_10M,
        {b: (k, 0.0001, -0.1, "reflectance") for b, k in
         (("red", "B04_10m"), ("green", "B03_10m"), ("blue", "B02_10m"), ("nir", "B08_10m"))},
        S2_KNOWN, "cdse"),
    "planetary-computer-sentinel-1-rtc": Case(
        "sentinel-1-rtc", "EPSG:32631", (22354, 21699), (10.0, 0.0, 585880.0, 0.0, -10.0, 5930910.0),
        {"vv": ("vv", 1.0, 0.0, "dB"), "vh": ("vh", 1.0, 0.0, "dB")},
        {"vv": (0.1, -10.0), "vh": (0.01, -20.0)}, "pc", dtype="float32"),
    "planetary-computer-landsat-c2-l2": Case(
        "landsat-c2-l2", "EPSG:32612", (7821, 7701), (30.0, 0.0, 313785.0, 0.0, -30.0, 3813615.0),
        {"lwir11": ("lwir11", 0.00341802, 149.0, "K"), "red": ("red", 0.0000275, -0.2, "reflectance")},
        {"lwir11": (44000, 44000 * 0.00341802 + 149.0), "red": (10000, 0.075)}, "pc"),
    # USGS: main hrefs need a browser login; the recipe reads the requester-pays s3 alternate
    "usgs-landsat-c2l2-st": Case(
        "landsat-c2l2-st", "EPSG:32612", (7821, 7701), (30.0, 0.0, 231585.0, 0.0, -30.0, 3738915.0),
        {"lwir11": ("lwir11", 0.00341802, 149.0, "K")}, {"lwir11": (40000, 40000 * 0.00341802 + 149.0)},
        "s3-requester-pays"),
    "own-pgstac-example-own-optical": Case(
        "example-own-optical", "EPSG:32631", (440, 410), (10.0, 0.0, 644000.0, 0.0, -10.0, 5772400.0),
        {b: (b, 0.0001, 0.0, "reflectance") for b in ("red", "green", "blue")},
        {"red": (1200, 0.12), "green": (900, 0.09), "blue": (600, 0.06)}, "s3"),
}
GRD_FIXTURES = ["earth-search-sentinel-1-grd", "planetary-computer-sentinel-1-grd", "cdse-sentinel-1-grd"]


# ------------------------------------------------------------------------------------------------ parsing, offline


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_parses_to_the_right_scene(name: str) -> None:
    case = CASES[name]
    scene = Scene.from_item(fixture_item(name), href_policy=REMOTE, read_header_if_missing=False)
    assert scene.collection == case.collection
    assert scene.crs == case.crs
    assert scene.shape == case.shape
    assert scene.transform == pytest.approx(case.transform)
    for band, (key, scale, offset, unit) in case.bands.items():
        got = scene.bands[band]
        assert (got.key, got.unit) == (key, unit), band
        assert got.scale == pytest.approx(scale) and got.offset == pytest.approx(offset), band
    assert set(case.bands) <= set(scene.bands)


@pytest.mark.parametrize("name", sorted(CASES))
def test_known_dn_maps_to_physical_value(name: str) -> None:
    case = CASES[name]
    scene = Scene.from_item(fixture_item(name), href_policy=REMOTE, read_header_if_missing=False)
    for band, (dn, expected) in case.known.items():
        b = scene.bands[band]
        values, valid = scene.recipe.decode(band, np.array([dn], dtype=case.dtype), scale=b.scale, offset=b.offset,
                                            nodata=b.nodata)
        assert valid[0]
        assert values[0] == pytest.approx(expected, abs=1e-4), (band, dn)


def test_usgs_reads_the_s3_alternate() -> None:
    scene = Scene.from_item(fixture_item("usgs-landsat-c2l2-st"), href_policy=REMOTE, read_header_if_missing=False)
    assert scene.bands["lwir11"].href.startswith("s3://usgs-landsat/collection02/")


@pytest.mark.parametrize(("name", "prop", "old"), [
    ("planetary-computer-sentinel-2-l2a", "s2:processing_baseline", "03.01"),
    ("earth-search-v0-sentinel-s2-l2a-cogs", "sentinel:product_id",
     "S2B_MSIL2A_20210704T095559_N0301_R122_T33TUL_20210704T113327"),
])
def test_baseline_rule_only_from_04_00(name: str, prop: str, old: str) -> None:
    """Before processing baseline 04.00 there is no BOA offset: DN 1500 is reflectance 0.15."""
    item = fixture_item(name)
    item["properties"][prop] = old
    scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
    assert scene.bands["red"].offset == 0.0


def test_catalog_offset_wins_over_the_rule() -> None:
    """Earth Search v1 publishes raster:bands; an explicit offset 0 (a harmonised archive) is kept."""
    item = fixture_item("earth-search-sentinel-2-l2a")
    item["assets"]["red"]["raster:bands"][0]["offset"] = 0
    scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
    assert scene.bands["red"].offset == 0.0 and scene.bands["green"].offset == -0.1


def test_stac11_band_level_value_overrides_asset_level() -> None:
    item = fixture_item("cdse-sentinel-2-l2a")
    item["assets"]["B04_10m"]["bands"][0]["raster:offset"] = -0.2
    scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
    assert scene.bands["red"].offset == -0.2 and scene.bands["red"].scale == 0.0001


def test_projection_shapes() -> None:
    """proj:wkt2 and proj:projjson instead of a code; proj:bbox + proj:shape instead of proj:transform."""
    from pyproj import CRS

    for key, value in (("proj:wkt2", CRS.from_epsg(32633).to_wkt()),
                       ("proj:projjson", CRS.from_epsg(32633).to_json_dict())):
        item = fixture_item("cdse-sentinel-2-l2a")
        for asset in item["assets"].values():
            del asset["proj:code"], asset["proj:transform"]
            asset[key] = value
        del item["properties"]["proj:code"]
        scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
        assert scene.crs == "EPSG:32633", key
        assert scene.transform == pytest.approx(UTM33_10M), key


@pytest.mark.parametrize("name", GRD_FIXTURES)
def test_grd_is_refused_naming_item_and_rtc(name: str) -> None:
    item = fixture_item(name)
    with pytest.raises(UnsupportedGeoreference) as err:
        Scene.from_item(item, href_policy=REMOTE)
    assert err.value.item_id == item["id"]
    assert item["id"] in str(err.value) and "sentinel-1-rtc" in str(err.value)
    assert err.value.record()["error_type"] == "UnsupportedGeoreference"


def test_gcp_only_raster_is_refused_on_header_read(tmp_path: Path) -> None:
    """Any collection: an item without proj:* whose raster has only GCPs is refused, not read at a wrong grid."""
    import rasterio
    from rasterio.control import GroundControlPoint

    path = tmp_path / "iw-vv.tiff"
    gcps = [GroundControlPoint(row=r, col=c, x=1.0 + c / 1000, y=52.0 + r / 1000) for r in (0, 63) for c in (0, 63)]
    with rasterio.open(path, "w", driver="GTiff", height=64, width=64, count=1, dtype="uint16") as ds:
        ds.write(np.full((64, 64), 100, np.uint16), 1)
        ds.gcps = (gcps, "EPSG:4326")
    item = fixture_item("planetary-computer-sentinel-1-rtc")
    for key in [k for k in item["properties"] if k.startswith("proj:")]:
        del item["properties"][key]
    for asset in item["assets"].values():
        asset["href"] = str(path)
    with pytest.raises(UnsupportedGeoreference) as err:
        Scene.from_item(item, href_policy=HrefPolicy.for_roots(tmp_path))
    assert err.value.item_id == item["id"] and "ground control points" in str(err.value)


# ------------------------------------------------------------------------------ reading through each access path


def _split(url: str) -> tuple[str, str]:
    rest = url.split("://", 1)[1]
    host, _, path = rest.partition("/")
    return host, path


def publish(name: str, case: Case, servers: Servers, tmp_path: Path) -> tuple[dict[str, Any], HrefPolicy]:
    """Write the fixture's bands as small COGs where its hrefs point (on the local servers); return the item to read
    and the href policy a deployment would use for it."""
    item = copy.deepcopy(fixture_item(name))
    scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
    policy = REMOTE
    for band in scene.recipe.used_bands:
        asset = scene.bands[band]
        dn = case.known[band][0]
        nodata = asset.nodata if asset.nodata is not None else scene.recipe.bands[band].nodata
        data = write_cog(tmp_path / f"{name}-{band}.tif", dn, dtype=case.dtype, nodata=nodata,
                         crs=str(scene.crs), transform=scene.transform or ())
        host, path = _split(asset.href)
        if case.access == "pc":
            account = host.split(".", 1)[0]
            servers.blob.files[f"/{account}/{path}"] = data
        elif case.access == "http":
            servers.plain.files[f"/{host}/{path}"] = data
            policy = HrefPolicy(allowed_schemes=frozenset({"http"}), allowed_prefixes=(servers.plain.url,))
        else:
            store = servers.cdse if case.access == "cdse" else servers.s3
            store.make_bucket(host)
            store.client().put_object(Bucket=host, Key=path, Body=data)
    if case.access == "http":  # every asset moves to the loopback server (unused ones are never opened)
        for asset in item["assets"].values():
            if asset["href"].startswith("https://"):
                host, path = _split(asset["href"])
                asset["href"] = f"{servers.plain.url}/{host}/{path}"
    return item, policy


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(CASES))
def test_one_window_reads_through_the_access_path(name: str, servers: Servers, tmp_path: Path) -> None:
    case = CASES[name]
    item, policy = publish(name, case, servers, tmp_path)
    scene = Scene.from_item(item, href_policy=policy)
    for srv in (servers.blob, servers.plain):
        srv.requests.clear()
    servers.s3.clear_requests()
    servers.cdse.clear_requests()

    window = Window(0, 0, 256, 256)
    with SceneReader(scene) as reader:
        tile = reader.read(window)
        raw = reader.read_bands(window)
    assert tile.image.shape == (3, 256, 256)
    assert tile.valid_fraction == pytest.approx((256 - NODATA_COLUMNS) / 256)
    for band, (_dn, expected) in case.known.items():
        if band not in raw:
            continue
        b = scene.bands[band]
        nodata = b.nodata if b.nodata is not None else scene.recipe.bands[band].nodata  # as the reader does
        values, valid = scene.recipe.decode(band, raw[band], scale=b.scale, offset=b.offset, nodata=nodata)
        assert not valid[:, :NODATA_COLUMNS].any() and valid[:, NODATA_COLUMNS:].all()
        assert float(values[100, 100]) == pytest.approx(expected, abs=1e-4), band

    keys = {scene.bands[b].key for b in raw}
    if case.access == "pc":
        served = [r for r in servers.blob.requests if r.status in (200, 206)]
        assert served and all("sig" in r.query for r in servers.blob.requests)
        assert {r.path.rsplit("/", 1)[1] for r in served} == {scene.bands[b].href.rsplit("/", 1)[1] for b in raw}
    elif case.access == "http":
        # GDAL learns each file's size from one un-ranged GET it aborts after the headers, then reads by ranges
        ranged = [r for r in servers.plain.requests if r.range]
        assert ranged and {r.status for r in ranged} == {206}
        probes = [r.path for r in servers.plain.requests if not r.range]
        assert len(probes) == len(set(probes)) <= len(raw)
    elif case.access == "cdse":
        assert servers.cdse.requests and not servers.s3.requests  # CDSE's own endpoint, not the default one
        assert {key for key, _ in servers.cdse.request_auth} == {"cdse-key"}
    else:
        bucket = _split(scene.bands[next(iter(raw))].href)[0]
        mine = [i for i, r in enumerate(servers.s3.requests) if r[1].startswith(f"/{bucket}/")]
        assert mine and not servers.cdse.requests
        payers = {servers.s3.request_auth[i][1] for i in mine}
        assert payers == ({"requester"} if case.access == "s3-requester-pays" else {None})
    assert keys


@pytest.mark.integration
def test_https_cog_with_a_verified_certificate(tmp_path: Path) -> None:
    """Plain HTTPS COGs (Earth Search's hrefs) read through /vsicurl/ over TLS, the certificate checked against the
    CA bundle GDAL is given (``GDAL_CURL_CA_BUNDLE``), by ranged GETs."""
    from tests.catalogs.blobserver import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path)
    server = RangeServer(tls=(cert, key))
    try:
        name = "earth-search-sentinel-2-l2a"
        case = CASES[name]
        item = copy.deepcopy(fixture_item(name))
        scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
        for asset in item["assets"].values():
            host, path = _split(asset["href"])
            asset["href"] = f"{server.url}/{host}/{path}"
        for band in scene.recipe.used_bands:
            host, path = _split(scene.bands[band].href)
            server.files[f"/{host}/{path}"] = write_cog(
                tmp_path / f"{band}.tif", case.known[band][0], dtype="uint16", nodata=0, crs=str(scene.crs),
                transform=scene.transform or ())
        scene = Scene.from_item(item, href_policy=HrefPolicy.for_roots(server.url))
        assert scene.bands["red"].gdal_path.startswith("/vsicurl/https://127.0.0.1:")
        # rasterio sets CURL_CA_BUNDLE to its own bundle when it starts GDAL; GDAL_CURL_CA_BUNDLE takes precedence
        with env_vars({"GDAL_CURL_CA_BUNDLE": str(cert)}), SceneReader(scene) as reader:
            values, valid = reader.read_physical(Window(0, 0, 256, 256))
        assert float(values["red"][10, 100]) == pytest.approx(0.05, abs=1e-4) and not valid[:, :NODATA_COLUMNS].any()
        assert {r.status for r in server.requests if r.range} == {206}
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ Planetary Computer SAS


@pytest.mark.integration
def test_pc_token_once_per_collection_and_resigned_after_expiry(tmp_path: Path) -> None:
    """Five scenes of two collections: two token requests; once a token is within a minute of its expiry the next
    open fetches a new one, and reads carry the new signature."""
    import time

    import planetary_computer.sas
    from planetary_computer.settings import Settings

    tokens = TokenServer(ttl_s=61.5)  # the package renews a token when less than 60 s remain
    blob = RangeServer(tokens=tokens)
    settings = Settings.get()
    saved_url, saved_cache = settings.sas_url, dict(planetary_computer.sas.TOKEN_CACHE)
    settings.sas_url = tokens.url
    planetary_computer.sas.TOKEN_CACHE.clear()
    try:
        with env_vars({"EARTHGPT_AZURE_BLOB_ENDPOINT": blob.url}):
            scenes = []
            for name, n in (("planetary-computer-sentinel-2-l2a", 3), ("planetary-computer-landsat-c2-l2", 2)):
                case = CASES[name]
                for i in range(n):
                    item = copy.deepcopy(fixture_item(name))
                    item["id"] = f"{item['id']}-{i}"
                    for asset in item["assets"].values():
                        asset["href"] = asset["href"].replace(".tif", f"-{i}.tif").replace(".TIF", f"-{i}.TIF")
                    scene = Scene.from_item(item, href_policy=REMOTE, read_header_if_missing=False)
                    for band in scene.recipe.used_bands:
                        href = scene.bands[band].href
                        host, path = _split(href)
                        blob.files[f"/{host.split('.', 1)[0]}/{path}"] = write_cog(
                            tmp_path / f"{scene.id}-{band}.tif", case.known[band][0], dtype=case.dtype,
                            nodata=0, crs=str(scene.crs), transform=scene.transform or ())
                    scenes.append(scene)
            for scene in scenes:
                with SceneReader(scene) as reader:
                    reader.read(Window(0, 0, 64, 64))
            assert sorted(tokens.requests) == ["landsateuwest/landsat-c2", "sentinel2l2a01/sentinel2-l2"]
            first_sigs = {r.query["sig"][0] for r in blob.requests}
            assert len(first_sigs) == 2 and {r.status for r in blob.requests if r.range} == {206}

            # wait until both tokens have less than 60 s left (their renewal margin in the package)
            time.sleep(max(0.0, max(tokens.request_times) + 1.7 - time.monotonic()))
            blob.requests.clear()
            with SceneReader(scenes[0]) as reader:
                reader.read(Window(0, 0, 64, 64))
            assert tokens.requests.count("sentinel2l2a01/sentinel2-l2") == 2
            new_sigs = {r.query["sig"][0] for r in blob.requests}
            assert new_sigs and not new_sigs & first_sigs
            print(f"\nPC tokens: {len(tokens.requests)} requests for {len(scenes) + 1} scene opens "
                  f"({tokens.requests})")
    finally:
        settings.sas_url = saved_url
        planetary_computer.sas.TOKEN_CACHE.clear()
        planetary_computer.sas.TOKEN_CACHE.update(saved_cache)
        tokens.stop()
        blob.stop()


@pytest.mark.integration
def test_unsigned_blob_request_is_refused(tmp_path: Path) -> None:
    """The loopback blob server really checks signatures: an href read without signing gets 403."""
    from catalogs.errors import AssetAccessDenied

    tokens = TokenServer()
    blob = RangeServer(tokens=tokens)
    try:
        item = fixture_item("planetary-computer-landsat-c2-l2")
        for asset in item["assets"].values():
            host, path = _split(asset["href"])
            asset["href"] = f"{blob.url}/{host.split('.', 1)[0]}/{path}"
        policy = HrefPolicy(allowed_schemes=frozenset({"http"}), allowed_prefixes=(blob.url,))
        scene = Scene.from_item(item, href_policy=policy, read_header_if_missing=False)
        with pytest.raises(AssetAccessDenied), SceneReader(scene):
            pass
        assert blob.requests and {r.status for r in blob.requests} == {403}
    finally:
        tokens.stop()
        blob.stop()


def test_store_credentials_never_enter_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from catalogs.access import resolve_access

    monkeypatch.delenv("CDSE_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("CDSE_S3_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("CDSE_S3_SECRET_ACCESS_KEY", "s")
    access = resolve_access("s3://eodata/Sentinel-2/x.jp2")
    assert access.store == "cdse" and access.credentials == {"key": "k", "secret": "s"}
    assert access.options["AWS_S3_ENDPOINT"] == "eodata.dataspace.copernicus.eu"
    assert access.options["AWS_HTTPS"] == "YES" and access.options["AWS_VIRTUAL_HOSTING"] == "FALSE"
    assert os.environ.get("AWS_ACCESS_KEY_ID") != "k"
    rp = resolve_access("s3://usgs-landsat/collection02/x.TIF")
    assert rp.options["AWS_REQUEST_PAYER"] == "requester" and not rp.credentials
    assert resolve_access("s3://sentinel-cogs/a.tif").options["AWS_NO_SIGN_REQUEST"] == "YES"
    plain = resolve_access("https://example.com/a.tif")
    assert plain.path == "/vsicurl/https://example.com/a.tif" and not plain.needs_env


def test_swir_false_colour_composite_reads_20m_bands_onto_the_10m_grid(tmp_path: Path) -> None:
    """Sentinel-2's other standard composite: B12, B8A (20 m) resampled onto B04's 10 m grid, physical values kept."""
    from catalogs.recipes import recipe_for

    recipe = recipe_for("sentinel-2-l2a").with_composite("swir false colour (B12, B8A, B04)")
    assert [c.band for c in recipe.channels] == ["swir22", "nir08", "red"] and recipe.bands["swir22"].required
    item = fixture_item("earth-search-sentinel-2-l2a")
    dns = {"red": (1500, 10.0, 512), "nir08": (3100, 20.0, 256), "swir22": (2600, 20.0, 256)}
    for band, (dn, res, size) in dns.items():
        path = tmp_path / f"{band}.tif"
        write_cog(path, dn, dtype="uint16", nodata=0, crs="EPSG:32633",
                  transform=(res, 0.0, 300000.0, 0.0, -res, 5100000.0), size=size, block=128)
        item["assets"][band]["href"] = str(path)
    for key, asset in item["assets"].items():  # the other assets are listed but never opened
        if key not in dns:
            asset["href"] = str(tmp_path / f"{key}.tif")
    scene = Scene.from_item(item, href_policy=HrefPolicy.for_roots(tmp_path), recipes={"sentinel-2-l2a": recipe})
    with SceneReader(scene) as reader:
        assert reader.shape == (512, 512)
        values, valid = reader.read_physical(Window(128, 128, 256, 256))
        tile = reader.read(Window(128, 128, 256, 256))
    assert valid.all() and tile.valid_fraction == 1.0
    for band, expected in (("swir22", 0.16), ("nir08", 0.21), ("red", 0.05)):
        np.testing.assert_allclose(values[band], expected, atol=1e-4)
