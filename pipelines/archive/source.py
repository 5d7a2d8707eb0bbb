"""Where a run's scenes come from: a STAC search split into disjoint sub-searches, each paged by its own read task.

Nothing here holds the whole item list. The driver asks the API one cheap question — how many items match
(``numberMatched``) and over which time span (``sortby`` on ``datetime``) — and cuts the search into datetime
windows of about ``items_per_task`` items each. Each window becomes one Ray Data read task that pages its own
sub-search, drops what is already committed (the ledger's index, shared once through the object store and cut to the
window's dates), turns items into scenes — reading headers for items without ``proj:*`` there, never in the driver —
and yields small blocks of scene rows. Ray Data's streaming executor starts read tasks only as fast as the model
consumes their scenes, so a 10^7-item search never sits in memory anywhere.

Windows are half-open ``[start, end)`` on an item's own time (``datetime``, else ``start_datetime``): the API's
interval test is inclusive and a ranged item overlaps several windows, so each read task keeps only items whose own
time falls in its window. An item whose time cannot be read is kept by the first window and becomes an error row.

Incremental runs add ``updated >= watermark`` to the search (server-side through the CQL2 filter extension where the
API has it; the search falls back to listing everything and testing client-side, with a warning, where it does not)
and one more read task that fetches, by id, the scenes that failed in earlier runs.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import shapely

from catalogs.errors import InvalidItem, SceneError
from catalogs.hrefs import HrefPolicy
from catalogs.scene import Scene
from catalogs.search import FILTER_ERROR_KEY

log = logging.getLogger(__name__)

_DateTime = datetime  # SearchSpec has a field named `datetime` (the STAC parameter)

SCENE_COLUMNS = (
    "scene_key", "scene", "meta", "error_stage", "error_type", "error_message", "error_asset", "error_href",
)
_BLOCK_SCENES = 8  # scenes per block a read task yields: small, so the first tiles reach the model early
_INDEX_CHUNK = 512  # items whose ledger entries a read task looks up at once, at first (see _PagedIndex)
_INDEX_CHUNK_MAX = 8192  # ... and at most


def scene_key(collection: str, scene_id: str) -> str:
    """The id a scene's rows carry through the stages: ``<collection>/<scene_id>``."""
    return f"{collection}/{scene_id}"


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp as an aware UTC datetime; ``None`` for a missing value.

    Raises:
        ValueError: For a value that is present but not a timestamp.
    """
    if value is None or value == "":
        return None
    t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def item_time(item: Mapping[str, Any]) -> datetime | None:
    """An item's own time: ``datetime``, else ``start_datetime``."""
    props = item.get("properties") or {}
    return parse_time(props.get("datetime") or props.get("start_datetime"))


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class SearchSpec:
    """One STAC search, as plain values (what every read task needs to page its part of it).

    Attributes:
        url: STAC API root.
        collections: Collection ids.
        bbox: WGS84 bbox, or None.
        intersects: GeoJSON geometry, or None.
        datetime: The user's datetime interval (``a/b``, ``../b``), or None.
        filter: CQL2 (text or JSON), or None.
        updated_since: Only items updated at or after this (the watermark), or None for a full listing.
        page_size: Items per page.
        source_id: What identifies the catalog across runs (default: ``url``; the embedded catalog's items file,
            whose server URL changes every run).
    """

    url: str
    collections: tuple[str, ...]
    bbox: tuple[float, float, float, float] | None = None
    intersects: dict[str, Any] | None = None
    datetime: str | None = None
    filter: dict[str, Any] | str | None = None
    updated_since: _DateTime | None = None
    page_size: int = 100
    source_id: str = ""

    def search_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`catalogs.search.search_items` for the whole search."""
        return {
            "collections": list(self.collections), "bbox": self.bbox, "intersects": self.intersects,
            "datetime": self.datetime, "filter": self.filter, "updated_since": self.updated_since,
            "page_size": self.page_size,
        }

    def fingerprint(self) -> str:
        """What identifies the search for its watermark (everything but ``updated_since`` and paging)."""
        return json.dumps(
            {"url": self.source_id or self.url, "collections": sorted(self.collections), "bbox": self.bbox,
             "intersects": self.intersects, "datetime": self.datetime, "filter": self.filter},
            sort_keys=True, default=str,
        )


@dataclass(frozen=True)
class Window:
    """One read task's part of the search: items whose own time is in ``[start, end)`` (None: unbounded), or, for
    a retry task, the items with the given ids."""

    start: datetime | None = None
    end: datetime | None = None
    ids: tuple[str, ...] = ()
    collection: str = ""

    def contains(self, t: datetime | None) -> bool:
        """Whether an item with own time ``t`` belongs here (an unreadable time belongs to the first window)."""
        if t is None:
            return self.start is None
        return (self.start is None or t >= self.start) and (self.end is None or t < self.end)

    def datetime_param(self, user: str | None) -> str | None:
        """The sub-search's datetime: this window intersected with the user's interval (inclusive bounds)."""
        lo, hi = _interval(user)
        start = max((t for t in (lo, self.start) if t is not None), default=None)
        end = min((t for t in (hi, self.end) if t is not None), default=None)
        if start is None and end is None:
            return None
        return f"{_iso(start) or '..'}/{_iso(end) or '..'}"


def _interval(value: str | None) -> tuple[datetime | None, datetime | None]:
    if not value:
        return None, None
    parts = value.split("/")
    if len(parts) == 1:
        t = parse_time(parts[0])
        return t, t
    lo = None if parts[0] in ("", "..") else parse_time(parts[0])
    hi = None if parts[1] in ("", "..") else parse_time(parts[1])
    return lo, hi


@dataclass
class SourcePlan:
    """How a run's search was split (printed, and recorded in the ``runs`` row)."""

    windows: list[Window]
    matched: int | None
    span: tuple[datetime | None, datetime | None] = (None, None)
    requests: int = 0
    notes: list[str] = field(default_factory=list)


def plan_windows(spec: SearchSpec, items_per_task: int, max_tasks: int, client: Any = None) -> SourcePlan:
    """Split a search into disjoint datetime windows of about ``items_per_task`` items (at most ``max_tasks``).

    Two or three small requests: ``numberMatched`` of the search, then (when it needs splitting) its earliest and
    latest item by ``sortby=datetime``. An API that reports no count, or cannot sort, gets one window.

    Args:
        spec: The search.
        items_per_task: Target items per window.
        max_tasks: Most windows.
        client: An open pystac-client ``Client`` (opened here otherwise).

    Returns:
        The plan; its windows cover all time exactly once.
    """
    from catalogs.search import open_client

    client = client or open_client(spec.url)
    plan = SourcePlan(windows=[Window()], matched=None)
    kwargs = _client_kwargs(spec)
    try:
        plan.requests += 1
        with warnings.catch_warnings():  # an API without counts is expected here, and handled
            warnings.filterwarnings("ignore", message="numberMatched or context.matched not in response")
            plan.matched = client.search(**kwargs, limit=1, max_items=1).matched()
    except Exception as exc:  # an API without counts is common: one window then
        plan.notes.append(f"numberMatched unavailable ({type(exc).__name__}); one read task")
        return plan
    if plan.matched is None:
        plan.notes.append("the API reports no numberMatched; one read task")
        return plan
    n = min(max_tasks, max(1, math.ceil(plan.matched / max(1, items_per_task))))
    if n == 1:
        return plan
    lo, hi = _interval(spec.datetime)
    try:
        if lo is None:
            plan.requests += 1
            lo = _edge_time(client, kwargs, "asc")
        if hi is None:
            plan.requests += 1
            hi = _edge_time(client, kwargs, "desc")
    except Exception as exc:
        plan.notes.append(f"cannot sort by datetime ({type(exc).__name__}: {exc}); one read task")
        return plan
    if lo is None or hi is None or hi <= lo:
        plan.notes.append("no time span to split; one read task")
        return plan
    plan.span = (lo, hi)
    step = (hi - lo) / n
    cuts = [lo + step * k for k in range(1, n)]
    cuts = sorted({c.replace(microsecond=c.microsecond) for c in cuts})
    bounds: list[datetime | None] = [None, *cuts, None]
    plan.windows = [Window(start=bounds[k], end=bounds[k + 1]) for k in range(len(bounds) - 1)]
    return plan


def _client_kwargs(spec: SearchSpec) -> dict[str, Any]:
    from catalogs.search import _and, _timestamp, to_cql2_json

    kwargs: dict[str, Any] = {"collections": list(spec.collections), "method": "POST"}
    if spec.bbox is not None:
        kwargs["bbox"] = list(spec.bbox)
    if spec.intersects is not None:
        kwargs["intersects"] = spec.intersects
    if spec.datetime:
        kwargs["datetime"] = spec.datetime
    filt = to_cql2_json(spec.filter)
    if spec.updated_since is not None:
        early = parse_time(_timestamp(spec.updated_since))
        assert early is not None
        bound = (early - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
        filt = _and(filt, {"op": ">=", "args": [{"property": "updated"}, bound]})
    if filt is not None:
        kwargs["filter"] = filt
        kwargs["filter_lang"] = "cql2-json"
    return kwargs


def _edge_time(client: Any, kwargs: dict[str, Any], direction: str) -> datetime | None:
    # asked even where the landing page does not announce the sort extension (stac-fastapi-pgstac sorts without
    # saying so): an API that ignores sortby only makes the windows uneven, never wrong, since the first and last
    # windows are unbounded
    search = client.search(**kwargs, limit=1, max_items=1,
                           sortby=[{"field": "properties.datetime", "direction": direction}])
    for item in search.items_as_dicts():
        return item_time(item)
    return None


# ------------------------------------------------------------------------------------------------- the read task


def _missing_fields(item: Mapping[str, Any]) -> list[str]:
    """The fields the STAC item spec requires that the item lacks (``geometry`` may be null, not absent; an item
    needs ``datetime`` or both ``start_datetime`` and ``end_datetime``)."""
    missing = [f for f in ("id", "geometry", "properties", "assets") if f not in item]
    props = item.get("properties")
    if isinstance(props, Mapping) and props.get("datetime") is None and not (
            props.get("start_datetime") and props.get("end_datetime")):
        missing.append("properties.datetime (or start_datetime and end_datetime)")
    elif props is not None and not isinstance(props, Mapping):
        missing.append("properties (an object)")
    assets = item.get("assets")
    if isinstance(assets, Mapping):
        missing += [f"assets.{key}.href" for key, asset in assets.items()
                    if not isinstance(asset, Mapping) or not asset.get("href")]
    return missing


def _meta(item: Mapping[str, Any], prev: tuple[str, str] | None) -> dict[str, Any]:
    """What the rest of the job needs of an item that did not become a scene, plus its superseded version."""
    props = item.get("properties") or {}
    try:
        t = _iso(item_time(item))
    except (ValueError, TypeError):
        t = None
    try:
        updated = _iso(parse_time(props.get("updated")))
    except (ValueError, TypeError):
        updated = None
    geometry = item.get("geometry")
    try:
        if geometry is not None:
            shapely.geometry.shape(geometry)
    except Exception:
        geometry = None
    return {
        "collection": str(item.get("collection") or ""), "id": str(item.get("id") or ""), "datetime": t,
        "updated": updated, "geometry": geometry, "prev_date": prev[0] if prev else None,
        "prev_unit": prev[1] if prev else None,
    }


def read_window(
    spec: SearchSpec,
    window: Window,
    committed: pa.Table | None,
    href_policy: HrefPolicy,
    *,
    retry_after: datetime | None = None,
    quarantined: Mapping[str, Any] | None = None,
) -> Iterator[tuple[pa.Table | None, dict[str, Any]]]:
    """Page one window's sub-search and yield blocks of scene rows, then the window's counters.

    Args:
        spec: The whole search.
        window: This task's part.
        committed: The ledger index (``collection, scene_id, date, updated, unit_id``) for the output key.
        href_policy: Which asset hrefs may be read.
        retry_after: For a retry window: items updated at or after this are left to the incremental windows.
        quarantined: ``scene_key -> {"updated": ...}`` of quarantined scenes (see :func:`scene_rows`).

    Yields:
        ``(block, {})`` for each block of :data:`SCENE_COLUMNS` rows, then ``(None, counters)`` once.
    """
    from catalogs.search import search_items

    search_stats: dict[str, int] = {}
    if window.ids:
        items = search_items(spec.url, collections=[window.collection] if window.collection
                             else list(spec.collections), ids=list(window.ids), page_size=spec.page_size,
                             on_filter_error="yield", stats=search_stats)
    else:
        kwargs = spec.search_kwargs()
        kwargs["datetime"] = window.datetime_param(spec.datetime)
        items = search_items(spec.url, **kwargs, on_filter_error="yield", stats=search_stats)
    counts: dict[str, Any] = {}
    index = _PagedIndex(_window_table(committed, window))
    for block in scene_rows(index.track(items), window, index, href_policy, counts,
                            retry_after=retry_after, quarantined=quarantined):
        yield block, {}
    counts["filter_errors"] = search_stats.get("filter_errors", 0)
    yield None, counts


def scene_rows(
    items: Iterable[Mapping[str, Any]],
    window: Window,
    index: Mapping[tuple[str, str], Any],
    href_policy: HrefPolicy,
    counts: dict[str, Any],
    *,
    retry_after: datetime | None = None,
    block_scenes: int = _BLOCK_SCENES,
    build_scenes: bool = True,
    quarantined: Mapping[str, Any] | None = None,
) -> Iterator[pa.Table]:
    """Items → blocks of scene rows: keep the window's own items, drop repeats and committed scenes, turn the rest
    into scenes. An item that cannot become one (no asset, a refused href, no id, a timestamp that does not parse,
    any other malformation) becomes a row with its error set: recorded by the job, never a crash.

    Args:
        items: STAC item dicts, lazily.
        window: The read task's window (its items only are kept).
        index: ``(collection, scene_id) -> CommittedScene`` of committed scenes that may be in this window.
        href_policy: Which asset hrefs may be read.
        counts: Filled with ``matched``, ``skipped``, ``planned``, ``failed_items``, ``max_updated``,
            ``skip_reasons``, ``seen_retry``.
        retry_after: For a retry window: items updated at or after this are left to the incremental windows.
        block_scenes: Rows per block.
        build_scenes: Build each item's scene (``False``: only decide which items need work).
        quarantined: ``scene_key -> {"updated": ...}``: scenes that failed too many runs in a row; skipped
            (reason ``quarantined``) until the item's ``updated`` changes. A retry window (by ids) processes its
            scenes whatever the ledger and the quarantine say: it is how failed tiles of a committed scene and
            ``--retry-quarantined`` are tried again (the new version supersedes the committed one).

    Yields:
        Arrow tables of :data:`SCENE_COLUMNS`.
    """
    from pipelines.archive.ledger import skip_reason

    counts.update({"matched": 0, "skipped": 0, "planned": 0, "failed_items": 0, "max_updated": None,
                   "skip_reasons": Counter(), "seen_retry": []})
    quarantined = quarantined or {}
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    for item in items:
        try:
            own_time: datetime | None = item_time(item)
            time_error = None
        except (ValueError, TypeError) as exc:
            own_time, time_error = None, exc
        if not window.ids and not window.contains(own_time):
            continue  # another window's item (inclusive API bounds, ranged items)
        collection, item_id = str(item.get("collection") or ""), str(item.get("id") or "")
        key = scene_key(collection, item_id)
        if key in seen:  # a catalog may list an item twice (paging under concurrent writes)
            continue
        seen.add(key)
        counts["matched"] += 1
        if window.ids:
            counts["seen_retry"].append(key)
        try:
            updated = parse_time((item.get("properties") or {}).get("updated"))
            updated_error = None
        except (ValueError, TypeError) as exc:
            updated, updated_error = None, exc
        if updated is not None and (counts["max_updated"] is None or updated > counts["max_updated"]):
            counts["max_updated"] = updated
        if window.ids and retry_after is not None and updated is not None and updated >= retry_after:
            continue  # listed by the incremental windows of this run
        prev = index.get((collection, item_id))
        reason = skip_reason(prev, updated) if prev is not None and not window.ids else None
        held = quarantined.get(key)
        if held is not None and not window.ids and _iso(updated) == (held.get("updated") or None):
            reason = f"quarantined (failed {held.get('attempts', '?')} runs in a row; --retry-quarantined)"
        if reason:
            counts["skipped"] += 1
            counts["skip_reasons"][reason.split(" (")[0]] += 1
            continue
        prev_ref = (prev.date, prev.unit_id) if prev is not None else None
        row = dict.fromkeys(SCENE_COLUMNS, "")
        row["scene_key"] = key
        try:
            if not item_id:
                raise InvalidItem("item has no id")
            missing = _missing_fields(item)
            if missing:
                raise InvalidItem(f"item {item_id}: missing required STAC field(s): {', '.join(missing)}")
            if time_error is not None:
                raise InvalidItem(f"item {item_id}: unreadable datetime ({time_error})")
            if updated_error is not None:
                raise InvalidItem(f"item {item_id}: unreadable updated "
                                  f"{(item.get('properties') or {}).get('updated')!r} ({updated_error})")
            if FILTER_ERROR_KEY in item:
                raise InvalidItem(str(item[FILTER_ERROR_KEY]), item_id=item_id, stage="search")
            if build_scenes:
                row["scene"] = Scene.from_item(dict(item), href_policy=href_policy).model_dump_json()
            counts["planned"] += 1
        except SceneError as exc:
            row.update(error_stage=exc.stage or "scene", error_type=exc.error_type, error_message=exc.message,
                       error_asset=exc.asset or "", error_href=exc.href or "")
            counts["failed_items"] += 1
        except Exception as exc:  # a malformed item from a catalog we do not control must not stop the run
            row.update(error_stage="scene", error_type="InvalidItem",
                       error_message=f"{type(exc).__name__}: {str(exc)[:500]}")
            counts["failed_items"] += 1
        row["meta"] = json.dumps(_meta(item, prev_ref))
        rows.append(row)
        if len(rows) >= block_scenes:
            yield pa.Table.from_pylist(rows, schema=scene_rows_schema())
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=scene_rows_schema())


def small_search_counts(spec: SearchSpec, lookup: Callable[[list[str], list[str]], pa.Table | None],
                        href_policy: HrefPolicy,
                        client: Any = None, quarantined: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """List a search known to fit in one page here, and count what a run would do with it (nothing is built).

    The nightly run of a quiet catalog matches a handful of items, usually all committed already (the search is
    inclusive at the watermark): answering that from one page in the driver spares starting Ray and loading the
    model for nothing. Only the ledger entries of the listed ids are looked up.

    Args:
        spec: The search.
        lookup: The ledger entries (``collection, scene_id, date, updated, unit_id``) of the listed ids, given
            the acquisition dates their entries may have (each item's UTC date, a day either side, and
            ``unknown``), such as :meth:`~pipelines.archive.ledger.Ledger.committed_entries` (which reads only the
            row groups that can hold them). An entry it misses only makes the page look like work.
        href_policy: Which asset hrefs may be read.
        client: A ``pystac_client`` client to reuse.
        quarantined: The output key's quarantine.

    Returns:
        The counters :func:`scene_rows` fills, plus ``rows``: how many scenes (or failed items) a run would emit;
        ``None`` when the search holds more than a page after all (an API that reports no count).
    """
    import itertools

    from catalogs.search import search_items

    items = list(itertools.islice(search_items(spec.url, client=client, **spec.search_kwargs(),
                                               on_filter_error="yield"), spec.page_size + 1))
    if len(items) > spec.page_size:
        return None
    ids = sorted({str(i.get("id") or "") for i in items if isinstance(i, Mapping)})
    index = _index_dict(lookup(ids, _entry_dates(items)) if ids else None)  # this page's entries only
    counts: dict[str, Any] = {}
    # scenes are not built here (no header reads): only whether any item needs work
    rows = sum(b.num_rows for b in scene_rows(items, Window(), index, href_policy, counts,
                                              build_scenes=False, quarantined=quarantined))
    counts["rows"] = rows
    return counts


# The ledger entries that can concern a scene: those under its acquisition date (UTC) a day either side, and those
# under UNKNOWN_DATE (a scene committed without a datetime). One rule for a page's lookup (_entry_dates) and a
# window's cut of the index (_window_table).
DATE_SLACK = timedelta(days=1)
UNKNOWN_DATE = "unknown"


def _utc_day(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d")


def _entry_dates(items: Iterable[Any]) -> list[str]:
    """The acquisition dates the ledger entries of ``items`` may have (:data:`DATE_SLACK`, :data:`UNKNOWN_DATE`)."""
    dates = {UNKNOWN_DATE}
    for item in items:
        try:
            t = item_time(item) if isinstance(item, Mapping) else None
        except (ValueError, TypeError):
            t = None
        if t is not None:
            dates.update(_utc_day(t + k * DATE_SLACK) for k in (-1, 0, 1))
    return sorted(dates)


def _window_table(committed: pa.Table | None, window: Window) -> pa.Table | None:
    """The ledger entries that can concern this window, as Arrow: its scenes' acquisition dates, or a retry task's
    own ids."""
    if committed is None or committed.num_rows == 0:
        return None
    import pyarrow.compute as pc

    table = committed
    if window.ids:  # a retry task: its own items' entries
        table = table.filter(pc.is_in(table["scene_id"], value_set=pa.array(sorted(set(window.ids)))))
        if window.collection:
            table = table.filter(pc.equal(table["collection"], window.collection))
    else:
        mask = None  # the window's dates (:data:`DATE_SLACK`, :data:`UNKNOWN_DATE`)
        if window.start is not None:
            mask = pc.greater_equal(table["date"], _utc_day(window.start - DATE_SLACK))
        if window.end is not None:
            upper = pc.less_equal(table["date"], _utc_day(window.end + DATE_SLACK))
            mask = upper if mask is None else pc.and_(mask, upper)
        if mask is not None:
            table = table.filter(pc.or_(mask, pc.equal(table["date"], UNKNOWN_DATE)))
    return table


def _index_dict(table: pa.Table | None) -> dict[tuple[str, str], Any]:
    from pipelines.archive.ledger import CommittedScene

    out: dict[tuple[str, str], Any] = {}
    for row in (table.to_pylist() if table is not None else ()):
        out[(row["collection"], row["scene_id"])] = CommittedScene(
            row["collection"], row["scene_id"], row["date"], row["updated"], row["unit_id"]
        )
    return out


class _PagedIndex(Mapping[tuple[str, str], Any]):
    """The ledger entries of the items a read task is reading, looked up a chunk of items at a time.

    The window's part of the index stays an Arrow table; only the current chunk's entries become Python objects.
    (A window without a start, such as the first window of an incremental run, can span nearly the whole index: as
    Python objects, 10^6 committed scenes took 552 MB, against 117 MB of Arrow; at 10^7, gigabytes in one read
    task.) Each chunk costs one vectorised pass over the window's table (34 ms for 512 items against 10^6 entries),
    so chunks double from ``first`` items (the first tiles are not held back) to ``largest``. :meth:`track` passes the
    items through, loading each chunk's entries before the chunk's first item is handed on; :func:`scene_rows` looks
    an item up before it asks for the next one.
    """

    def __init__(self, table: pa.Table | None, first: int = _INDEX_CHUNK, largest: int = _INDEX_CHUNK_MAX) -> None:
        self._table = table if table is not None and table.num_rows else None
        self._chunk = first
        self._largest = max(first, largest)
        self._entries: dict[tuple[str, str], Any] = {}

    def __getitem__(self, key: tuple[str, str]) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def track(self, items: Iterable[Any]) -> Iterator[Any]:
        """Yield ``items`` unchanged, with the entries of each chunk of them loaded."""
        if self._table is None:
            yield from items
            return
        chunk: list[Any] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= self._chunk:
                self._load(chunk)
                yield from chunk
                chunk = []
                self._chunk = min(2 * self._chunk, self._largest)
        if chunk:
            self._load(chunk)
            yield from chunk

    def _load(self, items: Sequence[Any]) -> None:
        import pyarrow.compute as pc

        assert self._table is not None
        ids = pa.array(sorted({str(i.get("id") or "") for i in items if isinstance(i, Mapping)}), pa.string())
        self._entries = _index_dict(self._table.filter(pc.is_in(self._table["scene_id"], value_set=ids)))


def source_batch(scenes: Sequence[Scene]) -> dict[str, Any]:
    """Source rows for given scenes, as a read task would emit them (to run the stages by hand, e.g. in tests).

    Returns:
        A column batch (dict of numpy arrays) of :data:`SCENE_COLUMNS`.
    """
    import numpy as np

    rows = []
    for scene in scenes:
        row = dict.fromkeys(SCENE_COLUMNS, "")
        row.update(scene_key=scene_key(scene.collection, scene.id), scene=scene.model_dump_json(),
                   meta=json.dumps({"collection": scene.collection, "id": scene.id, "prev_date": None,
                                    "prev_unit": None}))
        rows.append(row)
    return {c: np.array([r[c] for r in rows], dtype=object) for c in SCENE_COLUMNS}


def scene_rows_schema() -> pa.Schema:
    """The schema of a read task's blocks."""
    return pa.schema([(c, pa.string()) for c in SCENE_COLUMNS])


def window_datasource(
    spec: SearchSpec,
    windows: Sequence[Window],
    committed_ref: Any,
    href_policy: HrefPolicy,
    stats: Any,
    retry_after: datetime | None = None,
    quarantined: Mapping[str, Any] | None = None,
) -> Any:
    """A Ray Data datasource with one read task per window (``ray.data.read_datasource(...)``).

    Args:
        spec: The search.
        windows: Its disjoint parts (plus retry windows).
        committed_ref: Object ref of the ledger index table (or None).
        href_policy: Which asset hrefs may be read.
        stats: A :class:`SourceStats` actor; each task reports its counters there when it ends.
        retry_after: The watermark, for retry windows.
        quarantined: Quarantined scenes, skipped until their item is updated.
    """
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class StacWindows(Datasource):
        def get_name(self) -> str:
            return "StacSearch"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            tasks = []
            for window in windows:
                def read(window: Window = window) -> Iterator[pa.Table]:
                    committed = ray.get(committed_ref) if committed_ref is not None else None
                    for block, counts in read_window(spec, window, committed, href_policy,
                                                     retry_after=retry_after, quarantined=quarantined):
                        if block is None:
                            ray.get(stats.add.remote(counts))
                        else:
                            yield block

                tasks.append(ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                          input_files=None), schema=scene_rows_schema()))
            return tasks

    return StacWindows()


class SourceStats:
    """Counters the read tasks report (a Ray actor in the job): items matched, skipped and why, the newest
    ``updated`` seen (the next watermark), and which retried scenes the catalog still lists."""

    def __init__(self) -> None:
        self.matched = 0
        self.skipped = 0
        self.planned = 0
        self.failed_items = 0
        self.filter_errors = 0
        self.tasks = 0
        self.max_updated: datetime | None = None
        self.skip_reasons: Counter[str] = Counter()
        self.seen_retry: list[str] = []

    def add(self, counts: Mapping[str, Any]) -> None:
        """Fold one read task's counters in."""
        self.tasks += 1
        self.matched += int(counts.get("matched", 0))
        self.skipped += int(counts.get("skipped", 0))
        self.planned += int(counts.get("planned", 0))
        self.failed_items += int(counts.get("failed_items", 0))
        self.filter_errors += int(counts.get("filter_errors", 0))
        self.skip_reasons.update(counts.get("skip_reasons") or {})
        self.seen_retry.extend(counts.get("seen_retry") or [])
        mu = counts.get("max_updated")
        if mu is not None and (self.max_updated is None or mu > self.max_updated):
            self.max_updated = mu

    def summary(self) -> dict[str, Any]:
        """Everything counted so far."""
        return {
            "matched": self.matched, "skipped": self.skipped, "planned": self.planned,
            "failed_items": self.failed_items, "filter_errors": self.filter_errors, "tasks": self.tasks,
            "max_updated": self.max_updated, "skip_reasons": dict(self.skip_reasons),
            "seen_retry": list(self.seen_retry),
        }


# ------------------------------------------------------------------------------------------------- quarantine


def next_attempts(
    state: Mapping[str, Any] | None,
    failed: Mapping[str, Mapping[str, Any]],
    succeeded: Iterable[str],
    *,
    max_attempts: int,
    run_id: str,
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """The state document's ``attempts`` and ``quarantined`` after a run.

    A scene (or an item that could not become one) that failed ``max_attempts`` runs in a row is quarantined: the
    state keeps its attempt count, its item's ``updated``, and its last error; the source skips it until the item
    is updated (its ``updated`` differs from the one kept) or the user runs with ``--retry-quarantined``. A scene
    that succeeds leaves both maps; one whose item was updated since it was quarantined counts again from zero.

    Args:
        state: The previous state document (``attempts``: key → failed runs in a row; ``quarantined``).
        failed: ``scene_key -> {"updated", "error_type", "message"}`` of the scenes that failed in this run (a scene
            with some failed tiles included).
        succeeded: Keys of the scenes this run committed whole.
        max_attempts: Failed runs in a row that quarantine a scene.
        run_id: This run.

    Returns:
        ``(attempts, quarantined)``.
    """
    attempts: dict[str, int] = {str(k): int(v) for k, v in ((state or {}).get("attempts") or {}).items()}
    quarantined: dict[str, dict[str, Any]] = dict((state or {}).get("quarantined") or {})
    for key in succeeded:
        attempts.pop(key, None)
        quarantined.pop(key, None)
    for key, info in failed.items():
        updated = info.get("updated")
        updated = updated if isinstance(updated, str) or updated is None else _iso(updated)
        held = quarantined.get(key)
        if held is not None and held.get("updated") != updated:
            attempts.pop(key, None)  # a new version of the item: its failures count afresh
        n = attempts.get(key, 0) + 1
        attempts[key] = n
        if n >= max_attempts:
            quarantined[key] = {"attempts": n, "updated": updated, "error_type": str(info.get("error_type") or ""),
                                "message": str(info.get("message") or "")[:500], "run_id": run_id}
        else:
            quarantined.pop(key, None)
    return attempts, quarantined


def settle_retries(
    state: Mapping[str, Any] | None,
    retry: Iterable[str],
    seen_retry: Iterable[str],
    failed: Mapping[str, Mapping[str, Any]],
    succeeded: Iterable[str],
    *,
    max_attempts: int,
    run_id: str,
    searched: Iterable[str] | None = None,
) -> tuple[list[str], dict[str, int], dict[str, dict[str, Any]]]:
    """The state document's ``retry``, ``attempts`` and ``quarantined`` after an incremental run.

    A scene in the retry list that the catalog no longer lists (its item deleted, moved or hidden: the retry task's
    search by id returned nothing) counts as a failed run (``NotListed``). It is quarantined after ``max_attempts``
    runs like any scene that keeps failing; otherwise it would stay in the retry list for ever, and its retry task
    would keep every later night off the quiet path (no Ray, no model) that an empty retry list allows.

    Args:
        state: The previous state document.
        retry: The scenes this run was asked to retry.
        seen_retry: Those the retry tasks' searches listed.
        failed: ``scene_key -> {"updated", "error_type", "message"}`` of this run's failed scenes.
        succeeded: Scenes this run committed whole (at least those in ``retry`` and in the state's maps).
        max_attempts: Failed runs in a row that quarantine a scene.
        run_id: This run.
        searched: The scenes of ``retry`` that retry tasks searched for (default: all). Those not searched for (a
            run without a watermark has no retry tasks) stay in the retry list unless they failed or succeeded.

    Returns:
        ``(retry, attempts, quarantined)`` for the next state document.
    """
    done = set(succeeded)
    failed_now = dict(failed)
    unseen = set(retry) - set(seen_retry) - done
    for key in sorted(unseen & set(retry if searched is None else searched) - set(failed)):
        failed_now[key] = {"updated": None, "error_type": "NotListed",
                           "message": "the catalog's search for this item's id returned nothing (deleted, moved or "
                                      "hidden); quarantined after max_attempts runs"}
    attempts, quarantined = next_attempts(state, failed_now, done, max_attempts=max_attempts, run_id=run_id)
    return sorted((set(failed_now) | unseen) - set(quarantined)), attempts, quarantined

