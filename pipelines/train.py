"""``earthgpt train CONFIG`` / ``python -m pipelines.train CONFIG``: the training job's entry point as a module (what
Ray job submissions and the KubeRay RayJob run). The job itself lives in :mod:`pipelines.training`."""

from __future__ import annotations

from pipelines.training import (
    TrainerState,
    TrainResult,
    cli,
    deepspeed_config,
    export_checkpoint,
    lr_factor,
    read_metrics_log,
    run_training,
    train_loop_per_worker,
)
from pipelines.training.export import DS_TAG, MODEL_DIR, TRAINER_STATE
from pipelines.training.recipe import build_model
from pipelines.training.records import source_sizes

_build_model = build_model  # the name benchmarks/gpu_train_check.py imports

__all__ = [
    "DS_TAG",
    "MODEL_DIR",
    "TRAINER_STATE",
    "TrainResult",
    "TrainerState",
    "build_model",
    "cli",
    "deepspeed_config",
    "export_checkpoint",
    "lr_factor",
    "read_metrics_log",
    "run_training",
    "source_sizes",
    "train_loop_per_worker",
]

if __name__ == "__main__":
    # run through the importable module: Ray pickles the worker functions by module name, not as ``__main__``
    from pipelines.training.job import cli as _cli

    raise SystemExit(_cli())
