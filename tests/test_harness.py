"""The harness's servers are real: GDAL range reads on S3, pgstac CQL2 search, rustac search, a Ray round-trip."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _collection(cid: str) -> dict:
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": cid,
        "description": "harness test collection",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
            "temporal": {"interval": [["2024-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }


def _item(cid: str, iid: str, lon: float, lat: float, when: str, cloud: float) -> dict:
    d = 0.05
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [],
        "id": iid,
        "collection": cid,
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]],
        },
        "bbox": [lon, lat, lon + d, lat + d],
        "properties": {"datetime": when, "eo:cloud_cover": cloud},
        "assets": {},
        "links": [],
    }


ITEMS = [
    ("a", 10.0, 50.0, "2024-03-01T10:00:00Z", 5.0),
    ("b", 10.1, 50.0, "2024-03-15T10:00:00Z", 45.0),
    ("c", 10.0, 50.1, "2024-06-01T10:00:00Z", 12.0),
    ("d", 30.0, -20.0, "2024-03-02T10:00:00Z", 1.0),
]


def test_s3_gdal_range_read(s3, tmp_path):
    import rasterio
    from rasterio.windows import Window

    bucket = s3.make_bucket("harness-gdal")
    data = (np.arange(512 * 512, dtype=np.uint32) % 65521).astype(np.uint16).reshape(1, 512, 512)
    path = tmp_path / "cog.tif"
    profile = dict(driver="GTiff", width=512, height=512, count=1, dtype="uint16", tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate", crs="EPSG:32632",
                   transform=rasterio.transform.from_origin(500000, 5600000, 10, 10))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    s3.client().upload_file(str(path), bucket, "scenes/cog.tif")

    s3.clear_requests()
    with rasterio.Env(), rasterio.open(f"/vsis3/{bucket}/scenes/cog.tif") as src:
        window = src.read(1, window=Window(256, 256, 256, 256))
        assert src.crs.to_epsg() == 32632
    np.testing.assert_array_equal(window, data[0, 256:512, 256:512])
    gets = [r for r in s3.requests if r[0] == "GET"]
    assert gets, "GDAL read did not reach the server"
    assert all(r[2] and r[2].startswith("bytes=") for r in gets), gets  # ranged reads, not whole-object GETs
    assert s3.filesystem().exists(f"{bucket}/scenes/cog.tif")


def test_pgstac_search_bbox_datetime_filter(pgstac):
    from pystac_client import Client

    pgstac.load_collections([_collection("harness-pg")])
    pgstac.load_items([_item("harness-pg", *row) for row in ITEMS])
    client = Client.open(pgstac.url)

    by_bbox = {i.id for i in client.search(collections=["harness-pg"], bbox=[9.9, 49.9, 10.5, 50.5]).items()}
    assert by_bbox == {"a", "b", "c"}
    by_time = {i.id for i in client.search(collections=["harness-pg"], datetime="2024-03-01/2024-03-31").items()}
    assert by_time == {"a", "b", "d"}
    filtered = client.search(
        collections=["harness-pg"],
        bbox=[9.9, 49.9, 10.5, 50.5],
        filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]},
        filter_lang="cql2-json",
    )
    assert {i.id for i in filtered.items()} == {"a", "c"}
    text = client.search(collections=["harness-pg"], filter="eo:cloud_cover < 20", method="GET")
    assert {i.id for i in text.items()} == {"a", "c", "d"}


def test_rustac_search_bbox_datetime(rustac_server):
    from pystac_client import Client

    url = rustac_server([_collection("harness-rs")], [_item("harness-rs", *row) for row in ITEMS])
    client = Client.open(url)
    assert {i.id for i in client.search(collections=["harness-rs"], bbox=[9.9, 49.9, 10.5, 50.5]).items()} == {
        "a", "b", "c"}
    found = client.search(collections=["harness-rs"], datetime=[dt.datetime(2024, 3, 1, tzinfo=dt.UTC),
                                                                 dt.datetime(2024, 3, 31, tzinfo=dt.UTC)])
    assert {i.id for i in found.items()} == {"a", "b", "d"}


def test_ray_task_round_trip(ray_local):
    ray = ray_local

    @ray.remote
    def square(x: int) -> tuple[int, int]:
        import os

        return x * x, os.getpid()

    results = ray.get([square.remote(i) for i in range(4)])
    assert [r[0] for r in results] == [0, 1, 4, 9]
    assert all(pid != __import__("os").getpid() for _, pid in results)  # ran in worker processes
    assert ray.cluster_resources()["CPU"] == 2


def test_temp_dirs_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """A killed test run leaves its servers' temp dirs; the next start removes those whose process is gone."""
    import os
    import subprocess
    import sys
    import tempfile

    from tests.harness.servers import _owned_tempdir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"pgstac-{gone.stdout.strip()}-abc"
    alive = tmp_path / f"pgstac-{os.getppid()}-def"
    unnamed = tmp_path / "pgstac-xyz"  # not ours to judge: kept
    for path in (dead, alive, unnamed):
        (path / "data").mkdir(parents=True)
    new = _owned_tempdir("pgstac-")
    assert new.is_dir() and new.name.startswith(f"pgstac-{os.getpid()}-")
    assert not dead.exists() and alive.exists() and unnamed.exists()
