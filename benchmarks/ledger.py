"""The ledger at archive scale on an object store: a quiet night's lookup and a night's compaction, old and new.

A ledger of ``--scenes`` committed scenes (Sentinel-2-like or Landsat-like ids, ``--ids``, over a year, in units of
50,000, folded by the real ``Ledger.compact`` into one base file) lies in a real S3-compatible server (moto), behind a proxy that counts requests
and bytes. Side by side, alternating, median of ``--repeats``:

1. **quiet night**: the ledger entries of one page of listed ids (``--page`` ids, all committed: the newest date's,
   as a nightly search returns them; and, as the worst case, ids drawn from the whole year). Before: the whole
   index (``committed_table``), then the page's rows (what the job read before the quiet-night check). Now:
   ``committed_entries`` with the page's dates, as the job calls it (the footer and the row groups of the ledger,
   sorted by date then id, whose statistics can hold a listed date and id).
2. **nightly compaction**: a night's ``--night-units`` unit records (50 scenes each) folded with the ledger. Before:
   every compaction rewrote the whole ledger (``merge_ratio=inf``). Now (size-tiered, the default ``merge_ratio``):
   the night's records go into a small file beside the base.

Both sides must return the same entries (checked). Prints a table, then one JSON line (``lookup_bytes_ratio``,
``lookup_speedup``, ``compaction_bytes_ratio``, ``compaction_speedup``). Usage::

    .venv/bin/python benchmarks/ledger.py [--scenes 1000000] [--page 100] [--repeats 3] [--ids landsat]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNIT = 50_000
DAY0 = date(2024, 1, 1)


def scene_ids(n: int, scheme: str = "sentinel-2", seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (scene id, date) pairs spread over a year: ids like Sentinel-2 L2A's (the date early in the id) or
    Landsat's (``LC08_L2SP_PPPRRR_YYYYMMDD_...``: the path and row first, so one date's ids span the whole range)."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        day = DAY0 + timedelta(days=k * 365 // n)
        if scheme == "landsat":
            scene = f"LC0{8 + k % 2}_L2SP_{rng.randint(1, 233):03d}{rng.randint(1, 248):03d}_{day:%Y%m%d}_" \
                    f"{day + timedelta(days=9):%Y%m%d}_02_T1_{k:08d}"
        else:
            tile = f"{rng.randint(1, 60):02d}{rng.choice('CDEFGHJKLMNPQRSTUVWX')}{rng.choice('ABCDEFGH')}" \
                   f"{rng.choice('ABCDEFGHJKLMNPQRSTUV')}"
            scene = f"S2{'AB'[k % 2]}_MSIL2A_{day:%Y%m%d}T{k % 240000:06d}_N0510_R{k % 143:03d}_T{tile}_{k:08d}"
        out.append((scene, f"{day:%Y-%m-%d}"))
    return out


def page_dates(page: list[tuple[str, str]]) -> list[str]:
    """The dates the job's quiet-night check looks the page up with (each item's date, a day either side,
    ``unknown``): the job's own helper, on items carrying only an id and a datetime."""
    from pipelines.archive.source import _entry_dates

    return _entry_dates([{"id": s, "properties": {"datetime": f"{d}T10:30:00Z"}} for s, d in page])


def _measure(proxy: Any, fn: Any) -> tuple[float, int, int, int, Any]:
    n0, up0, down0 = len(proxy.log), proxy.bytes_up, proxy.bytes_down
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    return took, len(proxy.log) - n0, proxy.bytes_down - down0, proxy.bytes_up - up0, out


def _medians(part: str, runs: dict[str, list[tuple[float, int, int, int]]]) -> list[dict[str, Any]]:
    """One table row per side: median seconds, requests, MB read and MB written of its runs."""
    return [{"part": part, "side": side, "s": statistics.median(r[0] for r in runs[side]),
             "requests": statistics.median(r[1] for r in runs[side]),
             "mb_read": statistics.median(r[2] for r in runs[side]) / 1e6,
             "mb_written": statistics.median(r[3] for r in runs[side]) / 1e6} for side in ("before", "now")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=1_000_000, help="committed scenes in the ledger")
    parser.add_argument("--page", type=int, default=100, help="ids listed by a quiet night's search")
    parser.add_argument("--night-units", type=int, default=64, help="unit records a night folds (compact's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ids", choices=("sentinel-2", "landsat"), default="sentinel-2", help="the id scheme")
    args = parser.parse_args(argv)

    import pyarrow.compute as pc

    from pipelines.archive.ledger import Ledger, UnitRecord
    from tests.reliability.faults import delayed_s3_stores

    updated = datetime(2025, 1, 1, tzinfo=timezone.utc)
    scenes = scene_ids(args.scenes, args.ids)
    # a bucket of its own: the in-process S3 server keeps its objects for the life of this process
    stores = delayed_s3_stores(f"ledger-bench-{os.urandom(4).hex()}", [0.0])
    _latency, store, proxy = next(stores)
    try:
        ledger = Ledger(store)
        t0 = time.perf_counter()
        for u, lo in enumerate(range(0, len(scenes), UNIT)):
            ledger.commit(UnitRecord(f"seed-u{u:05d}", "seed", "k",
                                     scenes=[("sentinel-2-l2a", s, d, updated) for s, d in scenes[lo:lo + UNIT]]))
        folded = ledger.compact(min_files=1)
        (base,) = store.glob("_ledger/*.parquet")
        base_bytes = store.fs.size(store.full(base))
        print(f"ledger: {args.scenes} scenes ({args.ids} ids) in {folded} units folded into one file of {base_bytes / 1e6:.1f} MB "
              f"({time.perf_counter() - t0:.1f} s); moto S3 behind a counting proxy, median of {args.repeats}")

        newest = scenes[-args.page:]
        spread = random.Random(1).sample(scenes, args.page)

        def before(ids: list[str]) -> Any:
            whole = ledger.committed_table("k")  # the whole index, then the page's rows
            return whole.filter(pc.is_in(whole["scene_id"], value_set=pc.cast(ids, "string")))

        rows: list[dict[str, Any]] = []
        for label, page in (("newest date", newest), ("spread over the year", spread)):
            ids, dates = [s for s, _ in page], page_dates(page)
            runs: dict[str, list[tuple[float, int, int, int]]] = {"before": [], "now": []}
            answers = {}
            for _ in range(args.repeats):
                for side, fn in (("before", lambda ids=ids: before(ids)),
                                 ("now", lambda ids=ids, dates=dates: ledger.committed_entries("k", ids, dates))):
                    took, requests, down, up, out = _measure(proxy, fn)
                    runs[side].append((took, requests, down, up))
                    answers[side] = sorted(out.to_pylist(), key=lambda r: r["scene_id"])
            if answers["before"] != answers["now"] or len(answers["now"]) != len(ids):
                raise RuntimeError(f"{label}: the lookup returned other entries than the whole index")
            rows += _medians(f"quiet night, {label}", runs)

        # a night's unit records, then compaction; each side on the ledger as the other left it (same entries)
        comp: dict[str, list[tuple[float, int, int, int]]] = {"before": [], "now": []}
        night = 0
        for _ in range(args.repeats):
            for side, ratio in (("before", float("inf")), ("now", 8.0)):
                for u in range(args.night_units):
                    ledger.commit(UnitRecord(f"night{night}-u{u:05d}", f"night{night}", "k",
                                             scenes=[("sentinel-2-l2a", f"NEW_{night}_{u}_{j}", "2025-01-01",
                                                      updated) for j in range(50)]))
                night += 1
                took, requests, down, up, n_files = _measure(
                    proxy, lambda r=ratio: ledger.compact(min_files=args.night_units, merge_ratio=r))
                if n_files < args.night_units:
                    raise RuntimeError(f"compaction folded {n_files} files, expected at least {args.night_units}")
                comp[side].append((took, requests, down, up))
        rows += _medians(f"compaction of {args.night_units} units", comp)
        total = ledger.committed_table("k").num_rows
        expected = args.scenes + night * args.night_units * 50
        if total != expected:
            raise RuntimeError(f"{total} scenes committed after the compactions, expected {expected}")
    finally:
        stores.close()  # the proxy and the server stop

    print(f"{'part':<34} {'side':<7} {'seconds':>8} {'requests':>8} {'MB read':>9} {'MB written':>10}")
    print("-" * 82)
    for r in rows:
        print(f"{r['part']:<34} {r['side']:<7} {r['s']:>8.3f} {r['requests']:>8.0f} {r['mb_read']:>9.3f} "
              f"{r['mb_written']:>10.3f}")

    def pair(part: str) -> tuple[dict[str, Any], dict[str, Any]]:
        old = next(r for r in rows if r["part"].startswith(part) and r["side"] == "before")
        new = next(r for r in rows if r["part"].startswith(part) and r["side"] == "now")
        return old, new

    look_old, look_new = pair("quiet night, newest")
    spread_old, spread_new = pair("quiet night, spread")
    comp_old, comp_new = pair("compaction")
    print(json.dumps({
        "scenes": args.scenes, "ids": args.ids, "page": args.page, "ledger_mb": round(base_bytes / 1e6, 2),
        "lookup_bytes_ratio": round(look_new["mb_read"] / look_old["mb_read"], 4),
        "lookup_speedup": round(look_old["s"] / look_new["s"], 2),
        "lookup_mb": [round(look_old["mb_read"], 3), round(look_new["mb_read"], 3)],
        "spread_lookup_bytes_ratio": round(spread_new["mb_read"] / spread_old["mb_read"], 4),
        "spread_lookup_speedup": round(spread_old["s"] / spread_new["s"], 2),
        "compaction_bytes_ratio": round((comp_new["mb_read"] + comp_new["mb_written"])
                                        / (comp_old["mb_read"] + comp_old["mb_written"]), 4),
        "compaction_speedup": round(comp_old["s"] / comp_new["s"], 2),
        "compaction_s": [round(comp_old["s"], 3), round(comp_new["s"], 3)],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
