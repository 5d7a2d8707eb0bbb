"""GPU check of the training job's DeepSpeed path: bf16 ZeRO-2 on one CUDA GPU, then export and generation.

The GPU machine has torch + transformers but no Ray, so this runs the training worker's pieces directly (the same
``pipelines.train`` functions: ``deepspeed_config``, ``_build_model``, ``lr_factor``, the data builder and collator,
``export_checkpoint``) in one process, world size 1. It checks what only a GPU exercises: ``precision: auto`` picks
bf16, the engine trains in bf16 with fp32 master weights, the loss falls, the checkpoint consolidates to an fp32
``save_pretrained`` folder, and the inference engine loads it on the GPU and answers.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/gpu_train_check.py --world out/gpu-bundle/world --steps 300

Prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    """Runs the check; returns 0 when the loss fell and the export generated answers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, help="toy world folder with mmrs/ (made by pipelines.mmrs)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=0, help="score held-out detections every N steps")
    args = parser.parse_args(argv)

    import deepspeed
    import torch
    import torch.distributed as dist

    from earthgpt.data import Collator, ExampleBuilder, iter_raw_records, parse_record
    from earthgpt.engine import InferenceEngine
    from pipelines.evaluate import answer_records, load_records, score_items
    from pipelines.train import (
        DS_TAG,
        MODEL_DIR,
        TRAINER_STATE,
        _build_model,
        deepspeed_config,
        export_checkpoint,
        lr_factor,
    )
    from pipelines.train_config import parse_config

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    world = Path(args.world)
    mmrs = world / "mmrs"
    cfg = parse_config({
        "run": {"name": "gpu-check", "storage": "/tmp/gpu-check"},
        "model": {"preset": "small", "stage": 2, "also_train": ["language_model.", "vision_tower.", "cnn_tower."]},
        "data": {"train": [{"path": str(mmrs / "toyworld_det_train.json"), "image_root": str(world)}]},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "min_lr_ratio": 0.05},
        "schedule": {"max_steps": args.steps, "micro_batch_size": args.batch},
        "deepspeed": {"zero_stage": 2, "precision": "auto"},
        "scaling": {"num_workers": 1, "use_gpu": True},
    })  # fmt: skip
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # what Ray Train's TorchTrainer sets on its workers
    dist.init_process_group("nccl", rank=0, world_size=1)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    bf16 = True  # what precision "auto" resolves to on a GPU
    ds_config = deepspeed_config(cfg, bf16)
    model, processor = _build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.schedule.max_steps, cfg.optim.min_lr_ratio),
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        dist_init_required=False,
    )  # fmt: skip
    param_dtype = next(engine.module.parameters()).dtype

    t0 = time.perf_counter()
    builder = ExampleBuilder(processor, 256)
    src = cfg.data.train[0]
    raws = list(iter_raw_records(src.path))
    examples = [builder(parse_record(r, image_root=src.image_root)) for r in raws]
    build_s = time.perf_counter() - t0
    collate = Collator(processor.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    losses = []
    records, _ = load_records([str(mmrs / "toyworld_det_val.json")], str(world), limit=200)
    curve: list[tuple[int, float, float]] = []

    def score_in_memory(step: int) -> None:
        # the training module itself (bf16), through the inference engine's generation path
        runner = InferenceEngine(engine.module, processor, dtype=torch.bfloat16, device=device)
        det = score_items(answer_records(runner, records, batch_size=100, max_new_tokens=96)).get(
            "detect", {}
        )
        engine.module.train()
        curve.append((step, det.get("F1", 0.0), det.get("count_accuracy", 0.0)))
        print(f"[gpu] step {step} ({step * args.batch} samples): F1 {curve[-1][1]:.3f} count {curve[-1][2]:.3f}",
              flush=True)  # fmt: skip

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eval_s = 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(examples), (args.batch,), generator=gen).tolist()
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx]).items()}
        batch["pixel_values"] = batch["pixel_values"].to(param_dtype)
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if args.eval_every and step % args.eval_every == 0:
            t_eval = time.perf_counter()
            score_in_memory(step)
            eval_s += time.perf_counter() - t_eval
    torch.cuda.synchronize()
    train_s = time.perf_counter() - t0 - eval_s

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(
        f"[gpu] trained {args.steps} steps in {train_s:.1f} s, loss {first:.3f} -> {last:.3f}, {param_dtype}",
        flush=True,
    )
    scores: dict[str, float] = {}
    items: list = []
    gen_s = float("nan")
    export_error = ""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            (Path(tmp) / TRAINER_STATE).write_text(json.dumps({"step": args.steps, "zero_stage": 2}))
            engine.module.config.save_pretrained(str(Path(tmp) / MODEL_DIR))
            processor.save_pretrained(str(Path(tmp) / MODEL_DIR))
            export = Path(tmp) / "export"
            export_checkpoint(tmp, export)
            infer = InferenceEngine.from_pretrained(export, device="cuda", dtype=torch.bfloat16)
            t1 = time.perf_counter()
            items = answer_records(infer, records, batch_size=100, max_new_tokens=96)
            gen_s = time.perf_counter() - t1
            scores = score_items(items).get("detect", {})
        except Exception as exc:  # report what ran; the table says where it stopped
            export_error = f"{type(exc).__name__}: {exc}"[:200]

    rows = {
        "device": torch.cuda.get_device_name(0),
        "engine param dtype": str(param_dtype),
        "examples built (s)": f"{build_s:.1f}",
        "train steps": args.steps,
        "samples/s": f"{args.steps * args.batch / train_s:.0f}",
        "s/step": f"{train_s / args.steps:.3f}",
        "loss first10 -> last10": f"{first:.3f} -> {last:.3f}",
        "held-out det F1@0.5": f"{scores.get('F1', 0.0):.3f}",
        "held-out count acc": f"{scores.get('count_accuracy', 0.0):.3f}",
        "generate samples/s (bf16)": f"{len(items) / gen_s:.0f}" if items else "-",
        "export/generate error": export_error or "none",
        "F1 / count acc by step": " ".join(f"{s_}:{f:.2f}/{c:.2f}" for s_, f, c in curve) or "-",
    }
    ok = param_dtype == torch.bfloat16 and last < 0.5 * first and (len(items) > 0 or bool(curve))
    print("\n".join(f"{k:<28} {v}" for k, v in rows.items()))
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
