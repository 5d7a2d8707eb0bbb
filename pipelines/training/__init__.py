"""The training job: EarthGPT instruction tuning on Ray Train (``TorchTrainer``) with DeepSpeed ZeRO.

Read in this order:

1. :mod:`pipelines.train_config` — the config, validated before anything starts (``earthgpt train CONFIG``).
2. :mod:`pipelines.training.job` — the driver: checks the sources, starts or joins Ray, runs the trainer, exports.
3. :mod:`pipelines.training.recipe` — what every worker runs: ``TrainRecipe`` setup -> train -> checkpoint ->
   cleanup.
4. :mod:`pipelines.training.records` — which record each rank trains on next; the positions a checkpoint keeps so
   that a resumed run replays nothing.
5. :mod:`pipelines.training.schedule` — LR schedule and DeepSpeed config; :mod:`pipelines.training.export` — a
   checkpoint into a ``save_pretrained`` folder the inference engine and the archive job load.

Held-out answers are scored by :mod:`pipelines.scoring`, the same code as ``earthgpt eval``.
"""

from pipelines.training.export import export_checkpoint
from pipelines.training.job import TrainResult, cli, read_metrics_log, run_training
from pipelines.training.recipe import TrainerState, TrainRecipe, train_loop_per_worker
from pipelines.training.schedule import deepspeed_config, lr_factor

__all__ = [
    "TrainRecipe",
    "TrainResult",
    "TrainerState",
    "cli",
    "deepspeed_config",
    "export_checkpoint",
    "lr_factor",
    "read_metrics_log",
    "run_training",
    "train_loop_per_worker",
]
