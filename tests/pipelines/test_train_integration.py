"""The training job end to end on Ray + DeepSpeed (CPU, 2 workers): ZeRO-3, checkpoints on a real S3
server (moto), a worker crash and resume, a second run resuming the first, export into the inference engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from catalogs.toyworld import generate_toyworld
from earthgpt.data import Collator, ExampleBuilder, iter_raw_records, load_image, parse_record
from earthgpt.engine import InferenceEngine
from earthgpt.metrics import answer_token_nll
from earthgpt.modeling import EarthGPTForConditionalGeneration
from pipelines.mmrs import write_mmrs
from pipelines.train import lr_factor, read_metrics_log, run_training
from pipelines.train_config import parse_config

pytestmark = pytest.mark.integration

N_EVAL = 16


@pytest.fixture(scope="module")
def mmrs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy world's MMRS-1M files plus a source with malformed records."""
    root = tmp_path_factory.mktemp("world")
    world = generate_toyworld(root, scenes=6, seed=1, chips_per_scene=24, val_chips_per_scene=8)
    write_mmrs(world.root, tags=("det", "multiturn"))
    good = json.loads(next(iter_raw_records(str(root / "mmrs" / "toyworld_det_train.json"))))
    bad = [
        "{not json",
        json.dumps({**good, "image": "chips/nowhere.png"}),
        json.dumps({**good, "conversations": good["conversations"][::-1]}),
    ]
    (root / "mmrs" / "broken.jsonl").write_text("\n".join(bad + [json.dumps(good)] * 3) + "\n")
    return root


def _config(mmrs: Path, data_root: str, storage: str, tmp: Path, zero: int, **schedule: Any) -> dict:
    m = f"{data_root}/mmrs"
    return {
        "run": {"name": f"zero{zero}", "storage": storage, "export_dir": str(tmp / "export"), "max_failures": 1,
                "metrics_log": str(tmp / "metrics.jsonl"), "fail_at_step": 3},
        "model": {"preset": "tiny", "stage": 2, "seed": 0},
        "data": {
            "train": [
                {"path": f"{m}/toyworld_det_train.json", "image_root": data_root},
                {"path": f"{m}/toyworld_multiturn_train.json", "image_root": data_root, "weight": 0.25},
                # 20 copies of each record per pass: all three malformed ones are met within 4 steps
                {"path": f"{m}/broken.jsonl", "image_root": data_root, "task": "detect", "weight": 20.0},
            ],
            "eval": [{"path": f"{m}/toyworld_det_val.json", "image_root": data_root}],
            "max_length": 256, "eval_records": N_EVAL, "shuffle_buffer": 64,
        },
        "optim": {"lr": 2e-3, "warmup_steps": 1, "min_lr_ratio": 0.1},
        "schedule": {"max_steps": 4, "micro_batch_size": 4, "grad_accum_steps": 2, "log_every": 1,
                     "eval_every": 2, "checkpoint_every": 2, **schedule},
        # ZeRO-3: partition every parameter (the tiny model's would otherwise all stay whole)
        "deepspeed": {"zero_stage": zero, **({"param_persistence_threshold": 0} if zero == 3 else {})},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.75},
    }  # fmt: skip


def _adam_steps(obj: Any) -> list[float]:
    """Every ``step`` entry of an optimizer state, wherever DeepSpeed nests it."""
    found: list[float] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "step" and isinstance(value, (int, float, torch.Tensor)):
                found.append(float(value))
            else:
                found.extend(_adam_steps(value))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found.extend(_adam_steps(value))
    return found


def _heldout_loss(model: EarthGPTForConditionalGeneration, processor: Any, mmrs: Path) -> float:
    builder = ExampleBuilder(processor, 256)
    # the job's held-out set: N_EVAL records spread evenly over the file
    every = list(iter_raw_records(str(mmrs / "mmrs" / "toyworld_det_val.json")))
    raws = [every[int(k * len(every) / N_EVAL)] for k in range(N_EVAL)] if len(every) > N_EVAL else every
    examples = [builder(parse_record(r, image_root=str(mmrs))) for r in raws]
    batch = Collator(processor.pad_token_id)(examples)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    nll, count = answer_token_nll(out.logits, batch["labels"])
    return float(nll) / count


# ZeRO-3: the sharded path (its export gathers the shards); ZeRO-2 runs on the local cluster (tests/cluster)
@pytest.mark.parametrize("zero", [3])
def test_train_crash_resume_export_on_s3(
    zero: int, mmrs: Path, s3: Any, ray_local: Any, tmp_path: Path
) -> None:
    fs = s3.filesystem()
    bucket = s3.make_bucket(f"train-zero{zero}")
    data_root = str(mmrs)
    if zero == 3:  # this run also reads its records and images from S3
        fs.put(str(mmrs / "mmrs"), f"{bucket}/world/mmrs", recursive=True)
        fs.put(str(mmrs / "chips"), f"{bucket}/world/chips", recursive=True)
        data_root = f"s3://{bucket}/world"
    cfg = parse_config(_config(mmrs, data_root, f"s3://{bucket}/runs", tmp_path, zero))
    result = run_training(cfg, init_ray=False)

    # -- the crash after step 3 was recovered from the step-2 checkpoint: steps 3-4 ran again, resumed from 2
    history = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["resumed_from"] for h in history] == [None, None, 2, 2]
    # the LR schedule carried on (a fresh scheduler would be back in warm-up at step 3)
    assert history[2]["lr"] == pytest.approx(2e-3 * lr_factor(3, 1, 4, 0.1), rel=1e-6)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["eval_loss"] < history[1]["eval_loss"] + 1.0
    # malformed records were counted and skipped, never crashed a worker
    assert {"bad_json", "image_unreadable", "bad_turns"} <= set(history[-1]["malformed"])
    assert history[-1]["samples_per_s"] > 0 and history[-1]["tokens_per_s"] > history[-1]["samples_per_s"]

    # -- checkpoints are on S3; the last holds 4 optimizer steps (2 before the crash + 2 after): state carried on
    assert result.checkpoint_path.startswith(f"{bucket}/runs/zero{zero}/")
    local = tmp_path / "ckpt"
    result.checkpoint.to_directory(str(local))
    assert json.loads((local / "trainer_state.json").read_text())["step"] == 4
    optim_files = sorted((local / "engine").glob("*optim_states.pt"))
    assert len(optim_files) == 2  # one shard per rank, merged into one checkpoint
    steps = _adam_steps(torch.load(optim_files[0], map_location="cpu", weights_only=False))
    assert steps and max(steps) == 4

    # -- the export is a plain save_pretrained folder that the inference engine loads and runs
    export = Path(result.export_dir)
    assert (export / "model.safetensors").exists() and (export / "processor_config.json").exists()
    engine = InferenceEngine.from_pretrained(export)
    chip = load_image(
        str(mmrs / json.loads(next(iter_raw_records(str(mmrs / "mmrs/toyworld_det_val.json"))))["image"])
    )
    (gen,) = engine.generate([chip], ["Detect all objects in this SAR image and output their bounding boxes."],
                             max_new_tokens=8)  # fmt: skip
    assert gen.n_tokens >= 1
    # the exported weights are the trained ones: the held-out loss the job logged at the end is reproduced
    assert _heldout_loss(engine.model, engine.processor, mmrs) == pytest.approx(
        history[-1]["eval_loss"], rel=1e-4
    )

    # -- a new job with the same run name resumes the finished run and carries on to step 6
    more = parse_config(_config(mmrs, data_root, f"s3://{bucket}/runs", tmp_path, zero, max_steps=6))
    run_training(more, init_ray=False)
    history = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [h["step"] for h in history[4:]] == [5, 6]
    assert {h["resumed_from"] for h in history[4:]} == {4}
