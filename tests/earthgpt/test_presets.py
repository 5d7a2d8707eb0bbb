"""Presets: the paper model's parameter counts against the published component configs; from_backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.presets import (
    LLAMA2_13B_PARAMETERS,
    PAPER_VOCAB_SIZE,
    build_model,
    count_parameters,
    earthgpt_paper,
    earthgpt_small,
    earthgpt_tiny,
    from_backbones,
    parameter_counts,
    preset_config,
)
from earthgpt.processor import TOKENIZER_DIR

from .conftest import random_tiles


def dinov2_params(d: int, layers: int, patch: int, image: int, mlp_ratio: int = 4) -> int:
    """DINOv2 ViT (facebook/dinov2-* config.json): embeddings, blocks with LayerScale, final LayerNorm."""
    n_pos = 1 + (image // patch) ** 2
    embeddings = d + d + n_pos * d + (3 * patch * patch * d + d)  # cls, mask token, positions, patch conv
    h = mlp_ratio * d
    block = 2 * d + 3 * (d * d + d) + (d * d + d) + d + 2 * d + (d * h + h) + (h * d + d) + d
    return embeddings + layers * block + 2 * d


def convnext_params(dims: list[int], depths: list[int], patch: int = 4) -> int:
    """ConvNeXt (Liu et al. 2022) trunk as in timm / open_clip, plus the final LayerNorm; no classifier."""
    total = 3 * patch * patch * dims[0] + dims[0] + 2 * dims[0]  # stem conv + LayerNorm
    for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
        if i > 0:
            total += 2 * dims[i - 1] + dims[i - 1] * 4 * d + d  # LayerNorm + 2x2 stride-2 conv
        block = 49 * d + d + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d) + d  # dwconv, LN, MLP, layer scale
        total += n * block
    return total + 2 * dims[-1]


def llama_params(vocab: int, d: int, inter: int, layers: int) -> int:
    """LLaMA with untied embeddings and no biases."""
    return 2 * vocab * d + layers * (4 * d * d + 3 * d * inter + 2 * d) + d


@pytest.fixture(scope="module")
def paper_counts() -> dict[str, int]:
    return parameter_counts(build_model(earthgpt_paper(), device="meta"))


def test_paper_vit_is_dinov2_large(paper_counts: dict[str, int]) -> None:
    expected = dinov2_params(d=1024, layers=24, patch=14, image=518)
    assert paper_counts["vision_tower"] == expected
    assert expected == pytest.approx(0.304e9, rel=0.01)


def test_paper_cnn_is_convnext_large(paper_counts: dict[str, int]) -> None:
    expected = convnext_params([192, 384, 768, 1536], [3, 3, 27, 3])
    assert paper_counts["cnn_tower"] == expected
    assert expected == pytest.approx(0.196e9, rel=0.01)


def test_paper_llm_is_llama2_13b(paper_counts: dict[str, int]) -> None:
    assert llama_params(32000, 5120, 13824, 40) == LLAMA2_13B_PARAMETERS  # the published figure
    extra_rows = (
        (PAPER_VOCAB_SIZE - 32000) * 5120 * 2
    )  # <image>, <img>, </img> + padding, in and out embeddings
    assert paper_counts["language_model"] == LLAMA2_13B_PARAMETERS + extra_rows


def test_paper_fusion_projector_and_total(paper_counts: dict[str, int]) -> None:
    # projector: (4 ViT layers x 1024 + 1024 CNN channels) -> 5120, + LayerNorm
    assert paper_counts["multi_modal_projector"] == (4 * 1024 + 1024) * 5120 + 5120 + 2 * 5120
    laterals = sum(c * 1024 + 1024 for c in (192, 384, 768, 1536))
    assert paper_counts["fusion"] == laterals + 9 * 1024 * 1024 + 1024
    parts = sum(v for k, v in paper_counts.items() if k != "total")
    assert paper_counts["total"] == parts
    assert paper_counts["total"] == pytest.approx(13.56e9, rel=0.01)
    cfg = earthgpt_paper()
    assert (cfg.image_size, cfg.grid_size, cfg.num_image_tokens) == (448, 32, 256)


def test_small_preset_size_and_tokens() -> None:
    cfg = earthgpt_small()
    assert cfg.num_image_tokens == 64 and cfg.image_size == 64 and cfg.pool == "none"
    total = count_parameters(build_model(cfg, device="meta"))
    assert 1_000_000 <= total <= 3_000_000
    assert preset_config("earthgpt_small").to_dict() == cfg.to_dict()
    with pytest.raises(KeyError):
        preset_config("huge")


def test_build_model_seed_dtype_and_stage() -> None:
    a = build_model(earthgpt_tiny(), seed=1)
    b = build_model(earthgpt_tiny(), seed=1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    half = build_model(earthgpt_tiny(), dtype=torch.bfloat16, stage=1)
    assert half.language_model.lm_head.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    assert {n.split(".")[0] for n, p in half.named_parameters() if p.requires_grad} == {
        "fusion", "multi_modal_projector"
    }  # fmt: skip


def test_from_backbones_loads_component_weights(tmp_path: Path) -> None:
    tiny = earthgpt_tiny()
    torch.manual_seed(0)
    vit = Dinov2Model(Dinov2Config(**tiny.vision_config.to_dict()))
    cnn = ConvNextModel(ConvNextConfig(**tiny.cnn_config.to_dict()))
    llm_cfg = LlamaConfig(**{**tiny.text_config.to_dict(), "vocab_size": 1000, "tie_word_embeddings": False})
    llm = LlamaForCausalLM(llm_cfg)
    for name, module in (("vit", vit), ("cnn", cnn), ("llm", llm)):
        module.save_pretrained(tmp_path / name)
    # the LLM folder carries its tokenizer (the bundled one stands in for LLaMA's here)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(tmp_path / "llm")

    model, processor = from_backbones(
        tmp_path / "vit",
        tmp_path / "cnn",
        tmp_path / "llm",
        image_size=32,
        vit_layers=(1, 2),
        cnn_fusion_dim=16,
    )
    assert isinstance(model, EarthGPTForConditionalGeneration)
    for ours, theirs in ((model.vision_tower, vit), (model.cnn_tower, cnn)):
        for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            assert torch.equal(p, q), n
    assert torch.equal(
        model.language_model.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight
    )
    # vocabulary 1000 grew to hold the tokenizer's 1024 tokens, padded to a multiple of 64
    assert model.language_model.get_input_embeddings().weight.shape[0] == 1024
    assert model.config.image_token_id == processor.image_token_id == 4
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    batch = processor.build_inputs(random_tiles(2), ["Describe this image.", "Count ships."])
    batch.pop("pad_info")
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.logits).all()
