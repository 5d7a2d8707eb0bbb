"""The copy-on-write of one updated scene in a partition of folded files: every file read whole, or probed first.

When a newer STAC ``updated`` reprocesses a scene, the unit that commits it rewrites, without the scene's old rows,
every file of the scene's partition that holds them (``pipelines.archive.ledger.rewrite_without``). After a run's
fold a partition's files are large (up to ``output.fold_bytes``, 128 MiB by default). This benchmark writes
``--files`` such files of about ``--mib`` MiB each (tiles rows with incompressible captions; scene ids in no order, so
no file is ruled out by its statistics alone) into one partition of a real S3-compatible server (moto), and then,
through a proxy that adds a fixed delay to every request and holds each ranged GET for the time its bytes take on a
link of ``--mib-per-s`` shared by all requests (a worker's bandwidth; every read here is ranged), alternating,
median of ``--repeats``, rewrites one scene of the last file out:

- ``whole``: every file read whole (as the copy-on-write reads a unit's small files: concurrently, in batches of
  64 MiB; forced here by raising ``WHOLE_READ_BYTES`` above the files' size);
- ``probed``: files over ``WHOLE_READ_BYTES`` (1 MiB) probed (concurrently) by ranged reads of their footer and
  of their ``scene_id`` and ``output_key`` columns, and only the file that holds the scene read whole.

Both must stage the same rewritten file and delete the same file (checked). Bytes are counted where the store's
reads return them, requests at the proxy. Prints a table, then one JSON line (``speedup``: whole over probed
seconds, ``bytes_read`` and ``requests`` of each, at the largest delay). Usage::

    .venv/bin/python benchmarks/cow.py [--files 8] [--mib 8] [--latency-ms 0,25] [--mib-per-s 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTITION = ("bench", "2024-06-01")


def _write_files(store: Any, files: int, mib: float, scenes: int) -> tuple[list[str], str]:
    """``files`` tiles files of about ``mib`` MiB in one partition, ``scenes`` scenes each (random ids); the paths
    and one scene of the last file."""
    import hashlib

    import shapely

    from pipelines.archive.fold import FOLD_ROW_GROUP_ROWS
    from pipelines.archive.store import build_frame, partition_dir

    rows_per_file = int(mib * 2**20 / 520)  # a 1,000-character hex caption compresses to about 500 bytes
    paths: list[str] = []
    scene = ""
    for f in range(files):
        ids = [hashlib.sha1(f"{f}-{s}".encode()).hexdigest()[:16] for s in range(scenes)]
        records = [{"scene_id": ids[r % scenes], "tile_id": f"t{r}", "output_key": "bench",
                    "unit_id": f"bench-u{f:05d}", "run_id": "bench", "caption": os.urandom(500).hex()}
                   for r in range(rows_per_file)]
        geoms = [shapely.box(f, r * 1e-4, f + 1e-3, r * 1e-4 + 1e-3) for r in range(rows_per_file)]
        frame = build_frame("tiles", records, geoms)
        path = f"{partition_dir('tiles', *PARTITION)}/part-bench-u{f:05d}-fold0.parquet"
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False, schema_version="1.1.0", write_covering_bbox=True,
                         row_group_size=FOLD_ROW_GROUP_ROWS, compression="zstd")
        store.write_bytes(path, buf.getvalue())
        paths.append(path)
        scene = ids[0]
    return paths, scene


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8, help="folded files in the scene's partition")
    parser.add_argument("--mib", type=float, default=8.0, help="size of each file, about")
    parser.add_argument("--scenes", type=int, default=40, help="scenes each file holds")
    parser.add_argument("--latency-ms", default="0,25", help="delays added to every request, comma-separated")
    parser.add_argument("--mib-per-s", type=float, default=100.0,
                        help="the shared link's rate the proxy holds ranged GETs to (0: the local server's own; below about "
                        "5, queued GETs pass s3fs's 15 s read timeout and are retried)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import threading

    import pipelines.archive.ledger as ledger_module
    from pipelines.archive.store import OutputStore

    read = {"bytes": 0}
    counting = threading.Lock()  # the probes read on several threads
    read_bytes, ranges_read = OutputStore.read_bytes, ledger_module._Ranges.read

    def counted_read_bytes(self: Any, path: str) -> bytes:
        data = read_bytes(self, path)
        with counting:
            read["bytes"] += len(data)
        return data

    def counted_ranges(self: Any, size: int = -1) -> bytes:
        data = ranges_read(self, size)
        with counting:
            read["bytes"] += len(data)
        return data

    probe_over = ledger_module.WHOLE_READ_BYTES
    OutputStore.read_bytes = counted_read_bytes  # type: ignore[method-assign]
    ledger_module._Ranges.read = counted_ranges  # type: ignore[method-assign]
    try:
        return _run(args, read, probe_over)
    finally:  # as they were (a test runs this in its own process's session)
        OutputStore.read_bytes = read_bytes  # type: ignore[method-assign]
        ledger_module._Ranges.read = ranges_read  # type: ignore[method-assign]
        ledger_module.WHOLE_READ_BYTES = probe_over


def _run(args: argparse.Namespace, read: dict[str, int], probe_over: int) -> int:
    import s3fs

    import pipelines.archive.ledger as ledger_module
    from pipelines.archive.ledger import rewrite_without
    from pipelines.archive.store import OutputStore
    from tests.reliability.faults import delayed_s3_stores

    latencies = [float(x) for x in args.latency_ms.split(",")]
    rows: list[dict[str, Any]] = []
    setup: dict[str, Any] = {}
    for latency, store, proxy in delayed_s3_stores("cow-bench", latencies, args.mib_per_s or None):
        s3fs.S3FileSystem.clear_instance_cache()
        if not setup:
            direct = OutputStore(store.url(), {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
            t0 = time.perf_counter()
            paths, scene = _write_files(direct, args.files, args.mib, args.scenes)
            sizes = direct.sizes(paths[0].rsplit("/", 1)[0])
            setup = {"write_s": time.perf_counter() - t0, "scene": scene, "paths": paths, "root": store.url(),
                     "bytes": sum(sizes.values()), "smallest": min(sizes.values())}
            if setup["smallest"] <= probe_over:
                raise SystemExit(f"--mib {args.mib}: the files must be over {probe_over} bytes to be probed")
        store = OutputStore(setup["root"], {"endpoint_url": proxy.url})  # the files written at the first delay
        cat_ranges = store.fs.cat_ranges

        def counted_cat_ranges(*a: Any, cat_ranges: Any = cat_ranges, **kw: Any) -> list[Any]:
            blobs = cat_ranges(*a, **kw)
            read["bytes"] += sum(len(b) for b in blobs if isinstance(b, bytes | bytearray))
            return list(blobs)

        store.fs.cat_ranges = counted_cat_ranges  # this filesystem instance only (dropped with the server)
        results: dict[str, Any] = {}
        times: dict[str, list[float]] = {"whole": [], "probed": []}
        requests: dict[str, list[int]] = {"whole": [], "probed": []}
        fetched: dict[str, list[int]] = {"whole": [], "probed": []}
        for _ in range(args.repeats):
            for side in ("whole", "probed"):
                ledger_module.WHOLE_READ_BYTES = 2**62 if side == "whole" else probe_over
                n0, t0 = len(proxy.log), time.perf_counter()
                read["bytes"] = 0
                staged, delete = rewrite_without(store, "_staging/cow-u00000", "cow-u00000", ["tiles"],
                                                 {PARTITION: [setup["scene"]]}, "bench")
                times[side].append(time.perf_counter() - t0)
                requests[side].append(len(proxy.log) - n0)
                fetched[side].append(read["bytes"])
                results[side] = (delete, [(f.final, len(store.read_bytes(f.staged))) for f in staged])
                store.remove("_staging/cow-u00000", recursive=True)
        ledger_module.WHOLE_READ_BYTES = probe_over
        if results["whole"] != results["probed"] or results["probed"][0] != [setup["paths"][-1]]:
            raise RuntimeError(f"the two reads rewrote different files: {results}")
        for side in ("whole", "probed"):
            rows.append({"latency_ms": latency, "side": side, "s": statistics.median(times[side]),
                         "requests": statistics.median(requests[side]), "bytes": statistics.median(fetched[side]),
                         "runs": times[side]})

    print(f"copy-on-write of one scene: {args.files} folded files of {setup['bytes'] / args.files / 2**20:.1f} MiB "
          f"in its partition ({setup['bytes'] / 2**20:.0f} MiB, written in {setup['write_s']:.0f} s); moto S3 behind "
          f"a proxy adding the delay to every request"
          + (f" and ranged GETs to a shared {args.mib_per_s:g} MiB/s link" if args.mib_per_s else "")
          + f", median of {args.repeats}")
    print(f"{'delay ms':>8} {'reads':>7} {'seconds':>8} {'requests':>8} {'MiB read':>9}  runs")
    print("-" * 66)
    for r in rows:
        print(f"{r['latency_ms']:>8.0f} {r['side']:>7} {r['s']:>8.3f} {r['requests']:>8.0f} "
              f"{r['bytes'] / 2**20:>9.2f}  {', '.join(f'{t:.3f}' for t in r['runs'])}")
    top = max(latencies)
    whole, probed = (next(r for r in rows if (r["latency_ms"], r["side"]) == (top, s)) for s in ("whole", "probed"))
    print(json.dumps({
        "files": args.files, "file_mib": round(setup["bytes"] / args.files / 2**20, 2), "latency_ms": top,
        "mib_per_s": args.mib_per_s or None,
        "speedup": round(whole["s"] / probed["s"], 2), "s": [round(whole["s"], 3), round(probed["s"], 3)],
        "requests": [whole["requests"], probed["requests"]],
        "bytes_read": [int(whole["bytes"]), int(probed["bytes"])],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
