"""Tuning stages: exactly which parameters train; stage 3 starts from an unchanged model."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.presets import count_parameters
from earthgpt.processor import EarthGPTProcessor
from earthgpt.stages import set_trainable

from .conftest import random_tiles


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def model(tiny_model: EarthGPTForConditionalGeneration) -> EarthGPTForConditionalGeneration:
    return copy.deepcopy(tiny_model)


def test_stage1_projector_and_fusion(model: EarthGPTForConditionalGeneration) -> None:
    names = set_trainable(model, 1)
    assert set(names) == _trainable(model)
    expected = {
        n for n, _ in model.named_parameters() if n.split(".")[0] in ("fusion", "multi_modal_projector")
    }
    assert _trainable(model) == expected
    # fusion: 4 lateral convs + smooth conv (weight + bias); projector: linear + LayerNorm
    assert len(expected) == 14


def test_stage2_adds_qkv_and_rmsnorms(model: EarthGPTForConditionalGeneration) -> None:
    set_trainable(model, 2)
    llm = {n for n in _trainable(model) if n.startswith("language_model.")}
    layers = model.config.text_config.num_hidden_layers
    expected = {"language_model.model.norm.weight"} | {
        f"language_model.model.layers.{i}.{part}.weight"
        for i in range(layers)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "input_layernorm",
                     "post_attention_layernorm")
    }  # fmt: skip
    assert llm == expected
    assert {n.split(".")[0] for n in _trainable(model) - llm} == {"fusion", "multi_modal_projector"}
    assert not any(re.search(r"o_proj|mlp|embed_tokens|vision_tower|cnn_tower", n) for n in _trainable(model))


def test_stage3_only_shift_parameters_and_outputs_unchanged(
    model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, tmp_path: Path
) -> None:
    batch = processor.build_inputs(random_tiles(2), ["Describe this image.", "Count ships."])
    batch.pop("pad_info")
    with torch.no_grad():
        before = model(**batch).logits
    set_trainable(model, 3)
    assert model.shift is not None and model.config.shift_parameters
    assert all(n.startswith("shift.") for n in _trainable(model))
    # one scale + one bias per linear layer of each decoder layer (q, k, v, o, gate, up, down)
    layers = model.config.text_config.num_hidden_layers
    assert len(_trainable(model)) == 2 * 7 * layers
    out_features = sum(m.out_features for m in model.shift_target_linears().values())
    assert count_parameters(model, trainable_only=True) == 2 * out_features
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)

    # training the shift parameters changes the model; the change survives save / load and merging
    with torch.no_grad():
        for p in model.shift.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        after = model(**batch).logits
    assert not torch.allclose(after, before)
    model.save_pretrained(tmp_path)
    loaded = EarthGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.shift is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, after)
        merged = copy.deepcopy(loaded)
        merged.merge_shift_parameters()
        assert merged.shift is None
        torch.testing.assert_close(merged(**batch).logits, after, atol=1e-5, rtol=1e-5)


def test_deepcopy_rebinds_shift_hooks(model: EarthGPTForConditionalGeneration) -> None:
    set_trainable(model, 3)
    clone = copy.deepcopy(model)
    assert clone.shift is not None and model.shift is not None
    with torch.no_grad():
        for p in clone.shift.parameters():
            p.zero_()
    ids = torch.randint(7, 1000, (1, 6))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, clone(input_ids=ids).logits)


def test_unknown_stage(model: EarthGPTForConditionalGeneration) -> None:
    with pytest.raises(ValueError, match="stage"):
        set_trainable(model, 4)
