"""A training checkpoint -> a ``save_pretrained`` folder that the inference engine and the archive job load.

A checkpoint (one folder, local or ``s3://``, merged by Ray Train from every rank's files) holds DeepSpeed's files
under ``engine/``, ``trainer_state.json`` (step, samples, data-stream positions, ...), ``train_config.json`` and the
model config + processor under ``model/``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"
DS_TAG = "engine"
MODEL_DIR = "model"


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
            with weights_only_loads():  # DeepSpeed's files unpickled with tensors and its own state classes only
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
