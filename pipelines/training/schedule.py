"""The learning-rate schedule and the DeepSpeed config of a training config (plain functions of plain values)."""

from __future__ import annotations

import math
from typing import Any

from pipelines.train_config import TrainConfig


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``.

    Args:
        step: Steps taken so far.
        warmup_steps: Steps of linear warm-up from ``1 / (warmup_steps + 1)`` to 1.
        total_steps: Step at which the cosine reaches ``min_ratio``; later steps stay there.
        min_ratio: Final LR as a fraction of the base LR.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict of a training config.

    Args:
        cfg: The training config.
        bf16: Train in bfloat16 (GPU) rather than float32 (CPU).
    """
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if cfg.deepspeed.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = cfg.deepspeed.param_persistence_threshold
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.schedule.micro_batch_size,
        "gradient_accumulation_steps": cfg.schedule.grad_accum_steps,
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.optimizer == "deepspeed_adamw":
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
            },
        }
    else:
        # a torch optimizer under ZeRO: allowed explicitly; with offload DeepSpeed would insist on its CPU Adam
        ds["zero_allow_untested_optimizer"] = True
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds
