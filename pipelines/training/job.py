"""The training job's driver: ``earthgpt train CONFIG`` -> checks -> Ray -> ``TorchTrainer.fit`` -> export.

The driver validates the config and reads every source once (a missing file is refused before Ray starts), joins the
cluster named by ``RAY_ADDRESS`` or starts a local Ray of its own, and runs
:func:`pipelines.training.recipe.train_loop_per_worker` on ``scaling.num_workers`` workers with checkpoints in the
run's storage (local folder or ``s3://``). A failed worker group restarts from the latest checkpoint
(``run.max_failures``); rerunning the same config (same ``run.name`` and ``run.storage``) resumes the run. At the end
the latest checkpoint is exported (:func:`pipelines.training.export.export_checkpoint`) if ``run.export_dir`` is set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.jobconfig import parse_overrides
from pipelines.train_config import ConfigError, TrainConfig, load_config
from pipelines.training.export import export_checkpoint
from pipelines.training.recipe import train_loop_per_worker
from pipelines.training.records import source_sizes


@dataclass
class TrainResult:
    """What :func:`run_training` returns.

    Attributes:
        metrics: The last reported metrics.
        history: Every reported metrics dict, in order (rank 0's view, summed over ranks).
        checkpoint_path: Storage path of the latest checkpoint.
        checkpoint: The latest ``ray.train.Checkpoint`` (``as_directory()`` / ``to_directory()`` fetch it).
        export_dir: The consolidated model folder, when ``run.export_dir`` is set.
        seconds: Wall time of ``fit``.
    """

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint_path: str | None
    checkpoint: Any
    export_dir: str | None
    seconds: float


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    """``(storage_path, pyarrow filesystem or None)``: S3 URLs get an explicit filesystem for custom endpoints."""
    storage = cfg.run.storage
    if not storage.startswith("s3://"):
        Path(storage).mkdir(parents=True, exist_ok=True)
        return storage, None
    import pyarrow.fs

    endpoint = (
        cfg.run.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return storage.removeprefix("s3://"), pyarrow.fs.S3FileSystem(**kwargs)


def read_metrics_log(path: str | Path) -> list[dict[str, Any]]:
    """The metrics lines rank 0 appended to ``run.metrics_log`` (empty when the file does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _start_ray() -> None:
    """Join the cluster ``RAY_ADDRESS`` names, else start a local Ray sized for a small box."""
    import ray

    from pipelines.raylocal import init_ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        # a cluster (`ray job submit`, `earthgpt submit train`, a KubeRay RayJob): sizing arguments are refused there
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": a fresh instance of our own, never one started on this machine with `ray start`; on 127.0.0.1 only
        init_ray("local", num_cpus=max(2, os.cpu_count() or 2), object_store_memory=256 * 2**20,
                 logging_level=logging.WARNING, log_to_driver=True)


def run_training(cfg: TrainConfig, *, init_ray: bool = True) -> TrainResult:
    """Runs (or resumes) the training job described by ``cfg`` and exports the final model if configured.

    Args:
        cfg: The validated config.
        init_ray: Start (or join, with ``RAY_ADDRESS``) Ray when this process has none.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: A data source cannot be read, or the sources hold less than one global batch per pass.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ConfigError(
                "deepspeed.zero_init: needs the 'accelerate' package (transformers' HfDeepSpeedConfig)"
            )
    sizes = source_sizes(cfg.data.train)
    if cfg.data.eval:
        source_sizes(cfg.data.eval, "data.eval")
    per_pass = sum(n * s.weight for n, s in zip(sizes, cfg.data.train, strict=True))
    if per_pass < cfg.global_batch_size:
        raise ConfigError(f"data.train: yields {per_pass:.0f} records per pass, fewer than one global batch "
                          f"({cfg.global_batch_size})")  # fmt: skip
    started = init_ray and not ray.is_initialized()
    if started:
        _start_ray()
    try:
        storage_path, filesystem = _storage(cfg)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg.model_dump(mode="json"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                      **({"GPU": 1} if cfg.scaling.use_gpu else {})},
            ),
            run_config=ray.train.RunConfig(
                name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            ),
        )  # fmt: skip
        t0 = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - t0
        if result.error is not None:
            raise result.error
        history = read_metrics_log(cfg.run.metrics_log) if cfg.run.metrics_log else []
        export_dir = None
        if cfg.run.export_dir and result.checkpoint is not None:
            export_dir = str(export_checkpoint(result.checkpoint, cfg.run.export_dir))
    finally:
        if started:  # a Ray this job started ends with it (a joined cluster stays)
            ray.shutdown()
    return TrainResult(
        metrics=dict(result.metrics or {}),
        history=history,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        checkpoint=result.checkpoint,
        export_dir=export_dir,
        seconds=seconds,
    )


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt train CONFIG [--set key=value ...]``: 0 when trained, 2 for a refused config."""
    parser = argparse.ArgumentParser(
        prog="earthgpt train", description="Instruction-tune EarthGPT on Ray Train + DeepSpeed from a YAML config."
    )
    parser.add_argument("config", help="training YAML (see configs/train/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a field by dotted path, value parsed as YAML (e.g. --set schedule.max_steps=20)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(args.set))
        result = run_training(cfg)
    except ConfigError as exc:
        print(f"earthgpt train: invalid config {args.config}:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 2
    print(json.dumps(dict(result.metrics), indent=2, default=str))
    print(f"checkpoint: {result.checkpoint_path}")
    if result.export_dir:
        print(f"exported model: {result.export_dir}")
    return 0
