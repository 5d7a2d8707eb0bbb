"""Toy-world outputs written by the real archive job (embedded STAC API, local Ray) for the results tests.

A "truth" model stage answers every tile from the toy world's ground truth, so the outputs hold real objects:
captions name what is in a tile (``harbor with 2 ships``, ``airport with 1 airplane``, ``farmland``), detection
confidences vary per tile, and each tile's embedding counts its objects per label (so tiles with ships are near
each other). The root holds, on purpose:

- run A: three scenes committed in two units, plus an item whose assets are missing (an ``errors`` row);
- run B: interrupted at its commit point: its unit (scene ``INTERRUPTED_SCENE``) is staged, never committed, and its
  files are also copied to their final partition paths (as a crash in a publish-before-commit layout would leave
  them) — readers must show none of its rows.

The same root is copied to a moto S3 bucket for the ``s3://`` variants.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from catalogs.toyworld import ToyWorld, generate_toyworld, load_items
from tests.pipelines.oracle import oracle_stage

TILE, OVERLAP = 64, 16  # the demo's tiling, so tile ids match docs/querying.md's examples
LABELS = ("ship", "building", "airplane", "vehicle")
SENSORS = ("optical", "sar", "thermal")
INTERRUPTED_SCENE = "toy-optical-001-s0"
BROKEN_SCENE = "toy-broken-000-s0"


def truth_stage(truth: list[dict[str, Any]]) -> type:
    """The oracle model stage with informative captions, per-tile confidences and count embeddings."""

    def describe(visible: list[tuple[Any, ...]], batch: dict[str, np.ndarray], i: int) -> tuple:
        counts = [sum(1 for v in visible if v[0] == lab) for lab in LABELS]
        if counts[0]:
            caption = f"harbor with {counts[0]} ships"
        elif counts[2]:
            caption = f"airport with {counts[2]} airplanes"
        else:
            caption = "farmland"
        sensor = [0.3 * (str(batch["sensor"][i]) == s) for s in SENSORS]
        r0, c0 = int(batch["row_off"][i]), int(batch["col_off"][i])
        # confidence = exp(mean log-probability): vary it per tile, deterministically
        logprob = float(np.log(0.5 + 0.45 * ((r0 * 7 + c0 * 3) % 97) / 96))
        return caption, -0.1, logprob, np.array([*counts, *sensor, 0.05], dtype=np.float32)

    return oracle_stage(truth, describe)


@dataclass
class ToyOutputs:
    """The results root and what the tests need to know about it."""

    root: Path
    world: ToyWorld
    run_a: str
    run_b: str
    uncommitted_unit: str
    uncommitted_files: list[str]


def _config(world: ToyWorld, items: Path, root: Path, commit_tiles: int | None) -> Any:
    from pipelines.archive.config import parse_config

    return parse_config({
        "catalog": {
            "embedded": {"collections": [str(p) for p in world.collection_paths.values()], "items": str(items)},
            "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
            "asset_prefixes": [(world.root / "cogs").as_uri()],
        },
        "tasks": ["caption", "detect"],
        "tiling": {"size": TILE, "overlap": OVERLAP, "min_valid_fraction": 0.5},
        "model": {"name_or_path": "tiny", "max_new_tokens": 8},
        "actors": {"min_actors": 1, "max_actors": 1, "batch_size": 64, "read_num_cpus": 0.5},
        "output": {"root": str(root), "commit_tiles": commit_tiles, "commit_seconds": None},
    })


@pytest.fixture(scope="session")
def toy_outputs(tmp_path_factory: pytest.TempPathFactory, ray_local: Any) -> ToyOutputs:
    """Run A (committed, with one broken item) and run B (interrupted before its commit) over one local root."""
    import geopandas as gpd

    from pipelines.archive import ledger as ledger_module
    from pipelines.archive.job import run
    from pipelines.archive.store import OutputStore

    base = tmp_path_factory.mktemp("results")
    world = generate_toyworld(base / "world", scenes=4, seed=0, chips_per_scene=1,
                              href_base=(base / "world").as_uri())
    items = load_items(world.items_path)
    broken = json.loads(json.dumps(items[0]))
    broken["id"] = BROKEN_SCENE
    for asset in broken["assets"].values():
        asset["href"] = asset["href"].replace("/cogs/", "/cogs/missing-")
    first = [i for i in items if i["id"] != INTERRUPTED_SCENE] + [broken]
    (base / "items-a.ndjson").write_text("".join(json.dumps(i) + "\n" for i in first))
    (base / "items-b.ndjson").write_text("".join(json.dumps(i) + "\n" for i in [*items, broken]))
    truth = gpd.read_parquet(world.ground_truth_path).to_dict(orient="records")
    stage = truth_stage(truth)
    root = base / "outputs"

    summary_a = run(_config(world, base / "items-a.ndjson", root, commit_tiles=60), say=lambda _: None,
                    model_stage=stage)
    assert summary_a.scenes_processed == 3 and summary_a.scenes_failed == 1, summary_a.lines()

    original = ledger_module.Ledger.commit

    def interrupted_commit(self: Any, unit: Any) -> None:
        raise KeyboardInterrupt  # the process is stopped just before it writes the unit's ledger record

    ledger_module.Ledger.commit = interrupted_commit  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            run(_config(world, base / "items-b.ndjson", root, commit_tiles=None), say=lambda _: None, model_stage=stage)
    finally:
        ledger_module.Ledger.commit = original  # type: ignore[method-assign]

    store = OutputStore(str(root))
    staged = store.glob("_staging/*/**/*.parquet")
    assert staged, "the interrupted run left no staged files"
    unit = staged[0].split("/")[1]
    finals = []
    for path in staged:
        final = path.split("/", 2)[2]
        Path(store.full(final)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(store.full(path), store.full(final))
        finals.append(final)
    run_b = unit.rsplit("-u", 1)[0]
    return ToyOutputs(root=root, world=world, run_a=summary_a.run_id, run_b=run_b, uncommitted_unit=unit,
                      uncommitted_files=finals)


@pytest.fixture(scope="session")
def s3_root(toy_outputs: ToyOutputs, s3: Any) -> Iterator[str]:
    """The same outputs in a moto S3 bucket: ``s3://results14/toy``."""
    s3.make_bucket("results14")
    fs = s3.filesystem()
    for path in sorted(toy_outputs.root.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"results14/toy/{path.relative_to(toy_outputs.root).as_posix()}")
    yield "s3://results14/toy"


@pytest.fixture(params=["local", "s3"])
def any_root(request: pytest.FixtureRequest, toy_outputs: ToyOutputs) -> str:
    """Each test that takes it runs on the local root and on its S3 copy."""
    if request.param == "local":
        return str(toy_outputs.root)
    return str(request.getfixturevalue("s3_root"))
