"""A scene's Zarr group staged on an object store: through zarr's fsspec store, and made in memory then uploaded in
one concurrent call.

Each committed scene has a Zarr group of a dozen files (``embedding``, ``valid_fraction``, coordinates, CRS; one
chunk each, with the group's consolidated metadata). The unit's stage task writes them under the unit's staging
folder, and the unit commits only once they are written: their requests add to every unit's commit time. This
benchmark writes the same scene grids with ``write_scene_grid`` on a real S3-compatible server (moto) behind a proxy
that adds a fixed delay to every request (an object store's round trip), two ways, alternating, each to a new prefix:

- ``fsspec``: zarr's ``FsspecStore`` on the bucket (what staging used before, and what an in-place write still
  uses): ``mode="w"`` lists and probes each array's prefix before writing it;
- ``memory``: the group made in a ``MemoryStore`` and its files uploaded with one concurrent ``fs.pipe`` (staging now).

Requests are counted at the proxy; both ways must read back the same arrays (checked). Prints a table, then one JSON
line (``speedup``: fsspec over memory at the largest delay). Usage::

    .venv/bin/python benchmarks/stage_zarr.py [--latency-ms 0,25,50] [--repeats 3] [--grid 24x25] [--features 160]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _grid(scene_id: str, rows: int, cols: int, features: int) -> Any:
    """A Sentinel-2-like scene's tile grid (UTM, 448-px tiles at 10 m) with random embeddings."""
    from pipelines.archive.store import SceneGrid

    rng = np.random.default_rng(0)
    return SceneGrid(
        collection="sentinel-2-l2a", scene_id=scene_id, crs="EPSG:32633",
        transform=(10.0, 0.0, 600_000.0, 0.0, -10.0, 5_300_040.0),
        rows=np.arange(rows) * 448, cols=np.arange(cols) * 448, tile_size=448,
        embedding=rng.normal(size=(rows, cols, features)).astype(np.float32),
        valid_fraction=rng.uniform(size=(rows, cols)).astype(np.float32), attrs={"run_id": "bench"},
        output_key="bench",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", default="0,25,50", help="delays added to every request, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", default="24x25", help="tile rows x columns of a scene (a Sentinel-2 tile: 24x25)")
    parser.add_argument("--features", type=int, default=160, help="embedding width (the small preset's hidden size)")
    args = parser.parse_args(argv)
    rows_n, cols_n = (int(x) for x in args.grid.split("x"))

    from pipelines.archive.store import (
        embeddings_group,
        ensure_parent_groups,
        open_scene_grid,
        write_scene_grid,
    )
    from tests.reliability.faults import delayed_s3_stores

    results: list[dict[str, Any]] = []
    latencies = [float(x) for x in args.latency_ms.split(",")]
    for latency, store, proxy in delayed_s3_stores("stage-zarr-bench", latencies):
        write_scene_grid(store, _grid("warmup", 2, 2, 4), under="_staging/warmup")  # connections, imports
        times: dict[str, list[float]] = {"fsspec": [], "memory": []}
        requests: dict[str, list[int]] = {"fsspec": [], "memory": []}
        files: dict[str, int] = {}
        for rep in range(args.repeats):
            for mode in ("fsspec", "memory"):
                scene = f"scene-{mode}-{rep}"
                grid = _grid(scene, rows_n, cols_n, args.features)
                under = "" if mode == "fsspec" else f"_staging/u{rep}"  # "": in place, zarr's fsspec store
                n0, t0 = len(proxy.log), time.perf_counter()
                written = write_scene_grid(store, grid, under=under)
                times[mode].append(time.perf_counter() - t0)
                requests[mode].append(len(proxy.log) - n0)
                files[mode] = len(written)
                if under:  # read it back where the commit would publish it
                    for rel in written:
                        store.move(f"{under}/{rel}", rel)
                ensure_parent_groups(store, embeddings_group("bench", grid.collection, scene))
                back = open_scene_grid(store, "bench", grid.collection, scene)
                if not np.array_equal(back["embedding"].values, grid.embedding):
                    raise RuntimeError(f"{mode}: {embeddings_group('bench', grid.collection, scene)} differs")
        for mode in times:
            results.append({"latency_ms": latency, "mode": mode, "files": files[mode],
                            "stage_s": statistics.median(times[mode]), "runs": times[mode],
                            "requests": statistics.median(requests[mode])})  # fmt: skip

    mb = rows_n * cols_n * args.features * 4 / 1e6
    print(f"one scene's Zarr group staged on moto S3 behind a delaying proxy: {rows_n}x{cols_n} tiles, "
          f"{args.features} features ({mb:.1f} MB of embeddings), median of {args.repeats}")
    print(f"{'delay ms':>8} {'way':>7} {'files':>5} {'stage s':>8} {'requests':>8}  runs")
    print("-" * 60)
    for r in results:
        print(f"{r['latency_ms']:>8.0f} {r['mode']:>7} {r['files']:>5} {r['stage_s']:>8.3f} {r['requests']:>8.0f}  "
              f"{', '.join(f'{t:.3f}' for t in r['runs'])}")
    top = max(r["latency_ms"] for r in results)
    at_top = {r["mode"]: r for r in results if r["latency_ms"] == top}
    print(json.dumps({
        "latency_ms": top, "grid": args.grid, "features": args.features,
        "fsspec_stage_s": round(at_top["fsspec"]["stage_s"], 3),
        "memory_stage_s": round(at_top["memory"]["stage_s"], 3),
        "speedup": round(at_top["fsspec"]["stage_s"] / at_top["memory"]["stage_s"], 2),
        "requests": {m: at_top[m]["requests"] for m in ("fsspec", "memory")},
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
