"""One Ray Train worker's part of the training job, as a recipe that reads top to bottom.

:func:`train_loop_per_worker` (what ``TorchTrainer`` runs on every worker) is::

    recipe = TrainRecipe(cfg)
    recipe.setup()      # process settings, model + DeepSpeed engine, resume from the latest checkpoint, data
    recipe.train()      # optimizer steps; logs, held-out evaluation and checkpoint() when due
    recipe.cleanup()    # close what setup opened

**Setup** builds EarthGPT (preset or ``init_from`` folder; under ZeRO-3 optionally inside ``deepspeed.zero.Init``),
marks the stage's parameters trainable and calls ``deepspeed.initialize`` with a torch AdamW (no JIT-compiled op on
CPU) or DeepSpeed's own, with warm-up + cosine LR. It then restores the latest checkpoint if Ray Train hands one
over (a restarted worker group, or a rerun of the same run): DeepSpeed's files (weights, optimizer, LR schedule) and
``trainer_state.json`` (step, samples, tokens, malformed counts, every rank's data-stream position).

**Train**: each optimizer step takes ``grad_accum_steps`` micro-batches from this rank's
:class:`~pipelines.training.records.RecordStream` (records -> :class:`earthgpt.data.ExampleBuilder` -> ``Collator``;
malformed records are counted and skipped). Before a step every rank agrees (one all-reduce) that all have a full
step of data and time left, so ranks never diverge. Every ``log_every`` steps the window's loss, LR, samples/s,
tokens/s and where the time went are summed over ranks and reported; every ``eval_every`` steps the held-out
answer-token loss (and optionally generated answers, scored by :mod:`pipelines.scoring`); every
``checkpoint_every`` steps and at the end a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from pipelines.train_config import SourceConfig, TrainConfig
from pipelines.training.export import DS_TAG, MODEL_DIR, TRAINER_STATE
from pipelines.training.records import RecordStream, StreamPosition, StreamRow, eval_rows, resume_position
from pipelines.training.schedule import deepspeed_config, lr_factor


@dataclass
class TrainerState:
    """What a checkpoint records besides DeepSpeed's files (model, optimizer, LR scheduler).

    Attributes:
        step: Optimizer steps taken.
        samples: Training examples consumed, over all ranks.
        tokens: Answer tokens trained on, this rank's.
        malformed: Malformed records skipped, by reason (summed over ranks).
        zero_stage: The ZeRO stage the DeepSpeed files were written with.
        elapsed_s: Training wall time so far.
        restored_from: Step of the checkpoint this attempt resumed from (not saved).
        data: Every rank's data-stream position, ``{"world": W, "positions": [[pass, next], ...]}``.
    """

    step: int = 0
    samples: int = 0
    tokens: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    zero_stage: int = 0
    elapsed_s: float = 0.0
    restored_from: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Window:
    """What the steps since the last report add up to (reset after each report)."""

    loss: float = 0.0
    micro_batches: int = 0
    data_s: float = 0.0
    compute_s: float = 0.0


def _all_reduce(values: Sequence[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.tolist()


def _all_gather(obj: Any, world: int) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Model and processor of a training config, parameters of the stage (and ``also_train``) trainable."""
    from earthgpt.modeling import EarthGPTForConditionalGeneration
    from earthgpt.presets import build_model as build_preset
    from earthgpt.presets import preset_config
    from earthgpt.processor import EarthGPTProcessor
    from earthgpt.stages import set_trainable

    if cfg.model.init_from:
        from earthgpt.weights import require_safetensors

        require_safetensors(cfg.model.init_from)  # never unpickle weights
        model = EarthGPTForConditionalGeneration.from_pretrained(cfg.model.init_from, use_safetensors=True)
        processor = EarthGPTProcessor.from_pretrained(cfg.model.init_from)
    else:
        config = preset_config(cfg.model.preset, **cfg.model.overrides)
        model = build_preset(config, seed=cfg.model.seed)
        processor = EarthGPTProcessor.from_config(config)
    set_trainable(model, cfg.model.stage)
    if cfg.model.also_train:
        prefixes = tuple(cfg.model.also_train)
        for name, param in model.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(True)
    return model.train(), processor


def examples_of(
    rows: Iterator[StreamRow], builder: Any, sources: Sequence[SourceConfig]
) -> Iterator[tuple[StreamRow, Any]]:
    """Row stream -> ``(row, example)`` stream; malformed records are counted in ``builder.malformed`` and skipped."""
    from earthgpt.data import MalformedRecord, parse_record

    for row in rows:
        src = sources[row.source]
        try:
            record = parse_record(row.raw, source=src.label, image_root=src.image_root, task=src.task,
                                  sensor=src.sensor, index=row.index)  # fmt: skip
            yield row, builder(record)
        except MalformedRecord as exc:
            builder.malformed[exc.reason] += 1


class TrainRecipe:
    """One worker's training job: :meth:`setup`, :meth:`train` (which calls :meth:`checkpoint`), :meth:`cleanup`.

    Args:
        cfg: The validated training config.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.state = TrainerState(zero_stage=cfg.deepspeed.zero_stage)
        self.window = _Window()
        self._record_log: IO[str] | None = None

    # ---------------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Process settings, engine, resume, data — in that order (resume needs the engine, data the position)."""
        self._setup_process()
        self._setup_engine()
        self._restore()
        self._setup_data()

    def _setup_process(self) -> None:
        import ray.train
        import ray.train.torch
        import torch

        cfg = self.cfg
        # Ray's helper threads in this process (metrics, reporting) take the GIL between the model's small ops;
        # a shorter switch interval hands it back sooner (measured: ~10 % faster steps on 2 cores)
        sys.setswitchinterval(0.0005)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        self.bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32

    def _setup_engine(self) -> None:
        import deepspeed
        import torch

        cfg = self.cfg
        ds_config = deepspeed_config(cfg, self.bf16)
        # under ZeRO-3 built inside zero.Init with an HfDeepSpeedConfig alive (see ENVIRONMENT.md)
        hf_ds_config = None
        zero_init: Any = contextlib.nullcontext()
        if cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero_init:
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive while the model is built
            zero_init = deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=self.dtype)
        with zero_init:
            model, self.processor = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)

        def schedule(optimizer: Any) -> Any:
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.schedule.max_steps, cfg.optim.min_lr_ratio),
            )

        optimizer = None
        if cfg.optim.optimizer == "torch_adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                          weight_decay=cfg.optim.weight_decay)  # fmt: skip
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
            dist_init_required=False,
        )  # fmt: skip

    def _restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                from earthgpt.weights import weights_only_loads

                with weights_only_loads():  # DeepSpeed unpickles its files: only tensors and its own state classes
                    self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
                saved = json.loads((Path(ckpt_dir) / TRAINER_STATE).read_text())
            self.state = TrainerState(**{**saved, "restored_from": saved["step"]})
            if self.rank != 0:  # counts are summed over ranks when logged: rank 0 carries the restored ones
                self.state.malformed = {}
            if self.rank == 0:
                print(f"[train] resumed from step {self.state.step}", flush=True)
        self.position = resume_position(self.state.data, self.rank, self.world)

    def _setup_data(self) -> None:
        from earthgpt.data import Collator, ExampleBuilder

        cfg = self.cfg
        self.builder = ExampleBuilder(self.processor, cfg.data.max_length)
        for reason, n in self.state.malformed.items():
            self.builder.malformed[reason] = n
        self.collate = Collator(self.processor.pad_token_id)

        # held-out set, small and fixed: each rank reads its share (every world-th record) straight from the files
        eval_examples: list[Any] = []
        if cfg.data.eval:
            n_eval = max(cfg.data.eval_records, cfg.data.generate_records)
            eval_builder = ExampleBuilder(self.processor, cfg.data.max_length)
            rows = (StreamRow(raw, s, i, 0, 0, StreamPosition(0, 0))
                    for raw, s, i in eval_rows(cfg.data.eval, n_eval, self.rank, self.world))  # fmt: skip
            eval_examples = [e for _, e in examples_of(rows, eval_builder, cfg.data.eval)]
        n_loss = math.ceil(cfg.data.eval_records / self.world)
        mb = cfg.schedule.micro_batch_size
        self.eval_batches = [
            self.collate(eval_examples[i : i + mb]) for i in range(0, min(n_loss, len(eval_examples)), mb)
        ]
        n_gen = math.ceil(cfg.data.generate_records / self.world)
        self.gen_examples = [e for e in eval_examples if e.record.task is not None][:n_gen]

        stream = RecordStream(cfg.data.train, cfg.model.seed, self.rank, self.world, self.position)
        self.examples = examples_of(iter(stream), self.builder, cfg.data.train)
        if cfg.run.record_log:
            Path(cfg.run.record_log).mkdir(parents=True, exist_ok=True)
            # kept open for the whole run; closed by cleanup()
            self._record_log = open(Path(cfg.run.record_log) / f"rank{self.rank}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            self._log_records([{"event": "start", "pid": os.getpid(), "restored_from": self.state.restored_from,
                                "position": list(self.position)}])  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        """Optimizer steps until ``schedule.max_steps`` (or the time budget); reports, evaluates, checkpoints."""
        from earthgpt.metrics import ThroughputMeter

        cfg = self.cfg
        self.meter = ThroughputMeter()
        self.t_start = time.perf_counter() - self.state.elapsed_s
        if self.rank == 0:
            print(f"[train] workers={self.world} zero={cfg.deepspeed.zero_stage} dtype={self.dtype} "
                  f"stage={cfg.model.stage} trainable={self.n_trainable} global_batch={cfg.global_batch_size} "
                  f"eval_batches/rank={len(self.eval_batches)} position={tuple(self.position)}", flush=True)  # fmt: skip
        reported = self.state.step
        while self.state.step < cfg.schedule.max_steps:
            t_data = time.perf_counter()
            micro = self._next_micro_batches()
            self.window.data_s += time.perf_counter() - t_data
            reason = self._stop_reason(micro)
            if reason:
                if self.rank == 0:
                    print(f"[train] stopping at step {self.state.step}: {reason}", flush=True)
                # the steps since the last report still get their log, evaluation and checkpoint (what export uses)
                if self.state.step > reported:
                    self._report(last=True)
                return
            self._optimizer_step(micro)
            self._fault_drill()
            last = self.state.step >= cfg.schedule.max_steps
            if self._report(last):
                reported = self.state.step

    def _next_micro_batches(self) -> list[list[tuple[StreamRow, Any]]]:
        """The next optimizer step's micro-batches of ``(row, example)`` (short ones when the stream ran dry)."""
        size = self.cfg.schedule.micro_batch_size
        return [
            [pair for _, pair in zip(range(size), self.examples, strict=False)]
            for _ in range(self.cfg.schedule.grad_accum_steps)
        ]

    def _stop_reason(self, micro: list[list[tuple[StreamRow, Any]]]) -> str | None:
        """Why every rank stops now (``None``: go on); one all-reduce, so that all ranks agree."""
        full = all(len(b) == self.cfg.schedule.micro_batch_size for b in micro)
        minutes = (time.perf_counter() - self.t_start) / 60
        out_of_time = self.cfg.schedule.max_minutes is not None and minutes >= self.cfg.schedule.max_minutes
        (go,) = _all_reduce([1.0 if full and not out_of_time else 0.0], op="min")
        if go >= 1:
            return None
        return "time budget" if out_of_time else "data exhausted"

    def _optimizer_step(self, micro: list[list[tuple[StreamRow, Any]]]) -> None:
        from earthgpt.metrics import count_answer_tokens

        t_compute = time.perf_counter()
        for pairs in micro:
            batch = {k: v.to(self.device) for k, v in self.collate([e for _, e in pairs]).items()}
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            self.window.loss += float(loss.detach())
            self.window.micro_batches += 1
            self.meter.update(len(pairs), int(batch["attention_mask"].sum()))
            self.state.samples += len(pairs) * self.world
            self.state.tokens += count_answer_tokens(batch["labels"])
        self.state.step += 1
        # everything up to the last example of the step is consumed (malformed records between included)
        self.position = micro[-1][-1][0].after
        self.window.compute_s += time.perf_counter() - t_compute
        if self._record_log is not None:
            self._log_records([{"step": self.state.step, "pass": r.pass_, "position": r.position,
                                "source": r.source, "index": r.index} for pairs in micro for r, _ in pairs])  # fmt: skip

    def _fault_drill(self) -> None:
        if self.cfg.run.fail_at_step == self.state.step and self.state.restored_from is None:
            raise RuntimeError(f"fault drill: worker {self.rank} crashes after step {self.state.step} "
                               "(run.fail_at_step)")  # fmt: skip

    def _report(self, last: bool) -> bool:
        """Log, evaluate and checkpoint when due (always when ``last``); ``True`` if anything was reported."""
        from earthgpt.data import MALFORMED_REASONS

        cfg, step = self.cfg.schedule, self.state.step
        log_now = last or step % cfg.log_every == 0
        eval_now = bool(self.eval_batches or self.gen_examples) and (
            last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
        )
        ckpt_now = last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)
        if not (log_now or eval_now or ckpt_now):
            return False
        w = self.window
        rates = self.meter.rates()
        reasons = list(MALFORMED_REASONS)  # a fixed order: every rank all-reduces vectors of the same layout
        sums = _all_reduce([w.loss, w.micro_batches, rates["samples_per_s"], rates["tokens_per_s"], w.data_s,
                            w.compute_s] + [self.builder.malformed.get(k, 0) for k in reasons])  # fmt: skip
        metrics: dict[str, Any] = {
            "step": step,
            "loss": sums[0] / max(sums[1], 1),
            "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else self.cfg.optim.lr,
            "samples_per_s": sums[2],
            "tokens_per_s": sums[3],
            "samples": self.state.samples,
            "elapsed_min": (time.perf_counter() - self.t_start) / 60,
            # where the workers' time went (summed over workers): waiting for/building examples vs model steps
            "data_s": sums[4],
            "compute_s": sums[5],
            "malformed": {k: int(v) for k, v in zip(reasons, sums[6:], strict=True) if v},
            "resumed_from": self.state.restored_from,
        }
        if eval_now:
            metrics.update(self.evaluate())
        if self.rank == 0:
            print("[train] " + json.dumps(metrics, default=str), flush=True)
            if self.cfg.run.metrics_log:
                with open(self.cfg.run.metrics_log, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(metrics, default=str) + "\n")
        if ckpt_now:
            self.checkpoint(metrics)
        else:
            import ray.train

            ray.train.report(metrics)
        self.window = _Window()
        self.meter.reset()
        return True

    def evaluate(self) -> dict[str, Any]:
        """Held-out answer-token loss over all ranks, and the scores of generated answers if configured."""
        import torch

        from earthgpt.metrics import answer_token_nll
        from pipelines.scoring import score_items

        total, count = 0.0, 0
        self.engine.eval()
        with torch.no_grad():
            for batch in self.eval_batches:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                out = self.engine(**{k: v for k, v in batch.items() if k != "labels"})
                nll, n = answer_token_nll(out.logits, batch["labels"])
                total += float(nll)
                count += n
        self.engine.train()
        nll_sum, n_tokens = _all_reduce([total, count])
        out_metrics: dict[str, Any] = {
            "eval_loss": nll_sum / n_tokens if n_tokens else float("nan"), "eval_tokens": n_tokens,
        }
        if self.gen_examples:
            items = [i for part in _all_gather(self._generate(), self.world) for i in part]
            for task, row in score_items(items).items():
                for name, value in row.items():
                    out_metrics[f"eval/{task}/{name}"] = value
        return out_metrics

    def _generate(self) -> list[Any]:
        """This rank's generated answers for its held-out examples (ZeRO 0-2: each rank holds all weights)."""
        from earthgpt.data import load_image
        from earthgpt.engine import InferenceEngine
        from pipelines.scoring import first_turn, scored_item

        module = self.engine.module
        runner = InferenceEngine(module, self.processor, kind="plain", dtype=self.dtype, device=self.device)
        items = []
        for start in range(0, len(self.gen_examples), 64):
            chunk = [e.record for e in self.gen_examples[start : start + 64]]
            images = [load_image(r.image) for r in chunk]
            gens = runner.generate(images, [first_turn(r)[0] for r in chunk], max_new_tokens=self.cfg.data.max_new_tokens)
            for r, img, g in zip(chunk, images, gens, strict=True):
                items.append(scored_item(r, (int(img.shape[0]), int(img.shape[1])), g, self.processor))
        module.train()
        return items

    # ----------------------------------------------------------------------------------------------------- checkpoint

    def checkpoint(self, metrics: dict[str, Any]) -> None:
        """Every rank's DeepSpeed files plus (rank 0) the trainer state and model config, reported to Ray Train.

        Every rank takes part: the data-stream positions are gathered from all of them.
        """
        import ray.train

        positions = _all_gather(list(self.position), self.world)
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                saved = asdict(self.state)
                saved["malformed"] = metrics.get("malformed", {})
                saved["elapsed_s"] = time.perf_counter() - self.t_start
                saved["data"] = {"world": self.world, "seed": self.cfg.model.seed, "positions": positions}
                saved.pop("restored_from")
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(saved, indent=2))
                (Path(tmp) / "train_config.json").write_text(
                    json.dumps(self.cfg.model_dump(mode="json"), indent=2, default=str)
                )
                self.engine.module.config.save_pretrained(str(Path(tmp) / MODEL_DIR))
                self.processor.save_pretrained(str(Path(tmp) / MODEL_DIR))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # -------------------------------------------------------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        """Close what setup opened (the process group belongs to Ray Train)."""
        if self._record_log is not None:
            self._record_log.close()
            self._record_log = None

    def _log_records(self, lines: list[dict[str, Any]]) -> None:
        assert self._record_log is not None
        self._record_log.write("".join(json.dumps({"rank": self.rank, **x}) + "\n" for x in lines))
        self._record_log.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` is ``TrainConfig.model_dump(mode="json")``."""
    recipe = TrainRecipe(TrainConfig.model_validate(config))
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
