"""`earthgpt similar` figures, measured in one go on the demo outputs (`earthgpt demo --out DEMO`):

- precision@10 for tiles with ships: a hit counts when the toy world's ground truth puts a ship (at least half of its
  box) inside the hit tile's window; for the tile docs/querying.md uses and for a seeded sample of ship tiles,
  next to the share of all tiles that hold a ship (what a random ranking would score);
- bounded memory: the same search on copies of the outputs with N× the scenes (scene ids, commit units, ledger
  records and Zarr groups replicated under new names, embeddings unchanged), each in a fresh process (peak RSS only
  grows), minus the peak RSS of a process that only opens the outputs and reads the scenes columns the search reads
  (what is left is the search's own memory: embeddings streamed, dask, the hits' tile rows); also with ``MALLOC_ARENA_MAX=2``, which shows how much of the rest is glibc's per-thread arenas (the
  scoring threads) keeping freed memory;
- whether memory keeps growing: the largest root searched four times in one process, peak RSS after each pass;
- cost: wall seconds per million tiles scored and per scene, and bytes of embeddings read.

Usage::

    .venv/bin/python benchmarks/similar_search.py --demo demo-out [--scales 1 10 100] [--sample 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

QUERY = "toy-sar-000-s0/r0002_c0005"


def _child(args: argparse.Namespace) -> None:
    from pipelines.results import open_outputs
    from pipelines.results.similar import SearchStats, find_similar

    out = open_outputs(args.root)
    # what the search itself reads of the scenes table (its candidates): the baseline holds it too
    out.scenes(columns=["scene_id", "embeddings_group", "output_key", "datetime"])
    import dask  # noqa: F401  (imports are not part of the search's time: a notebook has them loaded)
    import zarr  # noqa: F401

    if args.passes:  # the same search again and again: does memory keep growing with scenes processed?
        peaks = []
        for _ in range(args.passes):
            find_similar(out, args.tile, k=10)
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps({"peaks_mb": peaks}))
        return
    if args.baseline:
        stats = SearchStats()
    else:
        stats = SearchStats()
        t0 = time.perf_counter()
        hits = find_similar(out, args.tile, k=10, stats=stats)
        stats.seconds = time.perf_counter() - t0
        assert len(hits) == 10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": stats.seconds, "tiles": stats.tiles_scored, "scenes": stats.scenes,
                      "bytes": stats.bytes_read, "peak_mb": peak}))


def _run_child(root: Path, baseline: bool = False, arenas: int | None = None, passes: int = 0) -> dict:
    import os

    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--tile", QUERY, "--passes", str(passes)]
    if baseline:
        cmd.append("--baseline")
    env = dict(os.environ)
    if arenas:
        env["MALLOC_ARENA_MAX"] = str(arenas)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def replicate(src: Path, dst: Path, times: int) -> None:
    """Copy an output root with ``times``× its committed scenes: copy r renames scenes ``<id>-x<r>``, units
    ``<unit>-x<r>`` (with a ledger record each) and moves each Zarr group under ``replica-<r>/``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.results import open_outputs

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_staging", "reports"))
    out = open_outputs(str(src))
    ledger = [p for p in (src / "_ledger").glob("*.parquet")]
    zroot = src / "embeddings.zarr"
    for r in range(1, times):
        suffix = f"-x{r}"

        def rename(table: pa.Table, suffix: str = suffix, r: int = r) -> pa.Table:
            for name in ("scene_id", "unit_id"):
                if name in table.column_names:
                    values = [None if v is None else v + suffix for v in table[name].to_pylist()]
                    table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
            if "embeddings_group" in table.column_names:
                groups = [f"replica-{r}/{g}" for g in table["embeddings_group"].to_pylist()]
                table = table.set_column(table.schema.get_field_index("embeddings_group"), "embeddings_group",
                                         pa.array(groups))
            return table

        for path in ledger:
            pq.write_table(rename(pq.read_table(path)), dst / "_ledger" / f"{path.stem}{suffix}.parquet")
        for table in ("scenes", "tiles", "detections"):
            for rel in out.files(table):
                path = src / rel
                target = dst / rel.replace(".parquet", f"{suffix}.parquet")
                pq.write_table(rename(pq.read_table(path)), target)
        for group in out.scenes(columns=["embeddings_group"])["embeddings_group"]:
            target = dst / "embeddings.zarr" / f"replica-{r}" / group
            shutil.copytree(zroot / group, target)
            # parents of the moved group are groups too
            parts = f"replica-{r}/{group}".split("/")
            for depth in range(1, len(parts)):
                meta = dst / "embeddings.zarr" / "/".join(parts[:depth]) / "zarr.json"
                if not meta.exists():
                    shutil.copyfile(zroot / "zarr.json", meta)


def _ship_tiles(outputs, truth) -> set[tuple[str, str]]:
    """(scene_id, tile_id) of tiles holding at least half of a ground-truth ship box."""
    import numpy as np

    tiles = outputs.tiles(columns=["scene_id", "tile_id", "row_off", "col_off", "width", "height", "status"])
    ships = truth[truth["label"] == "ship"]
    found = set()
    for scene_id, group in tiles.groupby("scene_id"):
        boxes = np.array(ships.loc[ships["scene_id"] == scene_id, "pixel_box"].tolist(), dtype=float).reshape(-1, 4)
        if not len(boxes):
            continue
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for t in group.itertuples():
            ix = np.clip(np.minimum(boxes[:, 2], t.col_off + t.width) - np.maximum(boxes[:, 0], t.col_off), 0, None)
            iy = np.clip(np.minimum(boxes[:, 3], t.row_off + t.height) - np.maximum(boxes[:, 1], t.row_off), 0, None)
            if ((ix * iy) >= 0.5 * area).any():
                found.add((scene_id, t.tile_id))
    return found


def precision(demo: Path, sample: int, seed: int) -> dict:
    import geopandas as gpd
    import numpy as np

    from pipelines.results import open_outputs
    from pipelines.results.similar import find_similar

    out = open_outputs(str(demo / "outputs"))
    truth = gpd.read_parquet(demo / "toyworld" / "ground_truth.parquet")
    ships = _ship_tiles(out, truth)
    tiles = out.tiles(columns=["scene_id", "tile_id", "status"])
    ok = tiles[tiles["status"] == "ok"]
    base = float(np.mean([(s, t) in ships for s, t in zip(ok["scene_id"], ok["tile_id"], strict=True)]))

    def p_at_10(tile: str) -> float:
        hits = find_similar(out, tile, k=10)
        return float(np.mean([(s, t) in ships for s, t in zip(hits["scene_id"], hits["tile_id"], strict=True)]))

    candidates = sorted(p for p in ships if (ok["scene_id"] == p[0]).any()
                        and ((ok["scene_id"] == p[0]) & (ok["tile_id"] == p[1])).any())
    rng = np.random.default_rng(seed)
    picked = [candidates[i] for i in rng.choice(len(candidates), size=min(sample, len(candidates)), replace=False)]
    scores = [p_at_10(f"{s}/{t}") for s, t in picked]
    q_scene, q_tile = QUERY.split("/")
    return {"query": QUERY, "query_has_ship": (q_scene, q_tile) in ships, "p10_query": p_at_10(QUERY),
            "p10_mean": float(np.mean(scores)), "p10_min": float(np.min(scores)), "queries": len(scores),
            "ship_tiles": len(ships), "tiles_ok": len(ok), "base_rate": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="demo-out", help="folder written by `earthgpt demo --out`")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--sample", type=int, default=30, help="ship tiles used as queries for mean precision@10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="where the replicated roots go (default: a temp folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--passes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--tile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    import tempfile

    demo = Path(args.demo).absolute()
    work = Path(args.work or tempfile.mkdtemp(prefix="similar-bench-"))
    p = precision(demo, args.sample, args.seed)
    print(f"precision@10: {p['query']} {p['p10_query']:.2f}; {p['queries']} sampled ship tiles mean "
          f"{p['p10_mean']:.2f} (min {p['p10_min']:.2f}); tiles with a ship: {p['ship_tiles']} of {p['tiles_ok']} "
          f"answered (random ranking: {p['base_rate']:.2f})")
    rows = []
    for n in args.scales:
        root = work / f"x{n}"
        t0 = time.perf_counter()
        replicate(demo / "outputs", root, n)
        built = time.perf_counter() - t0
        base = _run_child(root, baseline=True)
        res = _run_child(root)
        base2 = _run_child(root, baseline=True, arenas=2)
        res2 = _run_child(root, arenas=2)
        res.update(scale=n, baseline_mb=base["peak_mb"], build_s=built, search_mb=res["peak_mb"] - base["peak_mb"],
                   search_mb_arena2=res2["peak_mb"] - base2["peak_mb"],
                   s_per_mtile=res["wall_s"] / res["tiles"] * 1e6, ms_per_scene=res["wall_s"] / res["scenes"] * 1e3,
                   gb_per_mtile=res["bytes"] / res["tiles"] * 1e6 / 1e9)
        rows.append(res)
    print(f"{'scale':>5} {'scenes':>7} {'tiles':>8} {'wall s':>7} {'s/Mtile':>8} {'ms/scene':>9} {'GB/Mtile':>9} "
          f"{'peak MB':>8} {'open-only MB':>12} {'search MB':>10} {'search MB, 2 arenas':>20}")
    for r in rows:
        print(f"{r['scale']:>5} {r['scenes']:>7} {r['tiles']:>8} {r['wall_s']:>7.2f} {r['s_per_mtile']:>8.0f} "
              f"{r['ms_per_scene']:>9.1f} {r['gb_per_mtile']:>9.2f} {r['peak_mb']:>8.0f} {r['baseline_mb']:>12.0f} "
              f"{r['search_mb']:>10.0f} {r['search_mb_arena2']:>20.0f}")
    repeat = _run_child(work / f"x{args.scales[-1]}", passes=4)["peaks_mb"]
    print(f"peak RSS after 1-4 passes over the {args.scales[-1]}x root ({rows[-1]['scenes']} scenes each): "
          + ", ".join(f"{p:.0f}" for p in repeat) + " MB")
    print(json.dumps({"precision": p, "scales": rows, "repeat_peaks_mb": repeat}))


if __name__ == "__main__":
    main()
