"""A night's unit files on an object store, queried as committed and after the run folded them.

A run commits a unit every ``output.commit_tiles`` tiles, each with one file per table and partition it touches; at
the end of the run ``fold_run`` folds them, per partition, into files of up to ``output.fold_bytes``. This benchmark
commits the same ``--units`` units (through the real ``Ledger.commit``) under two prefixes of a real S3-compatible
server (moto), folds the second one (the real ``fold_run``, timed and counted), compacts both ledgers (as a run
ends), then, through a proxy that adds a
fixed delay to every request (an object store's round trip; 0 ms is the local server alone), alternating, median of
``--repeats``, runs on each:

- ``sql``: ``earthgpt query``'s path: ``pipelines.query.connect`` (lists the committed files) and a DuckDB
  aggregate over every tile (``SELECT date, count(*), count(DISTINCT scene_id) FROM tiles GROUP BY ALL``);
- ``area``: ``open_outputs(root).tiles(bbox=...)`` over one unit's area (listing, partition and row-group pruning,
  the exact ``intersects``).

Both prefixes must give the same answers (checked). Requests are counted at the proxy. Prints a table, then one JSON
line (``sql_speedup``, ``area_speedup``: as committed over folded, at the largest delay; the files and requests of
each). Usage::

    .venv/bin/python benchmarks/fold.py [--units 200] [--latency-ms 0,25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import posixpath
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATES = ("2024-06-01", "2024-06-02")


def _commit_units(store: Any, units: int, scenes: int, tiles: int) -> list[str]:
    """``units`` units of one run, each with ``scenes`` scenes a date on two dates (scenes, tiles and detections
    tables); the final paths of the table files they published."""
    import shapely

    from pipelines.archive.ledger import Ledger, UnitRecord
    from pipelines.archive.store import stage_table

    ledger = Ledger(store)
    published: list[str] = []
    for u in range(units):
        unit = f"bench-u{u:05d}"
        staging = ledger.staging_dir(unit)
        ids = [(f"S2B_{u:05d}_{d}_{s}", date) for d, date in enumerate(DATES) for s in range(scenes)]
        ids_rows: dict[str, list[Any]] = {"scenes": [], "tiles": [], "detections": []}
        for k, (scene, date) in enumerate(ids):
            x, y = (u % 50) * 1.0, (u // 50) * 1.0 + k * 0.1
            base = {"scene_id": scene, "output_key": "bench", "unit_id": unit, "run_id": "bench"}
            ids_rows["scenes"].append(("s2", date, base, shapely.box(x, y, x + 1, y + 0.1)))
            for t in range(tiles):
                box = shapely.box(x + t * 0.04, y, x + t * 0.04 + 0.04, y + 0.1)
                ids_rows["tiles"].append(("s2", date, {**base, "tile_id": f"r0c{t}", "caption": f"fields and a road,"
                                                       f" tile {t}"}, box))
                if t % 5 == 0:
                    ids_rows["detections"].append(("s2", date, {**base, "tile_id": f"r0c{t}", "detection_id": t,
                                                                "label": "vehicle", "confidence": 0.9}, box))
        files = [f for table, rows in ids_rows.items() for f in stage_table(store, staging, table, unit, rows)]
        ledger.commit(UnitRecord(unit, "bench", "bench",
                                 scenes=[("s2", s, d, datetime(2024, 6, 3, tzinfo=timezone.utc)) for s, d in ids],
                                 publish=files))
        published += [f.final for f in files]
    return published


def _sql(root: str) -> list[tuple[Any, ...]]:
    from pipelines.query import connect

    sql = "SELECT date::VARCHAR, count(*), count(DISTINCT scene_id) FROM tiles GROUP BY ALL ORDER BY ALL"
    return [tuple(r) for r in connect(root).sql(sql).fetchall()]


def _area(root: str, bbox: tuple[float, float, float, float]) -> list[tuple[Any, ...]]:
    from pipelines.results import open_outputs

    frame = open_outputs(root).tiles(bbox=bbox)
    return sorted(zip(frame["scene_id"], frame["tile_id"], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=200, help="units of the night (the defaults make ~1,500)")
    parser.add_argument("--scenes", type=int, default=2, help="scenes a unit holds on each of its two dates")
    parser.add_argument("--tiles", type=int, default=25, help="tiles a scene")
    parser.add_argument("--latency-ms", default="0,25", help="delays added to every request, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import s3fs

    from pipelines.archive.fold import fold_run
    from pipelines.archive.ledger import Ledger
    from pipelines.archive.store import OutputStore
    from tests.harness.servers import env_vars
    from tests.reliability.faults import delayed_s3_stores

    latencies = [float(x) for x in args.latency_ms.split(",")]
    u = args.units // 2  # the middle unit's first scene, half its tiles
    bbox = ((u % 50) + 0.01, (u // 50) + 0.01, (u % 50) + 0.5, (u // 50) + 0.09)
    rows: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    for latency, store, proxy in delayed_s3_stores("fold-bench", latencies):
        # the readers open the root by URL, their endpoint from the environment: a cached filesystem would keep
        # the endpoint (the proxy) of the delay before
        s3fs.S3FileSystem.clear_instance_cache()
        roots = {"committed": f"{store.url()}/committed", "folded": f"{store.url()}/folded"}
        if not setup:  # once, without the delay: the same units under both prefixes, the second folded
            direct = os.environ["AWS_ENDPOINT_URL"]
            setup["roots"] = roots
            t0 = time.perf_counter()
            for side, root in roots.items():
                published = _commit_units(OutputStore(root, {"endpoint_url": direct}), args.units, args.scenes,
                                          args.tiles)
                setup[f"{side}_files"] = len(published)
            setup["commit_s"] = time.perf_counter() - t0
            folded = OutputStore(roots["folded"], {"endpoint_url": proxy.url})
            n0, t0 = len(proxy.log), time.perf_counter()
            folders = sorted({posixpath.dirname(p) for p in published})  # the same under both prefixes
            fold_units = map("bench-u{:05d}".format, itertools.count(args.units))
            report = fold_run(folded, Ledger(folded), folders, "bench", "bench", 128 * 2**20,
                              functools.partial(next, fold_units))
            setup.update(fold_s=time.perf_counter() - t0, fold_requests=len(proxy.log) - n0,
                         fold_latency_ms=latency, files_in=report.files_in, files_out=report.files_out)
            for root in roots.values():  # as the run does last: the units' ledger records folded into one file
                Ledger(OutputStore(root, {"endpoint_url": direct})).compact()
        else:
            roots = setup["roots"]
        for name, fn in (("sql", _sql), ("area", functools.partial(_area, bbox=bbox))):
            times: dict[str, list[float]] = {side: [] for side in roots}
            requests: dict[str, list[int]] = {side: [] for side in roots}
            answers: dict[str, Any] = {}
            with env_vars({"AWS_ENDPOINT_URL": proxy.url, "AWS_ENDPOINT_URL_S3": proxy.url}):
                for _ in range(args.repeats):
                    for side, root in roots.items():
                        n0, t0 = len(proxy.log), time.perf_counter()
                        answers[side] = fn(root)
                        times[side].append(time.perf_counter() - t0)
                        requests[side].append(len(proxy.log) - n0)
            if answers["committed"] != answers["folded"] or not answers["folded"]:
                raise RuntimeError(f"{name}: the folded tables answer differently ({answers})")
            for side in roots:
                rows.append({"latency_ms": latency, "query": name, "side": side, "s": statistics.median(times[side]),
                             "requests": statistics.median(requests[side]), "runs": times[side]})

    print(f"fold: {args.units} units x 3 tables x 2 dates = {setup['committed_files']} files (committed in "
          f"{setup['commit_s']:.0f} s, both prefixes); folded into {setup['files_out']} in {setup['fold_s']:.2f} s, "
          f"{setup['fold_requests']} requests at {setup['fold_latency_ms']:.0f} ms; moto S3 behind a delaying proxy, "
          f"median of {args.repeats}")
    print(f"{'delay ms':>8} {'query':>6} {'side':>10} {'seconds':>8} {'requests':>8}  runs")
    print("-" * 72)
    for r in rows:
        print(f"{r['latency_ms']:>8.0f} {r['query']:>6} {r['side']:>10} {r['s']:>8.3f} {r['requests']:>8.0f}  "
              f"{', '.join(f'{t:.3f}' for t in r['runs'])}")

    def row(latency: float, query: str, side: str) -> dict[str, Any]:
        return next(r for r in rows if (r["latency_ms"], r["query"], r["side"]) == (latency, query, side))

    top = max(latencies)
    print(json.dumps({
        "units": args.units, "files": setup["committed_files"], "folded_files": setup["files_out"],
        "fold_s": round(setup["fold_s"], 3), "fold_requests": setup["fold_requests"], "latency_ms": top,
        **{f"{q}_speedup": round(row(top, q, "committed")["s"] / row(top, q, "folded")["s"], 2) for q in ("sql", "area")},
        **{f"{q}_s": [round(row(top, q, side)["s"], 3) for side in ("committed", "folded")] for q in ("sql", "area")},
        **{f"{q}_requests": [row(top, q, side)["requests"] for side in ("committed", "folded")] for q in ("sql", "area")},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
