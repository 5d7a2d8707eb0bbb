"""The archive job at archive scale (the driver killed mid-run and rerun is a chaos scenario in
tests/reliability/test_chaos.py), against real servers (toy COGs and outputs on moto S3, the catalog in
stac-fastapi-pgstac, local Ray, the real model stage with the tiny preset):

- one streaming execution commits several units, loads the model once per actor, and writes exactly the rows of
  the same run as one unit;
- two models on one root: both runs' rows and arrays coexist, each reads back its own;
- a 4,000-item catalog (10,000 in the benchmark), all committed: a nightly run after 5 items were added or updated processes exactly those 5
  and asks the STAC API for a handful of pages (counted at a proxy), against a full scan's fifty (a hundred at 10,000).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from catalogs.toyworld import changed_items, load_items, replicate_items
from pipelines.archive.config import parse_config
from pipelines.archive.job import run
from pipelines.archive.ledger import Ledger, UnitRecord
from pipelines.archive.store import OutputStore, read_table
from pipelines.jobconfig import apply_overrides
from tests.catalogs.proxy import CountingProxy
from tests.pipelines.conftest import upload_world

pytestmark = pytest.mark.integration

TILE = 128  # 9-16 tiles per toy scene: enough units, little model time
SEED = 31
SCENES = 6  # two per sensor
COLLECTIONS = ["toyworld-optical", "toyworld-sar", "toyworld-thermal"]
VOLATILE = {"run_id", "unit_id", "processed_at", "occurred_at", "bbox"}


def _data(pgstac_url: str, root: str, *, id_like: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "catalog": {
            "url": pgstac_url, "collections": COLLECTIONS,
            "filter": {"op": "like", "args": [{"property": "id"}, id_like]},
            "asset_prefixes": [f"s3://archive/w{SEED}/cogs/"],
        },
        "tasks": ["caption", "detect"],
        "tiling": {"size": TILE, "overlap": 0, "min_valid_fraction": 0.5},
        "model": {"name_or_path": "tiny", "max_new_tokens": 6},
        "actors": {"min_actors": 1, "max_actors": 1, "batch_size": 32, "read_num_cpus": 0.5},
        "output": {"root": root, "commit_tiles": 20, "commit_seconds": None},
        "ray": {},
    }
    apply_overrides(data, {key.replace("__", "."): value for key, value in extra.items()})
    return data


def _cell(value: Any) -> str | None:
    """A cell as text; floats to 4 decimals (a tile's log-probability moves in the 7th digit with its batch)."""
    if isinstance(value, (list, np.ndarray)):
        return json.dumps(value, default=str)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_set(store: OutputStore, table: str) -> set[tuple]:
    """A table's rows as a set, without the columns that differ between runs (ids, timestamps)."""
    frame = read_table(store, table)
    frame = pd.DataFrame(frame.drop(columns=[c for c in frame.columns if c in VOLATILE]))
    if "geometry" in frame:
        frame["geometry"] = [None if g is None else g.wkb_hex for g in frame["geometry"]]
    rows = {tuple(_cell(v) for v in row) for row in frame.astype(object).itertuples(index=False)}
    assert len(rows) == len(frame), f"{table}: duplicate rows"
    return rows


def assert_same_rows(store: OutputStore, ref: OutputStore, table: str) -> None:
    """Both roots hold the same rows of ``table``; otherwise the differing rows, column by column."""
    mine, theirs = table_set(store, table), table_set(ref, table)
    if mine != theirs:
        frame = read_table(store, table)
        names = [c for c in frame.columns if c not in VOLATILE]
        extra = [dict(zip(names, r, strict=True)) for r in sorted(mine - theirs)[:3]]
        lost = [dict(zip(names, r, strict=True)) for r in sorted(theirs - mine)[:3]]
        diff = [{k: (a[k], b[k]) for k in names if a[k] != b[k]} for a, b in zip(extra, lost, strict=False)]
        pytest.fail(f"{table}: {len(mine - theirs)} rows only here, {len(theirs - mine)} only in the reference; "
                    f"first differences (here, reference): {diff}")


def zarr_groups(store: OutputStore) -> set[str]:
    """Scene groups present in the Zarr store (folders holding an ``embedding`` array)."""
    return {p.rsplit("/embedding/zarr.json", 1)[0].removeprefix("embeddings.zarr/")
            for p in store.glob("embeddings.zarr/**/embedding/zarr.json")}


@pytest.fixture(scope="module")
def archive(s3, pgstac, tmp_path_factory):
    """Six toy scenes on S3, all in pgstac."""
    world = upload_world(tmp_path_factory.mktemp(f"world{SEED}"), "archive", f"w{SEED}", scenes=SCENES, seed=SEED, s3=s3)
    items = load_items(world.items_path)
    pgstac.load_collections([json.loads(p.read_text()) for p in world.collection_paths.values()])
    pgstac.load_items(items)
    s3.make_bucket("scale")
    return world, items


@pytest.fixture(scope="module")
def reference(archive, pgstac, ray_local):
    """The whole archive as ONE unit (the old one-unit-per-run setting): the tables every other run must equal."""
    config = parse_config(_data(pgstac.url, "s3://scale/one-unit", id_like=f"%-s{SEED}",
                                output__commit_tiles=None))
    summary = run(config)
    assert summary.units_committed == 1 and summary.scenes_processed == SCENES
    return OutputStore(config.output.root), summary


def test_one_streaming_run_commits_units_and_loads_the_model_once(archive, reference, pgstac, ray_local):
    ref_store, ref = reference
    config = parse_config(_data(pgstac.url, "s3://scale/units", id_like=f"%-s{SEED}"))
    lines: list[str] = []
    summary = run(config, say=lines.append)
    assert summary.status == "ok" and summary.scenes_processed == SCENES and summary.reconciles
    # a unit closes at each scene (20 tiles); units that closed while the one before them committed are merged
    merged = sum(int(m.group(1)) for line in lines if (m := re.search(r"takes (\d+) more closed units", line)))
    assert summary.units_committed >= 2 and summary.units_committed + merged <= SCENES, (summary.units_committed, merged)
    assert summary.model_actors == 1 and summary.model_loads == 1  # the pool lives for the whole run
    store = OutputStore(config.output.root)
    runs = read_table(store, "runs")
    assert runs.iloc[0]["model_loads"] == runs.iloc[0]["model_actors"] == 1
    assert runs.iloc[0]["units_committed"] == summary.units_committed
    for table in ("scenes", "tiles", "detections", "errors"):
        assert_same_rows(store, ref_store, table)
    assert zarr_groups(store) == set(read_table(store, "scenes")["embeddings_group"])
    # every unit's rows carry its own unit id, and each unit is one ledger record
    units = set(read_table(store, "tiles")["unit_id"])
    assert len(units) == summary.units_committed == len(store.glob("_ledger/*.parquet"))


def test_two_models_on_one_root_keep_their_own_rows_and_arrays(archive, pgstac, ray_local, s3):
    root = "s3://scale/two-models"
    configs = [parse_config(_data(pgstac.url, root, id_like=f"toy-optical-00%-s{SEED}",
                                  model__seed=seed)) for seed in (0, 1)]
    keys = [c.output_key() for c in configs]
    assert keys[0] != keys[1]
    for config in configs:
        assert run(config).scenes_processed == SCENES // 3  # the world's optical scenes
    store = OutputStore(root)
    scenes = read_table(store, "scenes")
    assert sorted(scenes["output_key"]) == sorted(keys * (SCENES // 3))
    groups = zarr_groups(store)
    assert groups == set(scenes["embeddings_group"]) and len(groups) == 2 * (SCENES // 3)
    opts = {"endpoint_url": s3.endpoint_url}
    for key in keys:
        mine = scenes[scenes["output_key"] == key]
        assert all(g.startswith(f"{key}/") for g in mine["embeddings_group"])
        ds = xr.open_zarr(f"{root}/embeddings.zarr/{mine.iloc[0]['embeddings_group']}", storage_options=opts)
        assert ds.attrs["output_key"] == key
    # the two random-weight models embed the same tile differently: each group holds its own model's arrays
    one, two = (xr.open_zarr(f"{root}/embeddings.zarr/{g}", storage_options=opts)
                for g in sorted(scenes[scenes["scene_id"] == scenes.iloc[0]["scene_id"]]["embeddings_group"]))
    assert not np.allclose(one.embedding.values, two.embedding.values, equal_nan=True)


N_BULK = 4_000  # benchmarks/archive.py runs the same at 10,000


def test_nightly_run_on_a_4k_catalog_lists_only_what_changed(archive, pgstac, ray_local, s3):
    _, items = archive
    # items sharing the toy COGs; times and `updated` spread over a year
    bulk = replicate_items(items, N_BULK, prefix="bulk", start=datetime(2023, 1, 1, tzinfo=timezone.utc),
                           every=timedelta(minutes=50))
    pgstac.load_items(bulk)
    pgstac.execute("INSERT INTO pgstac.pgstac_settings (name, value) VALUES ('context', 'on') "
                   "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value")
    proxy = CountingProxy(pgstac.url)
    root = "s3://scale/nightly"
    config = parse_config(_data(proxy.url, root, id_like="bulk-%", catalog__items_per_task=800))
    # every bulk item already committed (as if earlier runs had processed them)
    store = OutputStore(root)
    Ledger(store).commit(UnitRecord(
        unit_id="seed", run_id="seed", output_key=config.output_key(),
        scenes=[(i["collection"], i["id"], i["properties"]["datetime"][:10],
                 datetime.fromisoformat(i["properties"]["updated"].replace("Z", "+00:00"))) for i in bulk],
    ))
    try:
        # a reconcile lists everything (split into read tasks), skips all, and leaves a watermark
        proxy.requests.clear()
        full = run(config, full_scan=True)
        full_requests = len(proxy.requests)
        assert full.scenes_matched == N_BULK and full.scenes_skipped == N_BULK and full.scenes_processed == 0
        assert full.read_tasks == 5 and full.watermark is not None

        # 3 items updated, 2 new ones
        changed = changed_items(bulk, (17, N_BULK // 2, N_BULK - 2), new=2)
        pgstac.load_items(changed)

        proxy.requests.clear()
        nightly = run(config)
        nightly_log = list(proxy.requests)
        nightly_requests = len(nightly_log)

        # the next night nothing changed: answered from one page, without Ray or the model
        proxy.requests.clear()
        quiet = run(config)
        quiet_requests = len(proxy.requests)
    finally:
        proxy.stop()
    assert quiet.scenes_processed == 0 and quiet.read_tasks == 0 and quiet.model_loads == 0
    assert quiet.scenes_matched == quiet.scenes_skipped <= 5 and quiet_requests <= 4, proxy.requests
    assert not nightly.full_scan and nightly.updated_since == full.watermark
    # exactly the 5 changed items are processed; the search is inclusive at the watermark, so the newest item of
    # the last run (updated == watermark) is listed again and skipped
    assert nightly.scenes_processed == 5 and nightly.scenes_matched - nightly.scenes_skipped == 5
    assert nightly.scenes_matched <= 5 + 1
    processed = set(read_table(store, "scenes")["scene_id"])
    assert processed == {i["id"] for i in changed}
    pages = [r for r in nightly_log if r[0] == "POST" or "/search" in r[1]]  # the nightly run's searches
    print(f"\nfull scan: {full.wall_s:.1f} s, {full_requests} requests; nightly (5 changed): {nightly.wall_s:.1f} s, "
          f"{nightly_requests} requests ({len(pages)} searches); no-op: {quiet.wall_s:.2f} s, {quiet_requests} requests")
    assert len(pages) <= 3, nightly_log  # the count, and one page of the 5 changed items
    assert nightly_requests * 5 < full_requests  # 7 vs 55 at 4,000 items; the full scan grows with the catalog, the nightly run does not
