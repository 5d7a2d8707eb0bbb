"""Archive job figures, measured in one go on the toy world (local outputs, embedded catalog, local Ray):

- first run vs rerun wall time (the rerun finds every scene committed): the ratio the incremental design promises;
- tiles per second of the first run;
- the driver's peak memory for N and 3N scenes at the same wave size: streaming keeps it flat.

Each run is a fresh process (peak RSS only grows). Usage::

    .venv/bin/python benchmarks/infer_rerun.py [--scenes 3] [--wave-size 3] [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _one_run(args: argparse.Namespace) -> None:
    from pipelines.config import parse_config
    from pipelines.infer import run

    config = parse_config({
        "catalog": {"embedded": {"collections": args.collections, "items": args.items},
                    "collections": ["toyworld-optical", "toyworld-sar", "toyworld-thermal"],
                    "asset_prefixes": [args.cogs]},
        "tasks": ["caption", "detect"],
        "tiling": {"size": 64, "overlap": 16, "min_valid_fraction": 0.5},
        "model": {"name_or_path": args.model, "max_new_tokens": 16},
        "actors": {"batch_size": 32, "read_num_cpus": 0.5},
        "ray": {"object_store_mb": 256},
        "output": {"root": args.root, "wave_size": args.wave_size},
    })
    summary = run(config, say=lambda _line: None)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": summary.wall_s, "tiles": summary.tiles_written, "scenes": summary.scenes_processed,
                      "skipped": summary.scenes_skipped, "tiles_per_s": summary.tiles_per_s, "peak_mb": peak_mb}))


def _child(world: Path, items: Path, root: Path, wave_size: int, model: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--items", str(items), "--root", str(root),
           "--cogs", (world / "cogs").as_uri(), "--wave-size", str(wave_size), "--model", model,
           "--collections", *map(str, sorted((world / "stac" / "collections").glob("*.json")))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--wave-size", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cogs", help=argparse.SUPPRESS)
    parser.add_argument("--collections", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _one_run(args)
        return

    from catalogs.toyworld import generate_toyworld

    with tempfile.TemporaryDirectory() as tmp:
        world_dir = Path(tmp) / "world"
        world = generate_toyworld(world_dir, scenes=3 * args.scenes, seed=0, chips_per_scene=1,
                                  href_base=world_dir.as_uri())
        lines = world.items_path.read_text().splitlines()
        small = Path(tmp) / "small.ndjson"
        small.write_text("\n".join(lines[: args.scenes]) + "\n")
        first = _child(world_dir, small, Path(tmp) / "out-small", args.wave_size, args.model)
        rerun = _child(world_dir, small, Path(tmp) / "out-small", args.wave_size, args.model)
        large = _child(world_dir, world.items_path, Path(tmp) / "out-large", args.wave_size, args.model)

    print(f"{'run':<34}{'scenes':>7}{'tiles':>7}{'wall s':>9}{'tiles/s':>9}{'driver peak MB':>16}")
    for name, r in ((f"first run ({args.scenes} scenes)", first), ("rerun (all committed)", rerun),
                    (f"first run ({3 * args.scenes} scenes)", large)):
        print(f"{name:<34}{r['scenes']:>7}{r['tiles']:>7}{r['wall_s']:>9.2f}{r['tiles_per_s']:>9.1f}"
              f"{r['peak_mb']:>16.0f}")
    print(f"rerun / first run wall time: {rerun['wall_s'] / first['wall_s']:.4f}")
    print(f"driver peak memory, {3 * args.scenes} vs {args.scenes} scenes (wave size {args.wave_size}): "
          f"{large['peak_mb'] / first['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
