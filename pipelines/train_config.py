"""The training job's configuration: a typed, validated object built once from YAML at the entry point.

Every field is checked before any work starts (no Ray, no model); an invalid file is refused with the failing field's
dotted path, e.g. ``optim.lr: Input should be greater than 0``. Unknown keys are errors too (a typo must not be
silently ignored). Reading, ``--set`` overrides and error messages are :mod:`pipelines.jobconfig`'s, shared with the
archive job; relative paths (:data:`RELATIVE_TO_FILE`) are relative to the YAML file. See ``configs/train/*.yaml``
for complete examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.jobconfig import ConfigError, StrictModel, load_job_config, validate

__all__ = ["RELATIVE_TO_FILE", "ConfigError", "TrainConfig", "load_config", "parse_config"]

_Strict = StrictModel

RELATIVE_TO_FILE = (
    "data.train.*.path", "data.train.*.image_root", "data.eval.*.path", "data.eval.*.image_root",
    "model.init_from", "run.storage", "run.export_dir", "run.metrics_log", "run.record_log",
)  # fmt: skip
"""Fields whose relative paths are relative to the YAML file, so that a config works from any directory."""


class SourceConfig(_Strict):
    """One MMRS-1M-format JSON file (local path or ``s3://`` URL)."""

    path: str = Field(description="JSON array (MMRS-1M) or JSON-lines file of LLaVA-style records")
    image_root: str | None = Field(
        default=None, description="folder/URL that the records' relative image paths start from"
    )
    weight: float = Field(
        default=1.0, ge=0.0, description="sampling rate per pass: 1 = each record once, 0.5 half, 2 twice"
    )
    task: str | None = Field(
        default=None, description="task of records without a 'task' key (default: from the file name)"
    )
    sensor: str | None = Field(
        default=None, description="sensor of records without a 'sensor' key (default optical)"
    )
    name: str | None = Field(default=None, description="label in logs (default: the file name)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str | None) -> str | None:
        from earthgpt.tasks import TASKS

        if v is not None and v not in TASKS:
            raise ValueError(f"unknown task {v!r}; expected one of {TASKS}")
        return v

    @property
    def label(self) -> str:
        """Name used in logs and counters."""
        return self.name or Path(self.path).name


class DataConfig(_Strict):
    """Training and held-out data."""

    train: list[SourceConfig] = Field(min_length=1)
    eval: list[SourceConfig] = Field(default_factory=list)
    max_length: int = Field(
        default=512, ge=16, description="longest token sequence; longer multi-turn records are cut"
    )
    shuffle_buffer: int = Field(
        default=1024, ge=0,
        description="accepted for older configs, no longer used: every pass is one full seeded permutation",
    )  # fmt: skip
    eval_records: int = Field(
        default=256, ge=0, description="held-out records for periodic loss (split across workers)"
    )
    generate_records: int = Field(
        default=0, ge=0, description="held-out records answered by generation at each eval"
    )
    max_new_tokens: int = Field(default=64, ge=1)


class ModelConfig(_Strict):
    """Which EarthGPT to train, and which of its parameters."""

    preset: str = Field(default="small", description="earthgpt.presets name: tiny, small, paper")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="EarthGPTConfig fields over the preset"
    )
    init_from: str | None = Field(
        default=None, description="save_pretrained folder to start from instead of random weights"
    )
    stage: Literal[1, 2, 3] = Field(
        default=2, description="1 projector, 2 + LLM attention/norms, 3 shift parameters"
    )
    also_train: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes trained on top of the stage, e.g. ['language_model.'] for a toy model "
        "whose LLM starts from random weights",
    )
    seed: int = 0

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from earthgpt.presets import PRESETS

        key = v.removeprefix("earthgpt_").removeprefix("earthgpt-")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {sorted(PRESETS)}")
        return key


class OptimConfig(_Strict):
    """Optimiser and learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio * lr``)."""

    optimizer: Literal["torch_adamw", "deepspeed_adamw"] = Field(
        default="torch_adamw",
        description="torch_adamw: torch.optim.AdamW handed to deepspeed.initialize (no JIT build); "
        "deepspeed_adamw: DeepSpeed's FusedAdam / DeepSpeedCPUAdam from its config (JIT-compiled on first use)",
    )
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 disables clipping")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must be in [0, 1)")
        return v


class ScheduleConfig(_Strict):
    """How long, how big, how often."""

    max_steps: int = Field(gt=0, description="optimizer steps")
    max_minutes: float | None = Field(
        default=None, gt=0, description="also stop after this much training wall time"
    )
    micro_batch_size: int = Field(default=8, gt=0, description="examples per worker per forward pass")
    grad_accum_steps: int = Field(default=1, gt=0)
    log_every: int = Field(default=10, gt=0)
    eval_every: int = Field(
        default=100, ge=0, description="steps between held-out evaluations; 0 = only at the end"
    )
    checkpoint_every: int = Field(
        default=100, ge=0, description="steps between checkpoints; 0 = only at the end"
    )


class DeepSpeedConfig(_Strict):
    """The DeepSpeed engine each worker runs."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 on GPU, fp32 on CPU"
    )
    offload_optimizer: bool = False
    offload_params: bool = Field(default=False, description="ZeRO-3 only")
    param_persistence_threshold: int = Field(
        default=100_000,
        ge=0,
        description="ZeRO-3: parameters smaller than this stay whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold); 0 partitions every parameter",
    )
    zero_init: bool = Field(
        default=False,
        description="ZeRO-3: build the model inside deepspeed.zero.Init, partitioned from the start (needed when one "
        "worker's host memory cannot hold the whole model; uses transformers' HfDeepSpeedConfig, which needs the "
        "'accelerate' package). Off: each worker builds the model whole and deepspeed.initialize partitions it",
    )

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class ScalingSection(_Strict):
    """Ray Train workers."""

    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description="CPUs Ray reserves per worker; the worker's torch threads are its whole part (at least 1)",
    )


class RunSection(_Strict):
    """Where checkpoints go, resuming and exporting."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    storage: str = Field(description="local folder or s3:// URL for Ray Train checkpoints")
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (default: AWS_ENDPOINT_URL)"
    )
    max_failures: int = Field(
        default=2, ge=-1, description="worker-group restarts from the latest checkpoint; -1 forever"
    )
    keep_checkpoints: int = Field(default=2, ge=1)
    export_dir: str | None = Field(
        default=None, description="write a consolidated save_pretrained folder here at the end"
    )
    metrics_log: str | None = Field(
        default=None, description="local JSON-lines file rank 0 appends every report to"
    )
    fail_at_step: int | None = Field(
        default=None,
        ge=1,
        description="fault drill: a worker crashes once after this step (tests resume); never in production",
    )
    record_log: str | None = Field(
        default=None,
        description="local folder where each rank appends the records it trained on (rank<r>.jsonl: step, pass, "
        "position, source, index); an audit of the data stream, e.g. that a resumed run replays nothing",
    )


class TrainConfig(_Strict):
    """The whole training job."""

    run: RunSection
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.optim.warmup_steps >= self.schedule.max_steps and self.schedule.max_steps > 1:
            raise ValueError(
                f"optim.warmup_steps: {self.optim.warmup_steps} must be below schedule.max_steps "
                f"({self.schedule.max_steps})"
            )
        if self.deepspeed.zero_stage == 3 and self.data.generate_records:
            raise ValueError(
                "data.generate_records: needs deepspeed.zero_stage 0-2 (under ZeRO-3 ranks generate in lockstep; "
                "set it to 0 and run `earthgpt eval` on the export)"
            )
        return self

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step over all workers."""
        return self.schedule.micro_batch_size * self.schedule.grad_accum_steps * self.scaling.num_workers


def parse_config(data: dict[str, Any]) -> TrainConfig:
    """Validates a config dict (paths as given).

    Raises:
        ConfigError: naming every invalid field (dotted path) and why.
    """
    return validate(TrainConfig, data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Reads and validates a YAML config; ``overrides`` (dotted keys, e.g. ``{"schedule.max_steps": 10}``) win.

    Relative paths in the fields of :data:`RELATIVE_TO_FILE` are resolved against the YAML file's folder.

    Raises:
        ConfigError: unreadable YAML, or any invalid field.
    """
    return load_job_config(TrainConfig, path, overrides, relative_to_file=RELATIVE_TO_FILE)
