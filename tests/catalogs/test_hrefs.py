"""Href safety: a catalog is untrusted input."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalogs.errors import HrefNotAllowed
from catalogs.hrefs import HrefPolicy, normalize_href, redact_text, redact_url, to_gdal_path


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


@pytest.mark.parametrize(
    "href",
    [
        "file:///vsicurl/https://evil.example/x.tif",  # a GDAL virtual path dressed as a file URL
        "file:///vsis3/other-bucket/x.tif",
        "/vsizip//data/x.zip/x.tif",
        "/vsicurl?url=https://evil.example/x.tif",
    ],
)
def test_gdal_virtual_paths_refused_in_any_form(href: str, tmp_path: Path) -> None:
    policy = HrefPolicy.for_roots(tmp_path, "/", "s3://toy")
    with pytest.raises(HrefNotAllowed, match="GDAL virtual paths"):
        policy.check(href, item_id="it", asset="red")


def test_dot_segments_refused_for_local_and_remote(tmp_path: Path) -> None:
    root = tmp_path / "cogs"
    root.mkdir()
    policy = HrefPolicy.for_roots(root, "https://data.example/cogs")
    for bad in (f"{root}/../secret.tif", f"{root.as_uri()}/%2e%2e/secret.tif",
                "https://data.example/cogs/../private/x.tif",
                "https://data.example/cogs/%2e%2e/private/x.tif",  # a server may decode %2e%2e into ..
                "https://data.example/cogs/a%2F..%2F..%2Fprivate/x.tif"):
        with pytest.raises(HrefNotAllowed) as err:
            policy.check(bad, item_id="it", asset="red")
        assert err.value.record()["error_type"] == "HrefNotAllowed"


def test_symlink_out_of_an_allowed_root_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "cogs", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"II*\0")
    (root / "inside.tif").write_bytes(b"II*\0")
    (root / "link.tif").symlink_to(outside / "secret.tif")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    (root / "alias.tif").symlink_to(root / "inside.tif")  # a link that stays inside is fine
    policy = HrefPolicy.for_roots(root)
    assert policy.check(str(root / "inside.tif")) == (root / "inside.tif").as_uri()
    assert policy.check(str(root / "alias.tif")) == (root / "alias.tif").as_uri()
    for bad in (root / "link.tif", root / "linkdir" / "secret.tif"):
        with pytest.raises(HrefNotAllowed, match="symlink") as err:
            policy.check(str(bad), item_id="it", asset="red")
        assert err.value.item_id == "it"


def test_credentials_in_hrefs_refused_and_never_repeated() -> None:
    policy = HrefPolicy()
    with pytest.raises(HrefNotAllowed, match="credentials") as err:
        policy.check("https://user:hunter2-secret@data.example/x.tif", item_id="it", asset="red")
    assert "hunter2-secret" not in str(err.value) and "hunter2-secret" not in str(err.value.record())
    with pytest.raises(HrefNotAllowed) as err:  # refused for its scheme: the signature is still not repeated
        policy.check("ftp://data.example/x.tif?sig=hunter2-secret", item_id="it", asset="red")
    assert "hunter2-secret" not in str(err.value.record())


def test_redaction() -> None:
    assert redact_url("https://u:p@h.example/a/x.tif?sig=abc&se=2024&flag") == \
        "https://***@h.example/a/x.tif?sig=***&se=***&***"
    assert redact_url("s3://bucket/key.tif") == "s3://bucket/key.tif"
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-planted", "AWS_REGION": "us-west-2", "MY_TOKEN": "1"}
    text = ("'/vsicurl/https://h.example/x.tif?X-Amz-Signature=deadbeef' not recognized; "
            "key wJalrXUtnFEMI-planted in us-west-2")
    out = redact_text(text, env)
    assert "deadbeef" not in out and "wJalrXUtnFEMI-planted" not in out
    assert "X-Amz-Signature=***" in out and "us-west-2" in out
