"""``earthgpt train CONFIG``: EarthGPT instruction tuning on Ray Train (TorchTrainer) with DeepSpeed ZeRO.

Reads top to bottom:

1. **Config** (:mod:`pipelines.train_config`): validated before anything starts; source files must be readable.
2. **Record stream** (:func:`record_stream`): a Ray Dataset of raw MMRS-1M records, each source sampled at its
   weight per pass, shuffled per pass, in parts so that sources interleave; Ray Train splits it between the
   workers (``get_dataset_shard("train")``). Records travel as JSON text: validation happens in the worker.
3. **Worker** (:func:`train_loop_per_worker`): builds EarthGPT (preset or ``init_from`` folder; optionally inside
   ``deepspeed.zero.Init``), marks the stage's parameters trainable, ``deepspeed.initialize`` with a torch AdamW (no
   JIT-compiled optimizer op needed on CPU) or DeepSpeed's own, warm-up + cosine LR, clipping, accumulation. Each
   micro-batch: records -> :class:`earthgpt.data.ExampleBuilder` (image through the inference processor, answer-only
   labels) -> :class:`earthgpt.data.Collator` -> model loss. Malformed records are counted and skipped. Logs loss,
   tokens/s, samples/s; evaluates held-out loss (and optionally generated answers) periodically on a small fixed
   held-out set that each rank reads directly (every world-th record); checkpoints
   (DeepSpeed's files from every rank + trainer state) to the run's storage, local or ``s3://``.
4. **Resume**: a failed worker group restarts from the latest checkpoint (``FailureConfig``); rerunning the same
   config (same ``run.name`` and ``run.storage``) resumes the run. Step counter, optimizer and LR schedule carry on.
5. **Export** (:func:`export_checkpoint`): consolidates the ZeRO shards into one fp32 ``save_pretrained`` folder
   (safetensors) plus the processor, which ``InferenceEngine.from_pretrained`` loads directly.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.train_config import ConfigError, SourceConfig, TrainConfig, load_config

TRAINER_STATE = "trainer_state.json"
DS_TAG = "engine"
MODEL_DIR = "model"
RECORDS_PER_PART = 4096


# --------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule and DeepSpeed config (plain functions of plain values)


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


# --------------------------------------------------------------------------------------------------------------------
# Record stream (Ray Data)


@functools.lru_cache(maxsize=8)
def _source_records(path: str) -> tuple[str, ...]:
    # cached per Ray worker process: the parts of one source are read by the same few processes
    from earthgpt.data import iter_raw_records

    return tuple(iter_raw_records(path))


@dataclass(frozen=True)
class _ReadPart:
    """Ray Data ``flat_map``: one (pass, source, part) task -> that part's records at the source's sampling rate."""

    paths: tuple[str, ...]
    weights: tuple[float, ...]
    seed: int
    shard: int = 0
    num_shards: int = 1

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        from earthgpt.data import repeat_count

        src, pass_, part, parts = int(row["source"]), int(row["pass"]), int(row["part"]), int(row["parts"])
        records = _source_records(self.paths[src])
        order = np.random.default_rng([self.seed, pass_, src]).permutation(len(records))[part::parts]
        out = []
        for idx in order:
            for _ in range(repeat_count(self.weights[src], (self.seed, pass_, src, int(idx)))):
                out.append({"raw": records[int(idx)], "source": src, "index": int(idx)})
        np.random.default_rng([self.seed, pass_, src, part]).shuffle(out)  # type: ignore[arg-type]
        yield from out[self.shard :: self.num_shards]


def source_sizes(sources: Sequence[SourceConfig]) -> list[int]:
    """Records per source file; reading them up front refuses a missing or unreadable file before any work.

    Raises:
        ConfigError: naming the source that cannot be read.
    """
    from earthgpt.data import count_records

    sizes = []
    for i, src in enumerate(sources):
        try:
            sizes.append(count_records(src.path))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data source {i} ({src.path}): cannot read it: {exc}") from None
    return sizes


def record_stream(
    sources: Sequence[SourceConfig],
    sizes: Sequence[int],
    passes: int,
    seed: int,
    shard: int = 0,
    num_shards: int = 1,
) -> Any:
    """A lazy Ray Dataset of raw records mixing ``sources`` at their weights, ``passes`` times over.

    ``shard`` / ``num_shards`` restrict it to every ``num_shards``-th record of each part (a stream per worker); the
    training job uses one stream that Ray Train splits between workers.

    Args:
        sources: The sources.
        sizes: Their record counts (:func:`source_sizes`).
        passes: Passes over the mixture (each pass is sampled and shuffled anew).
        seed: Mixture and shuffle seed (the same for every shard, so shards are disjoint).
        shard: This stream's shard.
        num_shards: Number of shards (training workers).

    Returns:
        ``ray.data.Dataset`` with columns ``raw`` (JSON text), ``source`` (index into ``sources``), ``index``.
    """
    import ray.data

    tasks = []
    parts = [max(1, math.ceil(n / RECORDS_PER_PART)) for n in sizes]
    for p in range(passes):
        # interleave sources part by part so that a long file does not fill the stream alone
        for k in range(max(parts)):
            for i, n_parts in enumerate(parts):
                if k < n_parts and sources[i].weight > 0:
                    tasks.append({"source": i, "pass": p, "part": k, "parts": n_parts})
    reader = _ReadPart(
        tuple(s.path for s in sources), tuple(s.weight for s in sources), seed, shard, num_shards
    )
    return ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).flat_map(reader, num_cpus=0.25)


# --------------------------------------------------------------------------------------------------------------------
# Worker


@dataclass
class TrainerState:
    """What a checkpoint records besides DeepSpeed's files (model, optimizer, LR scheduler)."""

    step: int = 0
    samples: int = 0
    tokens: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    zero_stage: int = 0
    elapsed_s: float = 0.0
    restored_from: int | None = None


def _build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Model and processor for the worker, parameters of the stage (and ``also_train``) trainable."""
    from earthgpt.modeling import EarthGPTForConditionalGeneration
    from earthgpt.presets import build_model, preset_config
    from earthgpt.processor import EarthGPTProcessor
    from earthgpt.stages import set_trainable

    if cfg.model.init_from:
        from earthgpt.weights import require_safetensors

        require_safetensors(cfg.model.init_from)  # never unpickle weights
        model = EarthGPTForConditionalGeneration.from_pretrained(cfg.model.init_from, use_safetensors=True)
        processor = EarthGPTProcessor.from_pretrained(cfg.model.init_from)
    else:
        config = preset_config(cfg.model.preset, **cfg.model.overrides)
        model = build_model(config, seed=cfg.model.seed)
        processor = EarthGPTProcessor.from_config(config)
    set_trainable(model, cfg.model.stage)
    if cfg.model.also_train:
        prefixes = tuple(cfg.model.also_train)
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(True)
    return model.train(), processor


def _all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.tolist()


def _examples(rows: Iterator[dict[str, Any]], builder: Any, sources: Sequence[SourceConfig]) -> Iterator[Any]:
    """Row stream -> example stream; malformed records are counted in ``builder.malformed`` and skipped."""
    from earthgpt.data import MalformedRecord, parse_record

    for row in rows:
        src = sources[int(row["source"])]
        try:
            record = parse_record(
                str(row["raw"]), source=src.label, image_root=src.image_root, task=src.task, sensor=src.sensor,
                index=int(row["index"]),
            )  # fmt: skip
            yield builder(record)
        except MalformedRecord as exc:
            builder.malformed[exc.reason] += 1


def _rows(shard: Any, shuffle_buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    """Rows of this worker's shard, through a seeded local shuffle buffer of ``shuffle_buffer`` rows.

    Whole blocks are pulled (``batch_size=None``): re-batching in Ray Data would cost its split coordinator more CPU
    than the training step saves on a 2-core machine, and the buffer is ours either way.
    """
    rng = np.random.default_rng(seed)
    buffer: list[dict[str, Any]] = []
    for block in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        for i in range(len(block["raw"])):
            buffer.append({"raw": block["raw"][i], "source": block["source"][i], "index": block["index"][i]})
            if len(buffer) > shuffle_buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
    rng.shuffle(buffer)  # type: ignore[arg-type]
    yield from buffer


def _eval_rows(
    sources: Sequence[SourceConfig], limit: int, rank: int, world: int
) -> Iterator[dict[str, Any]]:
    """This rank's share (every world-th) of ``limit`` held-out records spread evenly over the held-out files.

    Evenly spaced rather than the first ones: held-out files are often ordered by scene or sensor.
    """
    from earthgpt.data import iter_raw_records

    rows = [{"raw": raw, "source": i, "index": j} for i, src in enumerate(sources)
            for j, raw in enumerate(iter_raw_records(src.path))]  # fmt: skip
    if len(rows) > limit > 0:
        rows = [rows[int(k * len(rows) / limit)] for k in range(limit)]
    yield from rows[rank::world]


def _eval_loss(engine: Any, batches: Sequence[dict[str, Any]], device: Any) -> tuple[float, float]:
    """Summed answer-token NLL and token count over this rank's held-out batches."""
    import torch

    from earthgpt.metrics import answer_token_nll

    total, count = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = engine(**{k: v for k, v in batch.items() if k != "labels"})
            nll, n = answer_token_nll(out.logits, batch["labels"])
            total += float(nll)
            count += n
    engine.train()
    return total, count


def _generate_eval(
    engine: Any, processor: Any, examples: Sequence[Any], device: Any, dtype: Any, max_new_tokens: int
) -> list[Any]:
    """This rank's generated answers for held-out examples with a task (ZeRO 0-2: each rank holds all weights)."""
    from earthgpt.data import load_image
    from earthgpt.engine import InferenceEngine
    from pipelines.evaluate import ScoredItem, first_turn

    if not examples:
        return []
    module = engine.module
    runner = InferenceEngine(module, processor, kind="plain", dtype=dtype, device=device)
    items = []
    for start in range(0, len(examples), 64):
        chunk = [e.record for e in examples[start : start + 64]]
        images = [load_image(r.image) for r in chunk]
        gens = runner.generate(images, [first_turn(r)[0] for r in chunk], max_new_tokens=max_new_tokens)
        for r, img, g in zip(chunk, images, gens, strict=True):
            items.append(ScoredItem(r.task, g.text, first_turn(r)[1], (int(img.shape[0]), int(img.shape[1]))))
    module.train()
    return items


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: see the module docstring. ``config`` is ``TrainConfig.model_dump()``."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from earthgpt.data import MALFORMED_REASONS, Collator, ExampleBuilder
    from earthgpt.metrics import ThroughputMeter, count_answer_tokens
    from pipelines.evaluate import score_items

    cfg = TrainConfig.model_validate(config)
    # Ray's helper threads in this process (metrics, data iterator) take the GIL between the model's small ops;
    # a shorter switch interval hands it back sooner (measured: ~10 % faster steps on 2 cores)
    sys.setswitchinterval(0.0005)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ds_config = deepspeed_config(cfg, bf16)

    # -- model: under ZeRO-3 built inside zero.Init with an HfDeepSpeedConfig alive (see ENVIRONMENT.md)
    hf_ds_config = None
    zero_init: Any = contextlib.nullcontext()
    if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while the model is built
        zero_init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype)
    with zero_init:
        model, processor = _build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

    def schedule(optimizer: Any) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.schedule.max_steps, cfg.optim.min_lr_ratio),
        )

    optimizer = None
    if cfg.optim.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
        dist_init_required=False,
    )  # fmt: skip

    # -- resume
    state = TrainerState(zero_stage=cfg.deepspeed.zero_stage)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            from earthgpt.weights import weights_only_loads

            with weights_only_loads():  # DeepSpeed unpickles its files: only tensors and its own state classes
                engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            saved = json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text())
        state = TrainerState(**{**saved, "restored_from": saved["step"]})
        if rank == 0:
            print(f"[train] resumed from step {state.step}", flush=True)

    builder = ExampleBuilder(processor, cfg.data.max_length)
    for reason, n in state.malformed.items():
        builder.malformed[reason] = n if rank == 0 else 0  # counts are summed over ranks when logged
    collate = Collator(processor.pad_token_id)

    # -- held-out set: this rank's share, built once
    eval_examples: list[Any] = []
    if cfg.data.eval:
        # small and fixed: each rank reads its share (every world-th record) straight from the files
        n_eval = max(cfg.data.eval_records, cfg.data.generate_records)
        eval_builder = ExampleBuilder(processor, cfg.data.max_length)
        eval_examples = list(
            _examples(_eval_rows(cfg.data.eval, n_eval, rank, world), eval_builder, cfg.data.eval)
        )
    n_loss = math.ceil(cfg.data.eval_records / world)
    eval_batches = [
        collate(eval_examples[i : i + cfg.schedule.micro_batch_size])
        for i in range(0, min(n_loss, len(eval_examples)), cfg.schedule.micro_batch_size)
    ]
    n_gen = math.ceil(cfg.data.generate_records / world)
    gen_examples = [e for e in eval_examples if e.record.task is not None][:n_gen]

    train_rows = _rows(
        ray.train.get_dataset_shard("train"), cfg.data.shuffle_buffer, cfg.model.seed + state.step
    )
    examples = _examples(train_rows, builder, cfg.data.train)
    meter = ThroughputMeter()
    window_loss, window_micro = 0.0, 0
    window_data_s, window_compute_s = 0.0, 0.0
    t_start = time.perf_counter() - state.elapsed_s
    history: list[dict[str, Any]] = []

    def evaluate_now() -> dict[str, Any]:
        nll, count = _all_reduce(_eval_loss(engine, eval_batches, device))
        out: dict[str, Any] = {"eval_loss": nll / count if count else float("nan"), "eval_tokens": count}
        if gen_examples:
            items = _generate_eval(engine, processor, gen_examples, device, dtype, cfg.data.max_new_tokens)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, items)
            for task, row in score_items([i for part in gathered for i in part]).items():
                for name, value in row.items():
                    out[f"eval/{task}/{name}"] = value
        return out

    def save_and_report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            if rank == 0:
                saved = asdict(state)
                saved["malformed"] = metrics.get("malformed", {})
                saved["elapsed_s"] = time.perf_counter() - t_start
                saved.pop("restored_from")
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(saved, indent=2))
                (Path(tmp) / "train_config.json").write_text(json.dumps(config, indent=2, default=str))
                engine.module.config.save_pretrained(str(Path(tmp) / MODEL_DIR))
                processor.save_pretrained(str(Path(tmp) / MODEL_DIR))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    if rank == 0:
        print(
            f"[train] workers={world} zero={cfg.deepspeed.zero_stage} dtype={dtype} stage={cfg.model.stage} "
            f"trainable={n_trainable} global_batch={cfg.global_batch_size} eval_records/rank={len(eval_examples)}",
            flush=True,
        )
    reported_step = state.step
    stopping = False
    while not stopping and state.step < cfg.schedule.max_steps:
        # -- one optimizer step: grad_accum micro-batches; every rank must have data for all of them
        t_data = time.perf_counter()
        micro: list[Any] = []
        for _ in range(cfg.schedule.grad_accum_steps):
            batch_examples = [e for _, e in zip(range(cfg.schedule.micro_batch_size), examples, strict=False)]
            micro.append(batch_examples)
        full = all(len(b) == cfg.schedule.micro_batch_size for b in micro)
        elapsed_min = (time.perf_counter() - t_start) / 60
        out_of_time = cfg.schedule.max_minutes is not None and elapsed_min >= cfg.schedule.max_minutes
        (go,) = _all_reduce([1.0 if full and not out_of_time else 0.0], op="min")
        if go < 1:
            if rank == 0:
                reason = "time budget" if out_of_time else "data exhausted"
                print(f"[train] stopping at step {state.step}: {reason}", flush=True)
            # the steps since the last report still get their log, evaluation and checkpoint (what export uses)
            stopping = True
            if state.step == reported_step:
                break
        else:
            t_compute = time.perf_counter()
            window_data_s += t_compute - t_data
            for batch_examples in micro:
                batch = {k: v.to(device) for k, v in collate(batch_examples).items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                window_loss += float(loss.detach())
                window_micro += 1
                meter.update(len(batch_examples), int(batch["attention_mask"].sum()))
                state.samples += len(batch_examples) * world
                state.tokens += count_answer_tokens(batch["labels"])
            state.step += 1
            window_compute_s += time.perf_counter() - t_compute
            if cfg.run.fail_at_step == state.step and state.restored_from is None:
                raise RuntimeError(
                    f"fault drill: worker {rank} crashes after step {state.step} (run.fail_at_step)"
                )

        last = stopping or state.step >= cfg.schedule.max_steps
        log_now = state.step % cfg.schedule.log_every == 0 or last
        eval_now = bool(eval_batches or gen_examples) and (
            last or (cfg.schedule.eval_every > 0 and state.step % cfg.schedule.eval_every == 0)
        )
        ckpt_now = last or (
            cfg.schedule.checkpoint_every > 0 and state.step % cfg.schedule.checkpoint_every == 0
        )
        if not (log_now or eval_now or ckpt_now):
            continue
        rates = meter.rates()
        # a fixed key order: every rank must all-reduce vectors of the same layout
        malformed_keys = list(MALFORMED_REASONS)
        sums = _all_reduce(
            [
                window_loss,
                window_micro,
                rates["samples_per_s"],
                rates["tokens_per_s"],
                window_data_s,
                window_compute_s,
            ]
            + [builder.malformed.get(k, 0) for k in malformed_keys]
        )
        metrics: dict[str, Any] = {
            "step": state.step,
            "loss": sums[0] / max(sums[1], 1),
            "lr": float(scheduler.get_last_lr()[0]) if scheduler is not None else cfg.optim.lr,
            "samples_per_s": sums[2],
            "tokens_per_s": sums[3],
            "samples": state.samples,
            "elapsed_min": (time.perf_counter() - t_start) / 60,
            # where the workers' time went (summed over workers): waiting for/building examples vs model steps
            "data_s": sums[4],
            "compute_s": sums[5],
            "malformed": {k: int(v) for k, v in zip(malformed_keys, sums[6:], strict=True) if v},
            "resumed_from": state.restored_from,
        }
        if eval_now:
            metrics.update(evaluate_now())
        history.append(metrics)
        if rank == 0:
            print("[train] " + json.dumps(metrics, default=str), flush=True)
            if cfg.run.metrics_log:
                with open(cfg.run.metrics_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(metrics, default=str) + "\n")
        save_and_report(metrics, ckpt_now)
        reported_step = state.step
        window_loss, window_micro = 0.0, 0
        window_data_s, window_compute_s = 0.0, 0.0
        meter.reset()


# --------------------------------------------------------------------------------------------------------------------
# Export


def export_checkpoint(checkpoint: Any, out_dir: str | Path) -> Path:
    """Consolidates a training checkpoint into a ``save_pretrained`` folder (fp32 safetensors + processor).

    Args:
        checkpoint: A ``ray.train.Checkpoint``, or a local folder holding one (``trainer_state.json``).
        out_dir: Destination folder.

    Returns:
        ``out_dir``, loadable by ``EarthGPTForConditionalGeneration.from_pretrained`` and ``InferenceEngine``.

    Raises:
        RuntimeError: when the consolidated weights do not cover the model's parameters.
    """
    import torch

    from earthgpt.modeling import EarthGPTConfig, EarthGPTForConditionalGeneration
    from earthgpt.processor import EarthGPTProcessor

    out = Path(out_dir)
    ctx = (
        checkpoint.as_directory()
        if hasattr(checkpoint, "as_directory")
        else contextlib.nullcontext(checkpoint)
    )
    with ctx as ckpt_dir:
        root = Path(ckpt_dir)
        state = json.loads((root / TRAINER_STATE).read_text())
        config = EarthGPTConfig.from_pretrained(str(root / MODEL_DIR))
        processor = EarthGPTProcessor.from_pretrained(str(root / MODEL_DIR))
        from earthgpt.weights import weights_only_loads

        if int(state["zero_stage"]) == 0:
            with weights_only_loads():
                weights = torch.load(root / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu")
            state_dict = weights["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(sys.stderr), weights_only_loads():
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=DS_TAG)
    model = EarthGPTForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    # tied weights (lm_head = embed_tokens) are stored once
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.text_config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    if tied:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    (out / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Driver


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


def run_training(cfg: TrainConfig, *, init_ray: bool = True) -> TrainResult:
    """Runs (or resumes) the training job described by ``cfg`` and exports the final model if configured.

    Args:
        cfg: The validated config.
        init_ray: Start a local Ray when none is running (sized for a small box).

    Returns:
        A :class:`TrainResult`.
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
        source_sizes(cfg.data.eval)
    if init_ray and not ray.is_initialized():
        from pipelines.raylocal import init_ray as _init_ray

        # a cluster (RAY_ADDRESS, e.g. under `ray job submit`) is joined without the sizing arguments; a local
        # instance listens on 127.0.0.1 only
        _init_ray(
            os.environ.get("RAY_ADDRESS"),
            num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, object_store_memory=256 * 2**20,
            logging_level=logging.WARNING, log_to_driver=True,
            # keep a few idle worker processes: record-reading tasks then reuse them (and their parsed-file cache)
            # instead of starting a fresh Python for every task
            _system_config={"num_workers_soft_limit": 6},
        )  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    per_pass = sum(n * s.weight for n, s in zip(sizes, cfg.data.train, strict=True))
    if per_pass < cfg.global_batch_size:
        raise ConfigError(f"data.train yields {per_pass:.0f} records per pass, fewer than one global batch "
                          f"({cfg.global_batch_size})")  # fmt: skip
    passes = math.ceil(cfg.schedule.max_steps * cfg.global_batch_size / per_pass) + 1
    # one stream, split between the workers by Ray Train (its executor runs in a split-coordinator actor: run in a
    # training worker instead, its Python scheduling thread fights the training thread for the GIL, 3x slower steps)
    datasets = {"train": record_stream(cfg.data.train, sizes, passes, cfg.model.seed)}
    storage_path, filesystem = _storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
        datasets=datasets,
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
    return TrainResult(
        metrics=dict(result.metrics or {}),
        history=history,
        checkpoint_path=result.checkpoint.path if result.checkpoint is not None else None,
        checkpoint=result.checkpoint,
        export_dir=export_dir,
        seconds=seconds,
    )


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt train CONFIG [--set key=value ...] [--export-only CHECKPOINT OUT]``."""
    parser = argparse.ArgumentParser(prog="earthgpt train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training YAML (see configs/train/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a field by dotted path, value parsed as YAML (e.g. --set schedule.max_steps=20)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import yaml

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        result = run_training(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.metrics.items()}, indent=2, default=str))
    print(f"checkpoint: {result.checkpoint_path}")
    if result.export_dir:
        print(f"exported model: {result.export_dir}")
    return 0


if __name__ == "__main__":
    # run through the importable module: Ray pickles the worker functions by module name, not as ``__main__``
    from pipelines.train import cli as _cli

    raise SystemExit(_cli())
