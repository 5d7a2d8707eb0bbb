"""A unit's commit on an object store: its files published one after another against on a thread pool.

``Ledger.commit`` writes the unit's record, then moves every staged file to its final path (on S3: a copy and a
delete, several requests each) and deletes the files it supersedes. It runs in the job's driver, between two units:
while it runs, no batch is taken from the model actors. This benchmark commits the same units through the real
``Ledger.commit`` on a real S3-compatible server (moto), behind a proxy that adds a fixed delay to every request (an
object store's round trip; 0 ms is the local server alone), with ``PUBLISH_THREADS = 1`` (files one after another,
the job as it was) and the default pool, alternating, and counts the requests at the proxy.

Prints a table, then one JSON line (``speedup`` at the largest delay). Usage::

    .venv/bin/python benchmarks/publish.py [--files 60] [--latency-ms 0,25,50] [--repeats 3]
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


def _commit_once(ledger: Any, unit_id: str, files: int, size: int) -> float:
    from pipelines.archive.ledger import UnitRecord
    from pipelines.archive.store import StagedFile

    staging = ledger.staging_dir(unit_id)
    publish = []
    for k in range(files):
        final = f"tiles/collection=s2/date=2024-06-{k % 28 + 1:02d}/part-{unit_id}-{k}.parquet"
        ledger.store.write_bytes(f"{staging}/{final}", os.urandom(size))
        publish.append(StagedFile(staged=f"{staging}/{final}", final=final))
    record = UnitRecord(unit_id=unit_id, run_id=unit_id.rsplit("-", 1)[0], output_key="bench",
                        scenes=[("s2", f"scene-{unit_id}", "2024-06-01", datetime(2024, 6, 2, tzinfo=timezone.utc))],
                        publish=publish, delete=[])
    t0 = time.perf_counter()
    ledger.commit(record)
    took = time.perf_counter() - t0
    missing = [f.final for f in publish if not ledger.store.exists(f.final)]
    if missing:
        raise RuntimeError(f"{len(missing)} files were not published (first: {missing[0]})")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=60, help="files per unit (about three Sentinel-2 scenes)")
    parser.add_argument("--size", type=int, default=20_000, help="bytes per file")
    parser.add_argument("--latency-ms", default="0,25,50", help="delays added to every request, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from pipelines.archive import ledger as ledger_mod
    from pipelines.archive.ledger import Ledger
    from pipelines.archive.store import OutputStore
    from tests.harness.servers import start_s3
    from tests.reliability.faults import FaultProxy

    pool = ledger_mod.PUBLISH_THREADS
    s3 = start_s3()
    rows: list[dict[str, Any]] = []
    try:
        os.environ.update(s3.env)  # the server's credentials
        bucket = s3.make_bucket("publish-bench")
        for latency in [float(x) for x in args.latency_ms.split(",")]:
            def delay(req: Any, latency: float = latency) -> str:
                time.sleep(latency / 1000)
                return "pass"

            proxy = FaultProxy(s3.endpoint_url, delay)
            try:
                store = OutputStore(f"s3://{bucket}/lat{int(latency)}", {"endpoint_url": proxy.url})
                ledger = Ledger(store)
                _commit_once(ledger, "warmup-u00000", args.files, args.size)  # connections, first imports
                times: dict[int, list[float]] = {1: [], pool: []}
                requests: dict[int, list[int]] = {1: [], pool: []}
                for rep in range(args.repeats):
                    for threads in (1, pool):
                        ledger_mod.PUBLISH_THREADS = threads
                        before = len(proxy.log)
                        # the staging writes are counted apart: only the commit's own requests
                        unit = f"run{rep}t{threads}-u{rep:05d}"
                        took = _commit_once(ledger, unit, args.files, args.size)
                        times[threads].append(took)
                        commit_requests = sum(1 for n, method, path, _ in proxy.log[before:]
                                              if f"_staging/{unit}/" not in path or method != "PUT")
                        requests[threads].append(commit_requests)
                for threads in (1, pool):
                    rows.append({"latency_ms": latency, "threads": threads,
                                 "commit_s": statistics.median(times[threads]), "runs": times[threads],
                                 "requests": statistics.median(requests[threads])})
            finally:
                ledger_mod.PUBLISH_THREADS = pool
                proxy.stop()
    finally:
        s3.stop()

    print(f"unit commit: {args.files} files of {args.size} B, moto S3 behind a delaying proxy, "
          f"median of {args.repeats}")
    print(f"{'delay ms':>8} {'threads':>7} {'commit s':>9} {'requests':>8} {'files/s':>8}  runs")
    print("-" * 64)
    for r in rows:
        print(f"{r['latency_ms']:>8.0f} {r['threads']:>7} {r['commit_s']:>9.2f} {r['requests']:>8.0f} "
              f"{args.files / r['commit_s']:>8.1f}  {', '.join(f'{t:.2f}' for t in r['runs'])}")
    speedups = {}
    for latency in sorted({r["latency_ms"] for r in rows}):
        serial = next(r for r in rows if r["latency_ms"] == latency and r["threads"] == 1)
        pooled = next(r for r in rows if r["latency_ms"] == latency and r["threads"] == pool)
        speedups[latency] = serial["commit_s"] / pooled["commit_s"]
    top = max(speedups)
    print(json.dumps({
        "files": args.files, "threads": pool, "latency_ms": top,
        "serial_commit_s": round(next(r["commit_s"] for r in rows if r["latency_ms"] == top and r["threads"] == 1), 3),
        "pooled_commit_s": round(next(r["commit_s"] for r in rows if r["latency_ms"] == top and r["threads"] == pool),
                                 3),
        "speedup": round(speedups[top], 2),
        "speedup_by_latency_ms": {str(int(k)): round(v, 2) for k, v in speedups.items()},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
