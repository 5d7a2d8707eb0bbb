"""GPU check of the EarthGPT inference path at paper scale: plain PyTorch vs DeepSpeed-inference (kernel injection).

Builds the paper-shaped model (DINOv2 ViT-L/14 + ConvNeXt-L + LLaMA-2-13B shapes, 448 px, 256 visual tokens) with
random bf16 weights directly on the GPU, then for each engine generates ``--new-tokens`` tokens (no early stop, so
every engine does the same work) for a batch of random 3-channel tiles with task prompts, and reports tiles/s and
generated tokens/s (one run, same process, same inputs; the first call of each engine is a warm-up).

Engines (rows of the final table):

- ``plain``: ``InferenceEngine(kind="plain", dtype=bfloat16)``;
- ``ds``: ``deepspeed.init_inference`` without kernel injection;
- ``ds+kernels``: ``deepspeed.init_inference(replace_with_kernel_inject=True)`` (fused GPU kernels; needs DeepSpeed's
  ``transformer_inference`` op to JIT-build, i.e. nvcc and ninja on the machine).

DeepSpeed is optional: without it the DeepSpeed rows say so. A failing engine is reported in the table, not raised.
Needs only torch (CUDA), transformers, tokenizers, safetensors and numpy, plus this repository's ``earthgpt/``
(run from the repository root). Designed to finish in well under 8 minutes on one H100/H200 (about 1 minute of
model building, then a few seconds per engine); ``--deadline`` skips what would not fit.

    python benchmarks/gpu_generate.py                       # GPU, paper shapes
    python benchmarks/gpu_generate.py --wheelhouse wheels/  # pip-install deepspeed offline from carried wheels first

A wheelhouse for the GPU machine (no network there) is made here with
``pip download deepspeed hjson py-cpuinfo msgpack ninja einops psutil pydantic tqdm --no-deps -d wheels/``
(DeepSpeed itself is pure Python; its CUDA ops build on first use).
    python benchmarks/gpu_generate.py --preset tiny --device cpu --batch 2 --new-tokens 8   # dry run on CPU
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a one-process "distributed" group for deepspeed.init_inference
for _key, _value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "WORLD_SIZE": "1",
                     "LOCAL_RANK": "0"}.items():  # fmt: skip
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from earthgpt.presets import build_model, parameter_counts, preset_config  # noqa: E402
from earthgpt.processor import EarthGPTProcessor  # noqa: E402
from earthgpt.tasks import build_prompt  # noqa: E402

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


class DeadlineReached(Exception):
    """Raised by the alarm when an engine would overrun ``--deadline``."""


def _deadline_reached(signum: int, frame: Any) -> None:
    raise DeadlineReached("deadline reached")


def install_deepspeed(wheelhouse: Path) -> None:
    """Offline install from carried wheels/sdists (no network on the GPU machine)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(wheelhouse),
        "deepspeed",
    ]
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    log("installing deepspeed: " + " ".join(cmd))
    subprocess.run(cmd, check=False, env=env)


def deepspeed_version() -> str | None:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        log(f"deepspeed not importable: {type(exc).__name__}: {exc}")
        return None


def make_inputs(processor: EarthGPTProcessor, batch: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    tiles = [torch.rand(3, 512, 512, generator=g) for _ in range(batch)]
    tasks: list[tuple[str, dict[str, Any]]] = [
        ("caption", {}),
        ("detect", {}),
        ("classify", {}),
        ("vqa", {"question": "How many ships are there?"}),
    ]
    sensors = ["optical", "sar", "infrared"]
    prompts = [build_prompt(tasks[i % 4][0], sensors[i % 3], **tasks[i % 4][1]) for i in range(batch)]
    inputs = processor.build_inputs(tiles, prompts)
    inputs.pop("pad_info")
    return inputs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(
    model: Any, inputs: dict[str, Any], new_tokens: int, device: torch.device, repeats: int
) -> dict[str, Any]:
    """Warm-up + ``repeats`` timed runs of image encoding and of the full generate call."""
    moved = {k: v.to(device) for k, v in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    kwargs = dict(max_new_tokens=new_tokens, stop_token_ids=[], do_sample=False)
    with torch.no_grad():
        out = model.generate(**moved, **kwargs)  # warm-up (allocations, kernel selection)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.get_image_features(moved["pixel_values"])
        sync(device)
        encode_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = model.generate(**moved, **kwargs)
        sync(device)
        gen_s = (time.perf_counter() - t0) / repeats
    batch = moved["input_ids"].shape[0]
    produced = int(out.n_tokens.sum())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "status": "ok",
        "encode_ms": 1000 * encode_s,
        "generate_s": gen_s,
        "tiles_per_s": batch / gen_s,
        "tokens_per_s": produced / gen_s,
        "peak_gib": peak,
        "sequences": out.sequences.cpu(),
        "mean_logprob": float(out.mean_logprob.float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds; later engines are skipped")
    parser.add_argument(
        "--wheelhouse", type=Path, default=None, help="offline deepspeed wheels to install first"
    )
    parser.add_argument("--engines", default="plain,ds,ds+kernels")
    args = parser.parse_args(argv)

    import transformers

    device = torch.device(args.device)
    log(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    if device.type == "cuda":
        log(f"GPU {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    if args.wheelhouse is not None:
        install_deepspeed(args.wheelhouse)
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ds_version = deepspeed_version()

    # the bundled tokenizer stands in for LLaMA's (no hub here): its ids are valid in the 32064-token vocabulary
    config = preset_config(args.preset, image_token_id=4, image_start_token_id=5, image_end_token_id=6)
    processor = EarthGPTProcessor.from_config(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"building {args.preset} model ({dtype}) on {device}")
    model = build_model(config, device=device, dtype=dtype, seed=args.seed)
    counts = parameter_counts(model)
    log("parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    inputs = make_inputs(processor, args.batch, args.seed)
    prompt_len = inputs["input_ids"].shape[1]
    log(f"batch {args.batch} tiles, prompt {prompt_len} tokens ({config.num_image_tokens} visual), "
        f"{args.new_tokens} new tokens")  # fmt: skip

    from earthgpt.engine import InferenceEngine

    results: dict[str, dict[str, Any]] = {}
    for name in [e.strip() for e in args.engines.split(",") if e.strip()]:
        if time.perf_counter() - START > args.deadline:
            results[name] = {"status": "skipped: deadline"}
            continue
        if name != "plain" and ds_version is None:
            results[name] = {"status": "skipped: deepspeed not installed"}
            continue
        kernel = name == "ds+kernels"
        if kernel and device.type != "cuda":
            results[name] = {"status": "skipped: kernel injection needs CUDA"}
            continue
        log(f"engine {name}")
        # kernel injection may JIT-compile CUDA ops for minutes: stop it at the deadline instead of overrunning
        remaining = int(args.deadline - (time.perf_counter() - START))
        signal.signal(signal.SIGALRM, _deadline_reached)
        signal.alarm(max(remaining, 1))
        try:
            # one model for all engines (two 13B copies would not fit beside the activations): "plain" and "ds"
            # (no injection) leave the modules as they are; "ds+kernels" replaces them in place, so it runs last
            engine = InferenceEngine(
                model, processor, kind="plain" if name == "plain" else "deepspeed", dtype=dtype,
                kernel_inject=kernel, device=device,
            )  # fmt: skip
            results[name] = run_engine(engine.model, inputs, args.new_tokens, device, args.repeats)
        except Exception as exc:  # noqa: BLE001 - report every failure in the table
            traceback.print_exc()
            first_line = (str(exc).splitlines() or [""])[0][:90]
            results[name] = {"status": f"failed: {type(exc).__name__}: {first_line}"}
        finally:
            signal.alarm(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = results.get("plain", {}).get("sequences")
    print()
    print(f"EarthGPT {args.preset} ({counts['total'] / 1e9:.2f} B params), {dtype}, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}; batch {args.batch}, "
          f"prompt {prompt_len}, new tokens {args.new_tokens}; deepspeed {ds_version or 'absent'}; "
          f"total {time.perf_counter() - START:.0f}s")  # fmt: skip
    header = f"{'engine':<11} {'encode ms':>9} {'gen s':>7} {'tiles/s':>8} {'tok/s':>8} {'peak GiB':>8} {'same tok':>8}  status"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if r.get("status") != "ok":
            print(f"{name:<11} {'':>9} {'':>7} {'':>8} {'':>8} {'':>8} {'':>8}  {r['status']}")
            continue
        same = ""
        if base is not None and r["sequences"].shape == base.shape:
            same = f"{(r['sequences'] == base).float().mean().item():.0%}"
        print(f"{name:<11} {r['encode_ms']:9.1f} {r['generate_s']:7.3f} {r['tiles_per_s']:8.2f} "
              f"{r['tokens_per_s']:8.1f} {r['peak_gib']:8.1f} {same:>8}  ok")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
