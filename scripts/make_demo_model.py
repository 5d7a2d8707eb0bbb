"""Makes the embedded-default demo model ``models/earthgpt-toy/`` (the model ``earthgpt demo`` loads).

Steps, all through the project's own commands:

1. **Data**: the demo toy world ``out/toyworld-demo`` (:data:`WORLD`: seed 0, 48 scenes, the last scene of each sensor
   held out) and its MMRS-1M files (detection, classification, counting, grounding, captions, region captions,
   multi-turn), and a second world ``out/toyworld-seed1000`` (:data:`UNSEEN_WORLD`, a seed no training ever used) that
   is only evaluated.
2. **Training**: ``earthgpt train configs/train/earthgpt-toy.yaml`` (2 Ray workers, DeepSpeed ZeRO-2, fp32, CPU),
   warm-started from the committed demo model (copied to ``out/earthgpt-toy-init`` first, so the folder being replaced
   is never read by the run); the config's comments say why each choice. ``--from-scratch`` drops the warm start.
   Held-out loss, detection F1, count, classification and caption scores are logged every ``eval_every`` steps (the
   learning curve, ``out/train-runs/earthgpt-toy.metrics.jsonl``); checkpoints are kept along the way.
3. **Evaluation**: ``earthgpt eval`` of the export on the held-out scenes and on the unseen-seed world.
4. **Install**: the export is copied to ``models/earthgpt-toy/`` (refused above 20 MB) with a ``MODEL_CARD.md`` holding
   the command, the lineage, both evaluations and the learning curve.

Training on a shared 2-core machine is not bit-reproducible (thread timing changes the data order the two workers
see), so a rerun gives a model of similar quality, not the same bytes.

Usage::

    .venv/bin/python scripts/make_demo_model.py                     # data, train (about an hour), eval, install
    .venv/bin/python scripts/make_demo_model.py --set schedule.max_minutes=30   # any training-config override
    .venv/bin/python scripts/make_demo_model.py --reuse             # eval + install the last export (out/earthgpt-toy)
    .venv/bin/python scripts/make_demo_model.py --reuse --checkpoint out/train-runs/earthgpt-toy/checkpoint_...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "configs" / "train" / "earthgpt-toy.yaml"
DEST = REPO / "models" / "earthgpt-toy"
INIT = REPO / "out" / "earthgpt-toy-init"
EXPORT = REPO / "out" / "earthgpt-toy"
WORLD_DIR = REPO / "out" / "toyworld-demo"
UNSEEN_DIR = REPO / "out" / "toyworld-seed1000"
METRICS_LOG = REPO / "out" / "train-runs" / "earthgpt-toy.metrics.jsonl"
MAX_MB = 20.0

WORLD: dict[str, Any] = {"scenes": 48, "seed": 0, "chips_per_scene": 500, "val_chips_per_scene": 200}
"""The training world: 16 scenes per sensor, the last of each held out (600 held-out chips)."""

UNSEEN_WORLD: dict[str, Any] = {"scenes": 6, "seed": 1000, "chips_per_scene": 8, "val_chips_per_scene": 200}
"""A world from a seed no training used; its held-out scenes (600 chips) are what the model is scored on."""

EVAL_TAGS = ("det", "cls", "cap", "count_vqa")
"""Held-out files scored by ``earthgpt eval`` (the targets, and CIDEr); ``--eval-tags`` adds ``region_cap``, ``rsvg``."""


def prepare_world(root: Path, params: dict[str, Any]) -> Path:
    """Generates a toy world and its MMRS-1M files once (a stamp records the parameters)."""
    from catalogs.toyworld import generate_toyworld
    from pipelines.mmrs import write_mmrs

    stamp = root / "world.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params and (root / "mmrs").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    write_mmrs(generate_toyworld(root, **params).root)
    stamp.write_text(json.dumps(params))
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def evaluate(model: Path, worlds: dict[str, Path], limit: int, tags: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``earthgpt eval MODEL <held-out files> --limit N --max-new-tokens 96 --out FILE`` for each world, side by side
    (one process per world); returns each run's JSON by world name."""
    procs = {}
    for name, world in worlds.items():
        files = [str(world / "mmrs" / f"toyworld_{tag}_val.json") for tag in tags]
        out = REPO / "out" / f"eval-earthgpt-toy-{name}.json"
        cmd = [sys.executable, "-m", "pipelines.cli", "eval", str(model), *files, "--limit", str(limit),
               "--max-new-tokens", "96", "--out", str(out)]  # fmt: skip
        print("[demo-model] " + " ".join(cmd), flush=True)
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=_env()), out)
    results = {}
    for name, (proc, out) in procs.items():
        if proc.wait() != 0:
            raise RuntimeError(f"earthgpt eval on {name} failed (exit {proc.returncode})")
        results[name] = dict(json.loads(out.read_text()))
    return results


def learning_curve(log: Path) -> list[dict[str, Any]]:
    """The evaluation points of the training metrics log (one row per evaluation)."""
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_loss" in r]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def card(command: str, heldout: dict[str, Any], unseen: dict[str, Any], curve: list[dict[str, Any]],
         state: dict[str, Any], size_mb: float, lineage: str) -> str:  # fmt: skip
    """The model card: what it is, how it was made, measured figures only."""
    keys = [("detect", "F1"), ("detect", "precision"), ("detect", "recall"), ("detect", "mAP"),
            ("detect", "count_accuracy"), ("classify", "accuracy"), ("vqa", "accuracy"), ("caption", "CIDEr"),
            ("caption", "BLEU-4"), ("caption", "ROUGE-L"), ("region_caption", "CIDEr"), ("ground", "Acc@0.5")]  # fmt: skip
    rows = []
    for task, name in keys:
        a = heldout["metrics"].get(task, {}).get(name)
        b = unseen["metrics"].get(task, {}).get(name)
        if a is not None or b is not None:
            rows.append(f"| {task} | {name} | {_fmt(a)} | {_fmt(b)} |")
    n_rows = [f"| {task} | n | {int(heldout['metrics'][task]['n'])} | "
              f"{int(unseen['metrics'].get(task, {}).get('n', 0))} |" for task in sorted(heldout["metrics"])]  # fmt: skip
    curve_rows = [
        f"| {r['step']} | {r['samples']} | {r['elapsed_min']:.1f} | {r['eval_loss']:.3f} | "
        f"{_fmt(r.get('eval/detect/F1'))} | {_fmt(r.get('eval/detect/count_accuracy'))} | "
        f"{_fmt(r.get('eval/classify/accuracy'))} | {_fmt(r.get('eval/caption/CIDEr'))} |"
        for r in curve
    ]
    return "\n".join([
        "# earthgpt-toy",
        "",
        "EarthGPT `small` preset (64-px input, 1.64 M parameters) trained on the synthetic toy world (`catalogs.toyworld`)",
        "by the project's training job. It is the embedded default of `earthgpt demo`; it knows only the toy world:",
        "ships, buildings, airplanes and vehicles on 64-px optical / SAR / thermal-infrared chips, seven scene classes,",
        "one-sentence captions and region captions in the toy world's wording.",
        "",
        f"- made by: `{command}` (see `scripts/make_demo_model.py` and `configs/train/earthgpt-toy.yaml`)",
        f"- lineage: {lineage}",
        f"- data: `generate_toyworld(out/toyworld-demo, **{WORLD})`, MMRS-1M files by `pipelines.mmrs`; held-out = the",
        "  last scene of each sensor (never trained on)",
        f"- this export: step {state['step']}, {state['samples']} samples, {state['elapsed_s'] / 60:.1f} min of "
        f"training on 2 Ray workers (DeepSpeed ZeRO-2, fp32, CPU, shared 2-core machine); {size_mb:.1f} MB",
        "",
        "## Evaluation (`earthgpt eval`, greedy, up to 96 new tokens)",
        "",
        f"Held-out scenes of the training world, and the held-out scenes of a world from seed "
        f"{UNSEEN_WORLD['seed']} (`generate_toyworld(out/toyworld-seed1000, **{UNSEEN_WORLD})`), which no training saw.",
        "Detection: P/R/F1 and mAP at IoU 0.5, mAP ranked by each box's own confidence; count accuracy = the stated count",
        "equals the true count. Captions: coco-caption BLEU-4 / ROUGE-L / CIDEr-D (one reference per chip).",
        "",
        "| task | metric | held-out scenes | unseen seed |",
        "|---|---|---|---|",
        *rows,
        *n_rows,
        "",
        "## Learning curve (the training job's periodic held-out evaluation: 50 generated answers per task)",
        "",
        "| step | samples | minutes | held-out loss | detection F1@0.5 | count acc. | class acc. | caption CIDEr |",
        "|---|---|---|---|---|---|---|---|",
        *curve_rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Makes, evaluates and installs the demo model; returns a process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="skip training: use the last export (or --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="export this training checkpoint folder instead")
    parser.add_argument("--from-scratch", action="store_true", help="random initial weights (no warm start)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training config override")
    parser.add_argument("--eval-limit", type=int, default=200, help="held-out records per task in each evaluation")
    parser.add_argument("--eval-tags", default=",".join(EVAL_TAGS), help="held-out files to score (pipelines.mmrs tags)")
    parser.add_argument("--no-install", action="store_true", help="evaluate only; leave models/earthgpt-toy alone")
    args = parser.parse_args(argv)
    command = "python scripts/make_demo_model.py " + " ".join(argv if argv is not None else sys.argv[1:])

    t0 = time.perf_counter()
    world = prepare_world(WORLD_DIR, WORLD)
    unseen = prepare_world(UNSEEN_DIR, UNSEEN_WORLD)
    print(f"[demo-model] worlds ready in {time.perf_counter() - t0:.0f} s", flush=True)
    lineage_file = REPO / "out" / "earthgpt-toy-lineage.txt"
    if not args.reuse:
        overrides = list(args.set)
        if args.from_scratch:
            overrides.append("model.init_from=null")
            lineage_file.write_text("trained from random weights (preset `small`, seed 0)")
        else:
            if INIT.exists():
                shutil.rmtree(INIT)
            shutil.copytree(DEST, INIT)
            commit = subprocess.run(["git", "log", "-1", "--format=%h", "--", str(DEST)], cwd=REPO,
                                    capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
            lineage_file.write_text(
                f"warm-started from the previous `models/earthgpt-toy` (commit {commit or 'unknown'}), itself trained "
                "from random weights on a smaller seed-0 toy world without captions"
            )
        cmd = [sys.executable, "-m", "pipelines.cli", "train", str(CONFIG), *(a for s in overrides for a in ("--set", s))]
        print("[demo-model] " + " ".join(cmd), flush=True)
        run = subprocess.run(cmd, cwd=REPO, env=_env(), check=False)
        if run.returncode != 0:
            return run.returncode
    model = EXPORT
    if args.checkpoint:
        from pipelines.train import export_checkpoint

        model = REPO / "out" / "earthgpt-toy-from-checkpoint"
        if model.exists():
            shutil.rmtree(model)
        export_checkpoint(args.checkpoint, model)
    if not (model / "model.safetensors").exists():
        print(f"no export at {model}: run without --reuse", file=sys.stderr)
        return 2
    size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
    if size_mb > MAX_MB:
        print(f"demo model is {size_mb:.1f} MB > {MAX_MB} MB: not installed", file=sys.stderr)
        return 3
    tags = tuple(t.strip() for t in args.eval_tags.split(",") if t.strip())
    evals = evaluate(model, {"heldout": world, "seed1000": unseen}, args.eval_limit, tags)
    heldout, unseen_eval = evals["heldout"], evals["seed1000"]
    state = json.loads((model / "training_state.json").read_text())
    lineage = lineage_file.read_text() if lineage_file.exists() else "see git history of models/earthgpt-toy"
    text = card(command.strip(), heldout, unseen_eval, learning_curve(METRICS_LOG), state, size_mb, lineage)
    (REPO / "out" / "earthgpt-toy-MODEL_CARD.md").write_text(text)
    print(text)
    if args.no_install:
        return 0
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(model, DEST)
    (DEST / "MODEL_CARD.md").write_text(text)
    print(f"installed {DEST} ({size_mb:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
