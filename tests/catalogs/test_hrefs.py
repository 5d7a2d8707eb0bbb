"""Href safety: a catalog is untrusted input."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalogs.errors import HrefNotAllowed
from catalogs.hrefs import HrefPolicy, normalize_href, to_gdal_path


def test_default_policy() -> None:
    policy = HrefPolicy()
    assert policy.check("s3://bucket/a/b.tif") == "s3://bucket/a/b.tif"
    assert policy.check("https://host/x.tif") == "https://host/x.tif"
    for bad in ("file:///etc/passwd", "/etc/passwd", "etc/passwd", "http://host/x.tif", "ftp://h/x"):
        with pytest.raises(HrefNotAllowed):
            policy.check(bad, item_id="it", asset="red")


@pytest.mark.parametrize(
    "href",
    [
        "s3://other-bucket/world/x.tif",
        "s3://toy-evil/world/x.tif",  # prefix match is on a path boundary
        "s3://toy/world/../secret/x.tif",  # .. is collapsed before the check
        "s3://toy/worldwide/x.tif",
        "/vsicurl/https://toy/world/x.tif",  # GDAL virtual paths are not hrefs
        "",
    ],
)
def test_prefix_policy_refuses(href: str) -> None:
    policy = HrefPolicy.for_roots("s3://toy/world")
    with pytest.raises(HrefNotAllowed) as err:
        policy.check(href, item_id="item-1", asset="vv")
    assert err.value.item_id == "item-1"
    assert err.value.record()["error_type"] == "HrefNotAllowed"


def test_prefix_policy_allows_and_normalises() -> None:
    policy = HrefPolicy.for_roots("s3://toy/world")
    assert policy.check("s3://toy/world/./cogs/a.tif") == "s3://toy/world/cogs/a.tif"


def test_local_roots(tmp_path: Path) -> None:
    policy = HrefPolicy.for_roots(tmp_path)
    inside = tmp_path / "cogs" / "a.tif"
    assert policy.check(str(inside)) == inside.as_uri()
    assert policy.check(inside.as_uri()) == inside.as_uri()
    with pytest.raises(HrefNotAllowed):
        policy.check(str(tmp_path / ".." / "x.tif"))
    with pytest.raises(HrefNotAllowed):
        policy.check("s3://bucket/x.tif")  # only the roots' schemes


def test_to_gdal_path() -> None:
    assert to_gdal_path("s3://b/k/x.tif") == "/vsis3/b/k/x.tif"
    assert to_gdal_path("file:///data/x.tif") == "/data/x.tif"
    assert to_gdal_path("https://h/p/x.tif") == "/vsicurl/https://h/p/x.tif"
    assert normalize_href("file:///data/a/../x.tif") == "file:///data/x.tif"
