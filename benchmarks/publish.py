"""A unit's commit on an object store: its files moved one after another, moved on a thread pool, and copied
concurrently then deleted in bulk.

``Ledger.commit`` writes the unit's record, then publishes every staged file at its final path and deletes the files
it supersedes. It runs in the job's driver, between two units: while it runs, no batch is taken from the model
actors. This benchmark commits the same units through the real ``Ledger.commit`` on a real S3-compatible server
(moto), behind a proxy that adds a fixed delay to every request (an object store's round trip; 0 ms is the local
server alone), three ways, alternating: ``serial`` (``store.batch_copies = False``, ``PUBLISH_THREADS = 1``: each file
moved in turn, a copy and a delete of several requests, the job as it was), ``pool`` (the same moves on
``PUBLISH_THREADS`` threads) and ``batched`` (the default: every file copied in one concurrent call, then the staging
folder deleted in bulk), and counts the requests at the proxy.

Prints a table, then one JSON line (``speedup``: serial over batched at the largest delay). Usage::

    .venv/bin/python benchmarks/publish.py [--files 60] [--superseded 0] [--latency-ms 0,25,50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _commit_once(ledger: Any, unit_id: str, files: int, size: int, log: list[Any],
                 superseded: int = 0) -> tuple[float, int]:
    """Stage a unit's files, commit it, check every file is published and every superseded one deleted; the
    commit's seconds and requests."""
    from pipelines.archive.ledger import UnitRecord
    from pipelines.archive.store import StagedFile

    old = [f"tiles/collection=s2/date=2024-05-{k % 3 + 1:02d}/part-old-{unit_id}-{k}.parquet" for k in range(superseded)]
    for rel in old:  # files of earlier units, which this unit's rows replace (an updated scene's reprocessing)
        ledger.store.write_bytes(rel, os.urandom(size))
    staging = ledger.staging_dir(unit_id)
    publish = []
    for k in range(files):
        final = f"tiles/collection=s2/date=2024-06-{k % 28 + 1:02d}/part-{unit_id}-{k}.parquet"
        ledger.store.write_bytes(f"{staging}/{final}", os.urandom(size))
        publish.append(StagedFile(staged=f"{staging}/{final}", final=final))
    record = UnitRecord(unit_id=unit_id, run_id=unit_id.rsplit("-", 1)[0], output_key="bench",
                        scenes=[("s2", f"scene-{unit_id}", "2024-06-01", datetime(2024, 6, 2, tzinfo=timezone.utc))],
                        publish=publish, delete=old)
    n0, t0 = len(log), time.perf_counter()
    ledger.commit(record)
    took, requests = time.perf_counter() - t0, len(log) - n0
    missing = [f.final for f in publish if not ledger.store.exists(f.final)]
    if missing:
        raise RuntimeError(f"{len(missing)} files were not published (first: {missing[0]})")
    left = [rel for rel in old if ledger.store.exists(rel)]
    if left:
        raise RuntimeError(f"{len(left)} superseded files were not deleted (first: {left[0]})")
    return took, requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=60, help="files per unit (about three Sentinel-2 scenes)")
    parser.add_argument("--size", type=int, default=20_000, help="bytes per file")
    parser.add_argument("--superseded", type=int, default=0,
                        help="published files each unit replaces (deleted, then checked gone, by its commit)")
    parser.add_argument("--latency-ms", default="0,25,50", help="delays added to every request, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from pipelines.archive import ledger as ledger_mod
    from pipelines.archive.ledger import Ledger
    from tests.reliability.faults import delayed_s3_stores

    pool = ledger_mod.PUBLISH_THREADS
    modes = {"serial": (False, 1), "pool": (False, pool), "batched": (True, pool)}  # (store.batch_copies, threads)
    rows: list[dict[str, Any]] = []
    latencies = [float(x) for x in args.latency_ms.split(",")]
    for latency, store, proxy in delayed_s3_stores("publish-bench", latencies):
        try:
            ledger = Ledger(store)
            _commit_once(ledger, "warmup-u00000", args.files, args.size, proxy.log)  # connections, imports
            times: dict[str, list[float]] = {m: [] for m in modes}
            requests: dict[str, list[int]] = {m: [] for m in modes}
            for rep in range(args.repeats):
                for mode, (batched, threads) in modes.items():
                    store.batch_copies, ledger_mod.PUBLISH_THREADS = batched, threads
                    unit = f"run{rep}{mode}-u{rep:05d}"
                    took, commit_requests = _commit_once(ledger, unit, args.files, args.size, proxy.log,
                                                         args.superseded)
                    times[mode].append(took)
                    requests[mode].append(commit_requests)
            for mode in modes:
                rows.append({"latency_ms": latency, "mode": mode, "threads": modes[mode][1],
                             "commit_s": statistics.median(times[mode]), "runs": times[mode],
                             "requests": statistics.median(requests[mode])})
        finally:
            ledger_mod.PUBLISH_THREADS = pool

    print(f"unit commit: {args.files} files of {args.size} B, {args.superseded} superseded files deleted, moto S3 "
          f"behind a delaying proxy, median of {args.repeats}")
    print(f"{'delay ms':>8} {'mode':>8} {'threads':>7} {'commit s':>9} {'requests':>8} {'files/s':>8}  runs")
    print("-" * 73)
    for r in rows:
        print(f"{r['latency_ms']:>8.0f} {r['mode']:>8} {r['threads']:>7} {r['commit_s']:>9.2f} {r['requests']:>8.0f} "
              f"{args.files / r['commit_s']:>8.1f}  {', '.join(f'{t:.2f}' for t in r['runs'])}")

    def row(latency: float, mode: str) -> dict[str, Any]:
        return next(r for r in rows if r["latency_ms"] == latency and r["mode"] == mode)

    top = max(r["latency_ms"] for r in rows)
    print(json.dumps({
        "files": args.files, "superseded": args.superseded, "threads": pool, "latency_ms": top,
        "serial_commit_s": round(row(top, "serial")["commit_s"], 3),
        "pooled_commit_s": round(row(top, "pool")["commit_s"], 3),
        "batched_commit_s": round(row(top, "batched")["commit_s"], 3),
        "speedup": round(row(top, "serial")["commit_s"] / row(top, "batched")["commit_s"], 2),
        "speedup_by_latency_ms": {str(int(lat)): round(row(lat, "serial")["commit_s"] / row(lat, "batched")["commit_s"], 2)
                                  for lat in sorted({r["latency_ms"] for r in rows})},
        "requests": {m: row(top, m)["requests"] for m in modes},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
