"""GPU memory for the paper preset (DINOv2 ViT-L/14 + ConvNeXt-L + LLaMA-2-13B): bf16 inference per GPU, and ZeRO-2 /
ZeRO-3 training per GPU from DeepSpeed's own estimators, for each tuning stage.

    python cluster/gpu_sizing.py [--gpus-per-node 1] [--nodes 4] [--batch 8] [--seq 640]

The model is built on the ``meta`` device (no memory) to count parameters exactly. Inference: bf16 weights (2 bytes
a parameter) plus the LLM's KV cache (keys and values, every layer, bf16) for ``batch`` sequences of ``seq`` tokens
(256 visual tokens + prompt + answer); activations come on top (measured on an H200 at batch 8: see
benchmarks/results/gpu_generate_h200.txt). Training: DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs``
for the trainable parameters (fp32 master weights, Adam moments, bf16 weights and gradients), plus the frozen
parameters in bf16 (replicated under ZeRO-2, partitioned under ZeRO-3). Activations are not included: they depend
on micro-batch size and gradient checkpointing. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the estimators are arithmetic; no GPU needed to run this

GiB = 2**30


def _largest_layer(model) -> int:  # type: ignore[no-untyped-def]
    """Parameters of the largest leaf module (what ZeRO-3 gathers at once)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=4, help="cluster/kuberay/rayjob-train.yaml runs 4 x 1 GPU")
    parser.add_argument("--batch", type=int, default=8, help="inference: sequences per forward pass")
    parser.add_argument("--seq", type=int, default=640, help="inference: tokens per sequence (prompt + answer)")
    args = parser.parse_args(argv)

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from earthgpt.presets import build_model, count_parameters, earthgpt_paper, parameter_counts

    config = earthgpt_paper()
    gpus = args.gpus_per_node * args.nodes
    model = build_model(config, device="meta")
    counts = parameter_counts(model)
    text = config.text_config
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    weights = counts["total"] * 2
    kv = kv_per_token * args.batch * args.seq
    result: dict = {
        "params_total": counts["total"],
        "inference_bf16": {"weights_gib": round(weights / GiB, 1), "kv_cache_gib": round(kv / GiB, 2),
                           "batch": args.batch, "seq": args.seq, "total_gib": round((weights + kv) / GiB, 1)},
        "training": {},
    }
    print(f"EarthGPT paper preset: {counts['total'] / 1e9:.2f} B parameters "
          f"(LLM {counts['language_model'] / 1e9:.2f} B, ViT {counts['vision_tower'] / 1e6:.0f} M, "
          f"CNN {counts['cnn_tower'] / 1e6:.0f} M)")
    print(f"inference, bf16, one model replica per GPU: weights {weights / GiB:.1f} GiB + KV cache "
          f"{kv / GiB:.2f} GiB (batch {args.batch} x {args.seq} tokens) = {(weights + kv) / GiB:.1f} GiB + activations")
    print(f"\ntraining, {args.nodes} node(s) x {args.gpus_per_node} GPU, model states per GPU "
          "(DeepSpeed estimators for the trainable part + frozen bf16 weights), no offload:")
    print(f"{'stage':<6} {'trainable':>12} {'ZeRO-2 GiB':>11} {'ZeRO-3 GiB':>11}")
    for stage in (1, 2, 3):
        model = build_model(config, stage=stage, device="meta")
        trainable = count_parameters(model, trainable_only=True)
        frozen = count_parameters(model) - trainable
        _, z2 = estimate_zero2_model_states_mem_needs(trainable, args.gpus_per_node, args.nodes, cpu_offload=False)
        _, z3, _ = estimate_zero3_model_states_mem_needs(
            trainable, _largest_layer(model), args.gpus_per_node, args.nodes, cpu_offload=False,
            cpu_offload_params=False)
        z2_total = z2 + frozen * 2
        z3_total = z3 + frozen * 2 // gpus
        result["training"][f"stage{stage}"] = {"trainable": trainable, "zero2_gib": round(z2_total / GiB, 1),
                                               "zero3_gib": round(z3_total / GiB, 1)}
        print(f"{stage:<6} {trainable / 1e6:>10.1f} M {z2_total / GiB:>11.1f} {z3_total / GiB:>11.1f}")
    result.update(nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
