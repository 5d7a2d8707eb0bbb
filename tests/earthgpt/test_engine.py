"""The inference engine: plain and DeepSpeed-inference (real, on CPU) give the same tokens."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from earthgpt.engine import Generation, InferenceEngine
from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.presets import build_model, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor
from earthgpt.tasks import build_prompt, parse_answer

from .conftest import random_tiles


@pytest.fixture(scope="module")
def peaky_model() -> EarthGPTForConditionalGeneration:
    return build_model(earthgpt_tiny(text_config={"initializer_range": 0.5}), seed=0)


def test_plain_generate_and_embed(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    engine = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu")
    tiles = random_tiles(2, shapes=((32, 48), (40, 40)))
    prompts = [
        build_prompt("caption", "sar"),
        build_prompt("detect", "optical"),
        build_prompt("classify", "infrared"),
    ]
    out = engine.generate(tiles, prompts, max_new_tokens=8, image_index=[0, 1, 0])
    assert len(out) == 3 and all(isinstance(g, Generation) for g in out)
    for g in out:
        assert 1 <= g.n_tokens <= 8 and len(g.token_ids) == g.n_tokens
        assert g.mean_logprob <= 0.0
        assert "###" not in g.text
    parse_answer("detect", out[1].text, (40, 40))  # whatever the random model says, the parser copes
    # the same tile through precomputed features gives the same answer
    features = engine.encode_images(tiles)
    again = engine.generate(None, prompts, max_new_tokens=8, image_index=[0, 1, 0], image_features=features)
    assert [g.token_ids for g in again] == [g.token_ids for g in out]
    emb = engine.embed(tiles)
    assert emb.shape == (2, peaky_model.config.text_config.hidden_size) and emb.dtype == np.float32
    np.testing.assert_array_equal(engine.embed(image_features=features), emb)


def test_deepspeed_inference_matches_plain(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    tiles = random_tiles(3, seed=7)
    prompts = [
        build_prompt("caption", "optical"),
        build_prompt("classify", "sar"),
        build_prompt("detect", "sar"),
    ]
    plain = InferenceEngine(copy.deepcopy(peaky_model), processor, kind="plain", device="cpu")
    ds = InferenceEngine(copy.deepcopy(peaky_model), processor, kind="deepspeed", device="cpu")
    assert type(ds._ds_engine).__module__.startswith("deepspeed")
    a = plain.generate(tiles, prompts, max_new_tokens=10)
    b = ds.generate(tiles, prompts, max_new_tokens=10)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    np.testing.assert_allclose([g.mean_logprob for g in a], [g.mean_logprob for g in b], atol=1e-5)


def test_gpu_only_options_refused_on_cpu(tiny_model: EarthGPTForConditionalGeneration, processor) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="CUDA"):
        InferenceEngine(tiny_model, processor, kind="deepspeed", kernel_inject=True, device="cpu")
    with pytest.raises(ValueError, match="float16"):
        InferenceEngine(tiny_model, processor, dtype=torch.float16, device="cpu")
    with pytest.raises(ValueError, match="kind"):
        InferenceEngine(tiny_model, processor, kind="vllm", device="cpu")


def test_from_pretrained_preset_and_folder(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, tmp_path: Path
) -> None:
    preset = InferenceEngine.from_pretrained("tiny", device="cpu")
    assert preset.config.image_size == 32
    copy.deepcopy(tiny_model).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = InferenceEngine.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    tiles = random_tiles(1)
    out = saved.generate(tiles, [build_prompt("caption", "optical")], max_new_tokens=4)
    assert out[0].n_tokens >= 1
