"""Wave planning: lazy over the search (bounded memory), skips committed scenes with a reason, records unusable
items as failures, and the run summary reconciles."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime, timezone

from catalogs.hrefs import HrefPolicy
from catalogs.scene import Scene
from pipelines.infer import RunSummary, SceneFailure, plan_waves
from pipelines.ledger import CommittedScene


def _stream(items: list[dict], n: int, pulled: list[int]) -> Iterator[dict]:
    """``n`` distinct items cycling over ``items``, counting how many were pulled."""
    for k in range(n):
        item = copy.deepcopy(items[k % len(items)])
        item["id"] = f"{item['id']}-{k}"
        pulled[0] += 1
        yield item


def test_waves_pull_the_search_lazily(world, world_items):
    pulled = [0]
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    waves = plan_waves(_stream(world_items, 100_000, pulled), {}, 4, policy, RunSummary("r", "x"), print)
    first = next(waves)
    assert len(first) == 4 and all(isinstance(s, Scene) for s in first)
    assert pulled[0] == 4  # one wave in memory, not the archive
    next(waves)
    assert pulled[0] == 8


def test_committed_scenes_are_skipped_with_a_reason_and_limited_output(world, world_items):
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    when = datetime(2024, 9, 1, tzinfo=timezone.utc)
    committed = {(i["collection"], i["id"]): CommittedScene(i["collection"], i["id"], "d", when, "u0")
                 for i in world_items[:2]}
    lines: list[str] = []
    summary = RunSummary("r", "x")
    waves = list(plan_waves(iter(world_items), committed, 10, policy, summary, lines.append, max_skip_lines=1))
    assert [s.id for w in waves for s in w] == [world_items[2]["id"]]
    assert summary.scenes_matched == 3 and summary.scenes_skipped == 2
    assert lines[0].startswith(f"skip {world_items[0]['collection']}/{world_items[0]['id']}: already committed")
    assert lines[1] == "skip ... (further skips are counted, not listed)" and len(lines) == 2


def test_item_that_cannot_become_a_scene_is_a_failure_not_a_crash(world, world_items):
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    broken = copy.deepcopy(world_items[0])
    del broken["assets"]["green"]
    outside = copy.deepcopy(world_items[1])
    for asset in outside["assets"].values():
        asset["href"] = "s3://someone-else/secret.tif"
    (wave,) = plan_waves(iter([broken, outside, world_items[2]]), {}, 10, policy, RunSummary("r", "x"), print)
    assert isinstance(wave[0], SceneFailure) and wave[0].error.error_type == "MissingAsset"
    assert isinstance(wave[1], SceneFailure) and wave[1].error.error_type == "HrefNotAllowed"
    assert isinstance(wave[2], Scene)


def test_duplicate_items_in_a_search_are_processed_once(world, world_items):
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    summary = RunSummary("r", "x")
    (wave,) = plan_waves(iter(world_items + world_items[:1]), {}, 10, policy, summary, print)
    assert len(wave) == 3 and summary.scenes_matched == 3


def test_summary_reconciles_and_reads_well():
    summary = RunSummary("r", "/out", status="ok", tiles_planned=10, tiles_written=7, tiles_skipped=2,
                         tiles_failed=1, wall_s=2.0)
    assert summary.reconciles and summary.tiles_per_s == 3.5
    text = "\n".join(summary.lines())
    assert "planned 10 = written 7 + skipped 2 + failed 1" in text and "DOES NOT ADD UP" not in text
    summary.tiles_failed = 0
    assert not summary.reconciles and "DOES NOT ADD UP" in "\n".join(summary.lines())
