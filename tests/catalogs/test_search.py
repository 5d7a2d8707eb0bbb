"""Search against real STAC APIs: stac-fastapi-pgstac (full CQL2) and rustac (no filter extension)."""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from shapely.geometry import box, shape

from catalogs import search as search_module
from catalogs.errors import HrefNotAllowed, SceneError, SearchError
from catalogs.scene import Scene
from catalogs.search import search_items, search_scenes, to_cql2_json
from tests.catalogs.proxy import CountingProxy

pytestmark = pytest.mark.integration

SUFFIX = "-s7"  # the session toy world's seed: other tests may load their own items into the shared server


def mine(items: list[dict[str, Any]]) -> set[str]:
    return {i["id"] for i in items if i["id"].endswith(SUFFIX)}


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in items}


@pytest.fixture(scope="module")
def pg(pgstac, toy_items, toy_collections) -> str:  # noqa: ANN001
    pgstac.load_collections(toy_collections)
    pgstac.load_items(toy_items)
    return pgstac.url


@pytest.fixture(scope="module")
def rustac_url(rustac_server, toy_items, toy_collections) -> str:  # noqa: ANN001
    return rustac_server(toy_collections, toy_items)


def test_cql2_text_becomes_json() -> None:
    assert to_cql2_json("eo:cloud_cover < 20") == {"op": "<", "args": [{"property": "eo:cloud_cover"}, 20.0]}
    with pytest.raises(ValueError):
        to_cql2_json("eo:cloud_cover <")


def test_collection_search(pg: str, toy_items: list[dict]) -> None:
    got = list(search_items(pg, collections=["toyworld-optical"]))
    assert mine(got) == {i["id"] for i in toy_items if i["collection"] == "toyworld-optical"}
    assert all(i["collection"] == "toyworld-optical" for i in got)


def test_bbox_search_finds_the_southern_scene(pg: str, toy_items: list[dict]) -> None:
    south = [i for i in toy_items if i["properties"]["proj:code"].startswith("EPSG:327")]
    assert south, "the toy world has scenes in the southern hemisphere"
    target = south[0]
    footprint = shape(target["geometry"])
    probe = footprint.centroid.buffer(0.001).bounds
    got = list(search_items(pg, bbox=probe))
    assert mine(got) == {target["id"]}
    assert all(shape(i["geometry"]).intersects(box(*probe)) for i in got)


def test_datetime_search(pg: str, toy_items: list[dict]) -> None:
    target = toy_items[3]
    when = dt.datetime.fromisoformat(target["properties"]["datetime"].replace("Z", "+00:00"))
    got = list(search_items(pg, datetime=(when - dt.timedelta(hours=1), when + dt.timedelta(hours=1))))
    assert mine(got) == {target["id"]}
    got = list(search_items(pg, datetime=f"{when.date()}T00:00:00Z/..", collections=[target["collection"]]))
    expected = {i["id"] for i in toy_items if i["collection"] == target["collection"]
                and i["properties"]["datetime"] >= f"{when.date()}T00:00:00"}
    assert mine(got) == expected


@pytest.mark.parametrize("expr", ["eo:cloud_cover < 20", {"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]}])
def test_cql2_filter_server_side(pg: str, toy_items: list[dict], expr: Any) -> None:
    colls = ["toyworld-optical", "toyworld-thermal"]
    got = list(search_items(pg, collections=colls, filter=expr))
    expected = {i["id"] for i in toy_items if i["properties"].get("eo:cloud_cover", 100) < 20}
    assert len(expected) == 2  # one optical, one thermal
    assert mine(got) == expected
    assert all(i["properties"]["eo:cloud_cover"] < 20 for i in got)


def test_updated_since(pg: str, pgstac, toy_items: list[dict]) -> None:  # noqa: ANN001
    changed = copy.deepcopy(toy_items[4])
    changed["properties"]["updated"] = "2030-01-01T00:00:00Z"
    pgstac.load_items([changed])
    try:
        got = list(search_items(pg, updated_since=dt.datetime(2029, 6, 1, tzinfo=dt.timezone.utc)))
        assert mine(got) == {changed["id"]}
        got = list(search_items(pg, updated_since="2020-01-01T00:00:00Z", collections=[changed["collection"]]))
        assert changed["id"] in mine(got) and len(mine(got)) == 2
    finally:
        pgstac.load_items([toy_items[4]])


def test_max_items_and_scenes(pg: str, toyworld) -> None:  # noqa: ANN001
    got = list(search_items(pg, collections=["toyworld-sar"], max_items=1, page_size=1))
    assert len(got) == 1
    scenes = list(search_scenes(pg, collections=["toyworld-thermal", "toyworld-sar"], filter="id LIKE '%-s7'",
                                href_policy=toyworld.href_policy()))
    assert {s.sensor for s in scenes} == {"thermal", "sar"} and len(scenes) == 4
    assert all(isinstance(s, Scene) and s.crs and s.crs.startswith("EPSG:32") for s in scenes)


def test_client_side_filter_when_api_lacks_it(rustac_url: str, toy_items: list[dict],
                                              caplog: pytest.LogCaptureFixture) -> None:
    search_module._warned_client_side.clear()
    expected = {i["id"] for i in toy_items if i["properties"].get("eo:cloud_cover", 100) < 20}
    with caplog.at_level(logging.WARNING, logger="catalogs.search"):
        got = list(search_items(rustac_url, filter="eo:cloud_cover < 20"))
        again = list(search_items(rustac_url, filter="eo:cloud_cover < 20", max_items=1))
    assert {i["id"] for i in got} == expected
    assert len(again) == 1 and again[0]["id"] in expected
    warnings = [r for r in caplog.records if "client-side" in r.getMessage()]
    assert len(warnings) == 1  # said once
    got = list(search_items(rustac_url, updated_since="2030-01-01T00:00:00Z"))
    assert got == []


def test_a_filter_that_cannot_be_evaluated_is_counted_and_recorded_not_a_silent_non_match(
        rustac_server, toy_items: list[dict], toy_collections: list[dict], toyworld) -> None:  # noqa: ANN001
    wrong_type = copy.deepcopy(toy_items[0])
    wrong_type["id"] = "cloud-cover-as-text"
    wrong_type["properties"]["eo:cloud_cover"] = "cloudy"
    bad_updated = copy.deepcopy(toy_items[3])  # optical: it has eo:cloud_cover
    bad_updated["id"] = "updated-not-a-date"
    bad_updated["properties"]["updated"] = "not-a-date"
    absent = copy.deepcopy(toy_items[2])
    absent["id"] = "no-cloud-cover"
    absent["properties"].pop("eo:cloud_cover", None)
    url = rustac_server(toy_collections, [wrong_type, bad_updated, absent])  # rustac: filters run client-side
    stats: dict[str, int] = {}
    dropped = list(search_items(url, filter="eo:cloud_cover < 101", stats=stats))
    assert {i["id"] for i in dropped} == {"updated-not-a-date"} and stats["filter_errors"] == 1
    kept = list(search_items(url, filter="eo:cloud_cover < 101", on_filter_error="yield"))
    flagged = {i["id"]: i.get(search_module.FILTER_ERROR_KEY) for i in kept}
    assert set(flagged) == {"cloud-cover-as-text", "updated-not-a-date"}  # the absent property: a plain non-match
    assert "cloudy" in flagged["cloud-cover-as-text"] and flagged["updated-not-a-date"] is None
    stats = {}
    since = list(search_items(url, updated_since="2020-01-01T00:00:00Z", on_filter_error="yield", stats=stats))
    assert stats["filter_errors"] == 1
    assert "not-a-date" in next(i for i in since if i["id"] == "updated-not-a-date")[search_module.FILTER_ERROR_KEY]
    scenes = list(search_scenes(url, filter="eo:cloud_cover < 101", on_error="yield",
                                href_policy=toyworld.href_policy()))
    errors = [s for s in scenes if isinstance(s, SceneError)]
    assert [(e.item_id, e.error_type, e.stage) for e in errors] == [("cloud-cover-as-text", "InvalidItem", "search"),
                                                                    ("updated-not-a-date", "InvalidItem", "scene")]
    assert "not-a-date" in errors[1].message


def test_pages_are_fetched_lazily(rustac_url: str) -> None:
    proxy = CountingProxy(rustac_url)
    try:
        items: Iterator[dict] = search_items(proxy.url, page_size=2)
        opened = len(proxy.requests)
        assert opened == 0  # a generator: nothing happens before the first next()
        first = [next(items), next(items)]
        after_first_page = len([r for r in proxy.requests if "search" in r[1]])
        next(items)
        after_second_page = len([r for r in proxy.requests if "search" in r[1]])
        assert len(first) == 2
        assert (after_first_page, after_second_page) == (1, 2)
    finally:
        proxy.stop()


def test_retries_on_5xx(rustac_url: str, toy_items: list[dict]) -> None:
    proxy = CountingProxy(rustac_url, fail_first=2, fail_status=503)
    try:
        got = list(search_items(proxy.url, backoff=0.01))
        assert {i["id"] for i in got} == {i["id"] for i in toy_items}
        assert [r[2] for r in proxy.requests[:3]] == [503, 503, 200]
    finally:
        proxy.stop()
    proxy = CountingProxy(rustac_url, fail_first=1000, fail_status=502)
    try:
        with pytest.raises(SearchError):
            list(search_items(proxy.url, retries=2, backoff=0.01))
        assert len(proxy.requests) == 3  # one try and two retries
    finally:
        proxy.stop()


def test_retries_on_timeouts(rustac_url: str, toy_items: list[dict]) -> None:
    proxy = CountingProxy(rustac_url, stall_first=2, stall_s=1.5)
    try:
        got = list(search_items(proxy.url, timeout=0.5, backoff=0.01))
        assert {i["id"] for i in got} == {i["id"] for i in toy_items}
        assert [r[2] for r in proxy.requests[:3]] == [0, 0, 200]
    finally:
        proxy.stop()


def test_bad_items_are_yielded_as_errors(rustac_server, toy_items: list[dict], toy_collections: list[dict],  # noqa: ANN001
                                         toyworld) -> None:  # noqa: ANN001
    bad = copy.deepcopy(toy_items[2])
    bad["id"] = "evil-item"
    bad["assets"]["lwir11"]["href"] = "file:///etc/passwd"
    url = rustac_server(toy_collections, [*toy_items, bad])
    out = list(search_scenes(url, on_error="yield", href_policy=toyworld.href_policy()))
    errors = [o for o in out if isinstance(o, SceneError)]
    assert len(out) == len(toy_items) + 1
    assert len(errors) == 1 and isinstance(errors[0], HrefNotAllowed) and errors[0].item_id == "evil-item"
    with pytest.raises(HrefNotAllowed):
        list(search_scenes(url, href_policy=toyworld.href_policy()))
