"""Makes the embedded-default demo model ``models/earthgpt-toy/`` (the model ``earthgpt demo`` loads).

It is the export of the learning proof (``benchmarks/toyworld_learning.py``): EarthGPT-small trained from seed 0 on the
seed-0 toy world with ``configs/train/toyworld-small.yaml`` (2 Ray workers, DeepSpeed ZeRO-2, CPU, 15 minutes).
Training on a shared 2-core machine is not bit-reproducible (thread timing changes the data order the two workers
see), so a rerun gives a model of the same quality, not the same bytes. The folder gets a ``MODEL_CARD.md`` with the
command, seeds and held-out figures.

Usage::

    .venv/bin/python scripts/make_demo_model.py            # train (about 20 minutes), then install
    .venv/bin/python scripts/make_demo_model.py --reuse    # install the last proof's export (out/earthgpt-toy)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "models" / "earthgpt-toy"
EXPORT = REPO / "out" / "earthgpt-toy"
RESULTS = REPO / "benchmarks" / "results" / "results.json"
MAX_MB = 20.0


def _card(results: dict, command: str, exported: dict) -> str:
    det = results["trained"].get("detect", {})
    rows = []
    for task, metrics in results["trained"].items():
        for name, value in metrics.items():
            rows.append(f"| {task} | {name} | {value:.4f} |")
    world = results.get("world")
    return "\n".join(
        [
            "# earthgpt-toy",
            "",
            "EarthGPT `small` preset (64-px input, ~1.6 M parameters) trained from scratch on the synthetic toy world",
            "(`catalogs.toyworld`) by the project's training job. It is the embedded default of `earthgpt demo`;",
            "it knows only the toy world (ships, buildings, airplanes, vehicles on 64-px optical/SAR/thermal chips).",
            "",
            f"- made by: `{command}`",
            f"- toy world: `generate_toyworld(out/toyworld-train, **{world})`; model seed "
            f"{results['config']['model']['seed']}, data seed {results['config']['model']['seed']}",
            f"- training: {results['global_batch']} examples per step, 2 Ray workers, DeepSpeed ZeRO-2, fp32, CPU; "
            f"this export is the checkpoint of step {exported['step']} ({exported['elapsed_s'] / 60:.1f} min of "
            f"training, {exported['samples']} samples)",
            f"- held-out scenes: detection F1@0.5 {det.get('F1', 0):.3f}, count accuracy "
            f"{det.get('count_accuracy', 0):.3f}; answer loss {results['heldout_loss']['trained']:.3f} "
            f"(untrained {results['heldout_loss']['untrained']:.3f})",
            "",
            "| task | metric | value |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Trains (unless ``--reuse``) and installs the demo model; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reuse", action="store_true", help="install out/earthgpt-toy from the last proof run"
    )
    args = parser.parse_args(argv)
    command = "python scripts/make_demo_model.py"
    if not args.reuse:
        proof = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "toyworld_learning.py")], check=False
        )
        if proof.returncode not in (0, 1):  # 1: ran, but below the proof's targets; still a usable demo model
            return proof.returncode
    if not (EXPORT / "model.safetensors").exists() or not RESULTS.exists():
        print(f"no export at {EXPORT} (or no {RESULTS}): run without --reuse", file=sys.stderr)
        return 2
    results = json.loads(RESULTS.read_text())
    if DEST.exists():
        shutil.rmtree(DEST)
    DEST.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(EXPORT, DEST)
    exported = json.loads((EXPORT / "training_state.json").read_text())
    (DEST / "MODEL_CARD.md").write_text(_card(results, command, exported))
    size_mb = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file()) / 2**20
    if size_mb > MAX_MB:
        shutil.rmtree(DEST)
        print(f"demo model is {size_mb:.1f} MB > {MAX_MB} MB: not installed", file=sys.stderr)
        return 3
    print(f"installed {DEST} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
