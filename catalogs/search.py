"""Lazy STAC search: a thin layer over pystac-client that yields :class:`~catalogs.scene.Scene` objects.

- Pages are fetched as the generator is consumed; nothing holds the whole result.
- Requests are retried with exponential backoff on 5xx answers, connection errors and timeouts.
- CQL2 filters may be given as text (``"eo:cloud_cover < 20"``) or JSON; text is converted to CQL2-JSON and sent by
  POST. When the API does not conform to the filter extension (``rustac serve``, some static APIs), the filter is
  evaluated client-side on each item instead and a warning is logged once per process.
- ``updated_since`` (for incremental runs) is sent as a text comparison on ``updated`` with a bound one second early
  (servers hold ``updated`` as a string; pgstac fails on a timestamp literal for it), and the exact condition
  ``updated >= T`` is always checked client-side.
- A client-side filter that cannot be *evaluated* on an item (a property of the wrong type, a timestamp that does
  not parse) is not taken as "no match": the item is counted (``stats["filter_errors"]``) and, with
  ``on_filter_error="yield"``, passed on with :data:`FILTER_ERROR_KEY` set so that a job records it as an ``errors``
  row. A property the item lacks (or holds as null) is a plain non-match, as CQL2 says.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import cql2
import pystac
from pystac_client import Client
from pystac_client.conformance import ConformanceClasses
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from requests.exceptions import RequestException
from urllib3.util.retry import Retry

from catalogs.errors import InvalidItem, SceneError, SearchError
from catalogs.hrefs import HrefPolicy
from catalogs.recipes import Recipe
from catalogs.scene import Scene

log = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)
FILTER_ERROR_KEY = "earthgpt:filter_error"  # set on an item whose client-side filter could not be evaluated
_warned_client_side: set[str] = set()

BBox = Sequence[float]


def _retry(retries: int, backoff: float) -> Retry:
    return Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # STAC searches are POSTs, and they are idempotent
        raise_on_status=True,
    )


def open_client(url: str, *, retries: int = 4, backoff: float = 0.5, timeout: float = 30.0) -> Client:
    """Open a STAC API with retries and a timeout.

    Args:
        url: The API root.
        retries: Retries per request (5xx, 429, connection errors, timeouts).
        backoff: Backoff factor in seconds (sleeps ``backoff * 2**n``).
        timeout: Seconds per request.

    Returns:
        The pystac-client ``Client``.

    Raises:
        SearchError: If the landing page cannot be read.
    """
    stac_io = StacApiIO(timeout=timeout, max_retries=_retry(retries, backoff))
    try:
        return Client.open(url, stac_io=stac_io, timeout=timeout)
    except (APIError, RequestException, pystac.STACError) as exc:
        raise SearchError(f"cannot open STAC API {url}: {exc}") from exc


def to_cql2_json(expr: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Normalise a CQL2 filter (text or JSON) to CQL2-JSON.

    Args:
        expr: ``"eo:cloud_cover < 20"`` or ``{"op": "<", "args": [...]}`` or None.

    Returns:
        The CQL2-JSON dict, or None.

    Raises:
        ValueError: If the expression does not parse.
    """
    if expr is None:
        return None
    try:
        parsed = cql2.Expr(expr if isinstance(expr, str) else dict(expr))
        parsed.validate()
    except Exception as exc:  # cql2 raises bare Exception on parse errors
        raise ValueError(f"invalid CQL2 filter {expr!r}: {exc}") from exc
    return dict(parsed.to_json())


def _timestamp(value: dt.datetime | str) -> str:
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _and(*parts: dict[str, Any] | None) -> dict[str, Any] | None:
    args = [p for p in parts if p]
    if not args:
        return None
    return args[0] if len(args) == 1 else {"op": "and", "args": args}


def _properties(expr: Any) -> set[str]:
    """The property names a CQL2-JSON expression reads."""
    if isinstance(expr, dict):
        if set(expr) == {"property"}:
            return {str(expr["property"])}
        return {name for v in expr.values() for name in _properties(v)}
    if isinstance(expr, list):
        return {name for v in expr for name in _properties(v)}
    return set()


_TOP_LEVEL = {"id", "collection", "geometry", "bbox"}


class FilterEvaluationError(ValueError):
    """A CQL2 filter could not be evaluated on an item whose properties are all present (a malformed value)."""


def _matches(expr: cql2.Expr, item: dict[str, Any], names: set[str]) -> bool:
    try:
        return bool(expr.matches(item))
    except Exception as exc:
        props = item.get("properties") or {}
        absent = [n for n in names if (item.get(n) if n in _TOP_LEVEL else props.get(n)) is None]
        if absent:  # a property the item lacks: CQL2 comparisons with null are not true
            return False
        raise FilterEvaluationError(
            f"CQL2 filter {expr.to_text()!r} cannot be evaluated on item {item.get('id')!r} "
            f"({', '.join(f'{n}={props.get(n, item.get(n))!r}' for n in sorted(names))}): {exc}"
        ) from exc


def search_items(
    url: str,
    *,
    collections: Sequence[str] | str | None = None,
    bbox: BBox | None = None,
    intersects: Mapping[str, Any] | Any | None = None,
    datetime: str | Sequence[str | dt.datetime | None] | dt.datetime | None = None,
    filter: str | Mapping[str, Any] | None = None,
    updated_since: dt.datetime | str | None = None,
    max_items: int | None = None,
    page_size: int = 100,
    ids: Sequence[str] | None = None,
    client: Client | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    timeout: float = 30.0,
    on_filter_error: str = "drop",
    stats: MutableMapping[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield STAC item dicts matching a search, one page at a time.

    Args:
        url: STAC API root (ignored if ``client`` is given).
        collections: Collection ids.
        bbox: ``[west, south, east, north]`` in WGS84.
        intersects: A GeoJSON geometry dict or anything with ``__geo_interface__`` (e.g. shapely).
        datetime: An RFC 3339 instant or interval (``"2024-01-01/2024-02-01"``), or a (start, end) pair.
        filter: CQL2 text or JSON on item properties (e.g. ``"eo:cloud_cover < 20"``).
        updated_since: Only items whose ``updated`` is at or after this time.
        max_items: Stop after this many matching items.
        page_size: Items per page requested from the API.
        ids: Only these item ids (the STAC ``ids`` parameter).
        client: An already opened client (from :func:`open_client`).
        retries: Retries per request.
        backoff: Backoff factor in seconds.
        timeout: Seconds per request.
        on_filter_error: An item the client-side filter cannot be evaluated on is counted and logged, then
            ``"drop"``-ped or ``"yield"``-ed with :data:`FILTER_ERROR_KEY` holding the reason.
        stats: Counters filled here: ``filter_errors``.

    Yields:
        Item dicts (as the API returned them).

    Raises:
        SearchError: When the API fails after the retries.
        ValueError: On an invalid filter.
    """
    if on_filter_error not in ("drop", "yield"):
        raise ValueError("on_filter_error must be 'drop' or 'yield'")
    stats = stats if stats is not None else {}
    stats.setdefault("filter_errors", 0)
    client = client or open_client(url, retries=retries, backoff=backoff, timeout=timeout)
    user_filter = to_cql2_json(filter)
    since = server_since = None
    if updated_since is not None:
        since = {"op": ">=", "args": [{"property": "updated"}, {"timestamp": _timestamp(updated_since)}]}
        # Servers hold `updated` as a string (pgstac compares it as text and fails on a timestamp literal):
        # send a text bound one second early, which never drops a match, and apply the exact test here.
        early = dt.datetime.fromisoformat(_timestamp(updated_since).replace("Z", "+00:00")) - dt.timedelta(seconds=1)
        server_since = {"op": ">=", "args": [{"property": "updated"}, early.strftime("%Y-%m-%dT%H:%M:%S")]}
    server_side = client.conforms_to(ConformanceClasses.FILTER)
    if (user_filter or since) and not server_side:
        root = client.get_self_href() or url
        if root not in _warned_client_side:
            _warned_client_side.add(root)
            log.warning(
                "STAC API %s does not conform to the filter extension: applying CQL2 filters client-side", root
            )
    # updated_since is always re-checked here: some servers compare timestamps as text.
    local = _and(None if server_side else user_filter, since)
    local_expr = cql2.Expr(local) if local else None
    local_names = _properties(local)
    geo = getattr(intersects, "__geo_interface__", None)
    if geo is not None:
        intersects = geo
    if isinstance(datetime, (list, tuple)):
        datetime = "/".join(_timestamp(d) if d is not None else ".." for d in datetime)
    kwargs: dict[str, Any] = {
        "collections": [collections] if isinstance(collections, str) else collections,
        "bbox": list(bbox) if bbox is not None else None,
        "intersects": intersects,
        "datetime": datetime,
        "ids": list(ids) if ids else None,
        "limit": page_size if max_items is None else min(page_size, max_items),
        "method": "POST",
    }
    if server_side and (user_filter or since):
        kwargs["filter"] = _and(user_filter, server_since)
        kwargs["filter_lang"] = "cql2-json"
    if local_expr is None:
        kwargs["max_items"] = max_items  # the server's count is the final count
    search = client.search(**{k: v for k, v in kwargs.items() if v is not None})
    yielded = 0
    try:
        for page in search.pages_as_dicts():
            for feature in page.get("features", []):
                if local_expr is not None:
                    try:
                        if not _matches(local_expr, feature, local_names):
                            continue
                    except FilterEvaluationError as exc:
                        stats["filter_errors"] += 1
                        log.warning("%s", exc)
                        if on_filter_error == "drop":
                            continue
                        feature = {**feature, FILTER_ERROR_KEY: str(exc)}
                yield feature
                yielded += 1
                if max_items is not None and yielded >= max_items:
                    return
    except (APIError, RequestException) as exc:
        raise SearchError(f"STAC search on {client.get_self_href() or url} failed: {exc}") from exc


def search_scenes(
    url: str,
    *,
    collections: Sequence[str] | str | None = None,
    bbox: BBox | None = None,
    intersects: Mapping[str, Any] | Any | None = None,
    datetime: str | Sequence[str | dt.datetime | None] | dt.datetime | None = None,
    filter: str | Mapping[str, Any] | None = None,
    updated_since: dt.datetime | str | None = None,
    max_items: int | None = None,
    page_size: int = 100,
    recipes: Mapping[str, Recipe] | None = None,
    href_policy: HrefPolicy | None = None,
    read_header_if_missing: bool = True,
    on_error: str = "raise",
    client: Client | None = None,
) -> Iterator[Scene | SceneError]:
    """Yield a :class:`Scene` for every item of a search, lazily.

    Args:
        url: STAC API root.
        collections: Collection ids.
        bbox: WGS84 bbox.
        intersects: GeoJSON geometry or shapely geometry.
        datetime: Instant or interval.
        filter: CQL2 text or JSON.
        updated_since: Only items updated at or after this time.
        max_items: Stop after this many items.
        page_size: Items per API page.
        recipes: Recipe table (default: built-in).
        href_policy: Allowed asset hrefs (default: remote only).
        read_header_if_missing: Read the grid from the asset header for items without ``proj:*``.
        on_error: ``"raise"`` to raise a bad item's :class:`SceneError`; ``"yield"`` to yield the error object
            instead (a job records it and goes on).
        client: An already opened client.

    Yields:
        Scenes (and, with ``on_error="yield"``, ``SceneError`` instances for items that cannot become scenes).
    """
    if on_error not in ("raise", "yield"):
        raise ValueError("on_error must be 'raise' or 'yield'")
    items = search_items(
        url, collections=collections, bbox=bbox, intersects=intersects, datetime=datetime, filter=filter,
        updated_since=updated_since, max_items=max_items, page_size=page_size, client=client,
        on_filter_error="yield",
    )
    for item in items:
        try:
            if FILTER_ERROR_KEY in item:
                raise InvalidItem(str(item[FILTER_ERROR_KEY]), item_id=item.get("id"), stage="search")
            yield Scene.from_item(
                item, recipes=recipes, href_policy=href_policy, read_header_if_missing=read_header_if_missing
            )
        except SceneError as exc:
            exc.item_id = exc.item_id or item.get("id")
            if on_error == "raise":
                raise
            yield exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # a malformed item from a catalog nobody here controls (e.g. `updated: "not-a-date"`) is a bad item,
            # never the end of the search
            error = InvalidItem(f"item {item.get('id')!r} is malformed: {type(exc).__name__}: {str(exc)[:500]}",
                                item_id=item.get("id"))
            if on_error == "raise":
                raise error from exc
            yield error
