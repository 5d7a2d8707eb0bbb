"""Model sizes as builder functions, plus building from public backbones.

- :func:`earthgpt_tiny`: CPU unit tests (32 px, two-layer towers, a forward pass in milliseconds).
- :func:`earthgpt_small`: the toy-world demo model (64 px, patch 8, no pooling: 64 visual tokens, ~1.5 M parameters).
- :func:`earthgpt_paper`: the paper's shapes (DINOv2 ViT-L/14, CLIP ConvNeXt-L, LLaMA-2-13B, 448 px); instantiate on
  the ``meta`` device to count parameters.
- :func:`from_backbones`: the paper model with real weights from local Hugging Face folders.

Tiny and small presets use the bundled tokenizer (``earthgpt/tokenizer``, built by ``scripts/build_tokenizer.py``):
1024 tokens, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, ``<image>`` 4, ``<img>`` 5, ``</img>`` 6.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from earthgpt.modeling import EarthGPTConfig, EarthGPTForConditionalGeneration

BUNDLED_VOCAB_SIZE = 1024
BUNDLED_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3, "image": 4, "image_start": 5, "image_end": 6}
"""Special-token ids of the bundled tokenizer (a test checks them against ``earthgpt/tokenizer``)."""

PAPER_VOCAB_SIZE = 32064
"""LLaMA-2's 32000 tokens + ``<image>``, ``<img>``, ``</img>``, padded to a multiple of 64 (tensor-parallel friendly)."""

LLAMA2_13B_PARAMETERS = 13_015_864_320
"""Published parameter count of LLaMA-2-13B (vocabulary 32000, untied embeddings)."""


def _merge(config: EarthGPTConfig, overrides: dict[str, Any]) -> EarthGPTConfig:
    """Applies overrides: top-level fields directly; ``vision_config`` / ``cnn_config`` / ``text_config`` dicts update
    the sub-config field by field."""
    data = config.to_dict()
    for key, value in overrides.items():
        if key in ("vision_config", "cnn_config", "text_config") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    for key in ("model_type", "transformers_version", "architectures"):
        data.pop(key, None)
    return EarthGPTConfig(**data)


def _bundled_text(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int) -> dict[str, Any]:
    return dict(
        vocab_size=BUNDLED_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024, rms_norm_eps=1e-5,
        bos_token_id=BUNDLED_IDS["bos"], eos_token_id=BUNDLED_IDS["eos"], pad_token_id=BUNDLED_IDS["pad"],
        tie_word_embeddings=True,
    )  # fmt: skip


def _bundled_tokens() -> dict[str, Any]:
    return dict(
        image_token_id=BUNDLED_IDS["image"],
        image_start_token_id=BUNDLED_IDS["image_start"],
        image_end_token_id=BUNDLED_IDS["image_end"],
    )


def earthgpt_tiny(**overrides: Any) -> EarthGPTConfig:
    """CPU test scale: 32-px input, ViT 32x2 (patch 8), CNN 4 stages of one block, LLM 64x2, 2x2 pooling (4 tokens).

    Args:
        **overrides: Any :class:`EarthGPTConfig` field; ``vision_config`` / ``cnn_config`` / ``text_config`` given as
            dicts update those sub-configs field by field (e.g. ``text_config={"hidden_size": 32}``).

    Returns:
        The config (about 0.2 M parameters).
    """
    config = EarthGPTConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=8,
            image_size=32,
        ),
        cnn_config=dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], patch_size=4),
        text_config=_bundled_text(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
        image_size=32,
        vit_layers=(1, 2),
        cnn_fusion_dim=16,
        pool="2x2",
        projector_depth=1,
        **_bundled_tokens(),
    )
    return _merge(config, overrides) if overrides else config


def earthgpt_small(**overrides: Any) -> EarthGPTConfig:
    """The toy-world demo size: 64-px input, patch 8, no pooling (64 visual tokens), ~1.5 M parameters.

    ViT 96x3 (all three blocks fused), CNN 4 stages ``[16, 32, 48, 64]``, fusion 32 channels, MLP projector,
    LLM 160x3 (4 heads, tied embeddings). Sized from the measurements in ENVIRONMENT.md ("How fast a tiny model
    learns"): 0.7-2 M parameter models reach detection F1 ~0.7 in ~12 minutes on two cores.

    Args:
        **overrides: As for :func:`earthgpt_tiny`.

    Returns:
        The config.
    """
    config = EarthGPTConfig(
        vision_config=dict(
            hidden_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            mlp_ratio=4,
            patch_size=8,
            image_size=64,
        ),
        cnn_config=dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], patch_size=4),
        text_config=_bundled_text(hidden=160, layers=3, heads=4, kv_heads=4, intermediate=432),
        image_size=64,
        vit_layers=(1, 2, 3),
        cnn_fusion_dim=32,
        pool="none",
        projector_depth=2,
        **_bundled_tokens(),
    )
    return _merge(config, overrides) if overrides else config


def earthgpt_paper(**overrides: Any) -> EarthGPTConfig:
    """The paper's shapes: DINOv2 ViT-L/14 + CLIP ConvNeXt-L + LLaMA-2-13B, 448-px input, 256 visual tokens.

    Component configs are those published with ``facebook/dinov2-large``, the ConvNeXt-L trunk of open_clip's
    ``convnext_large_d_320`` and ``meta-llama/Llama-2-13b-hf``; the LLM vocabulary is extended by ``<image>``,
    ``<img>``, ``</img>`` (ids 32000-32002) and padded to :data:`PAPER_VOCAB_SIZE`.

    Args:
        **overrides: As for :func:`earthgpt_tiny`.

    Returns:
        The config (instantiate with ``build_model(config, device="meta")`` to count parameters without memory).
    """
    config = EarthGPTConfig(
        text_config=dict(
            vocab_size=PAPER_VOCAB_SIZE,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        ),  # fmt: skip
        image_size=448,
        vit_layers=(6, 12, 18, 24),
        cnn_fusion_dim=1024,
        pool="2x2",
        projector_depth=1,
        image_token_id=32000,
        image_start_token_id=32001,
        image_end_token_id=32002,
    )
    return _merge(config, overrides) if overrides else config


PRESETS: dict[str, Callable[..., EarthGPTConfig]] = {
    "tiny": earthgpt_tiny,
    "small": earthgpt_small,
    "paper": earthgpt_paper,
}
"""Preset builders by short name (also accepted as ``earthgpt_tiny`` etc. by :func:`preset_config`)."""


def preset_config(name: str, **overrides: Any) -> EarthGPTConfig:
    """The config of a preset by name: ``tiny``, ``small``, ``paper`` (or ``earthgpt_tiny`` ...).

    Raises:
        KeyError: for an unknown name.
    """
    key = name.removeprefix("earthgpt_").removeprefix("earthgpt-")
    if key not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key](**overrides)


def build_model(
    config: EarthGPTConfig,
    stage: int | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
    zero3_config: dict[str, Any] | None = None,
) -> EarthGPTForConditionalGeneration:
    """Builds a randomly initialised model from a config.

    Args:
        config: E.g. ``earthgpt_tiny()``.
        stage: If given (1, 2 or 3), marks trainable exactly the parameters of that tuning stage
            (:func:`earthgpt.stages.set_trainable`).
        device: Where to build; ``"meta"`` allocates nothing (parameter counting).
        dtype: Parameter dtype (default float32).
        seed: Seeds ``torch`` before initialisation, for reproducible weights.
        zero3_config: A DeepSpeed config dict with ZeRO stage 3: build the model already partitioned
            (``deepspeed.zero.Init``), weight init deferred and then run on gathered parameters, module by module
            (needs transformers >= 5 and an initialised ``deepspeed.comm``). Alternatively keep a
            ``transformers.integrations.HfDeepSpeedConfig`` alive (needs ``accelerate``).

    Returns:
        The model, in eval mode.
    """
    if seed is not None:
        torch.manual_seed(seed)
    config = copy.deepcopy(config)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    # _from_config, not the constructor: under ZeRO-3 (an HfDeepSpeedConfig alive) it builds inside zero.Init with
    # weight init deferred, then initialises the partitioned parameters correctly
    try:
        if zero3_config is not None:
            model = _build_zero3(config, zero3_config)
        elif device is not None:
            with torch.device(device):
                model = EarthGPTForConditionalGeneration._from_config(config)
        else:
            model = EarthGPTForConditionalGeneration._from_config(config)
    finally:
        torch.set_default_dtype(previous)
    if stage is not None:
        from earthgpt.stages import set_trainable

        set_trainable(model, stage)
    return model.eval()


def _build_zero3(config: EarthGPTConfig, ds_config: dict[str, Any]) -> EarthGPTForConditionalGeneration:
    """What ``_from_config`` does under an ``HfDeepSpeedConfig``, without needing ``accelerate``."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3, prevent_arange_dtype_change

    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = EarthGPTForConditionalGeneration(config)
    initialize_weights_zero3(model)
    model.tie_weights()
    return model


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a module (shared tensors counted once); works on the ``meta`` device.

    Args:
        module: A model or any submodule.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_counts(model: EarthGPTForConditionalGeneration) -> dict[str, int]:
    """Parameters per component: ``vision_tower``, ``cnn_tower``, ``fusion``, ``multi_modal_projector``,
    ``language_model``, ``shift``, and ``total``."""
    counts = {}
    for name in ("vision_tower", "cnn_tower", "fusion", "multi_modal_projector", "language_model", "shift"):
        sub = getattr(model, name, None)
        counts[name] = count_parameters(sub) if sub is not None else 0
    counts["total"] = count_parameters(model)
    return counts


def _token_id(tokenizer: Any, token: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(value, int):
        raise ValueError(f"tokenizer has no single id for {token!r}")
    return value


def from_backbones(
    vit_dir: str | Path,
    cnn_dir: str | Path,
    llm_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    pad_vocab_to_multiple_of: int = 64,
    **overrides: Any,
) -> tuple[EarthGPTForConditionalGeneration, Any]:
    """Builds EarthGPT with pretrained components from local Hugging Face folders.

    Args:
        vit_dir: A ``Dinov2Model`` folder (e.g. a local copy of ``facebook/dinov2-large``).
        cnn_dir: A ``ConvNextModel`` folder: CLIP ConvNeXt-L converted with ``python -m earthgpt.convert_convnext``.
        llm_dir: A ``LlamaForCausalLM`` folder with its tokenizer (e.g. ``meta-llama/Llama-2-13b-hf``).
        dtype: Load the weights in this dtype (e.g. ``torch.bfloat16``); default float32.
        pad_vocab_to_multiple_of: The embeddings grow by ``<image>``, ``<img>``, ``</img>`` (new rows: the mean of
            the old ones), padded to this multiple.
        **overrides: :class:`EarthGPTConfig` fields other than the component configs and token ids (``image_size``,
            ``vit_layers``, ``pool``, ...); defaults are the paper preset's.

    Returns:
        ``(model, processor)``: the model in eval mode with fresh fusion and projector weights (train them with
        stage 1), and an :class:`earthgpt.processor.EarthGPTProcessor` holding the extended LLM tokenizer.
    """
    from transformers import AutoTokenizer, ConvNextModel, Dinov2Model, LlamaForCausalLM

    from earthgpt.processor import IMAGE_END, IMAGE_START, IMAGE_TOKEN, EarthGPTProcessor
    from earthgpt.weights import require_safetensors

    for folder in (vit_dir, cnn_dir, llm_dir):
        require_safetensors(folder)  # never unpickle weights
    kw: dict[str, Any] = {"use_safetensors": True} if dtype is None else {"dtype": dtype, "use_safetensors": True}
    vit = Dinov2Model.from_pretrained(str(vit_dir), **kw)
    cnn = ConvNextModel.from_pretrained(str(cnn_dir), **kw)
    llm = LlamaForCausalLM.from_pretrained(str(llm_dir), **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, IMAGE_START, IMAGE_END]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_vocab_to_multiple_of)
    llm.config.pad_token_id = tokenizer.pad_token_id
    defaults = {
        k: v
        for k, v in earthgpt_paper().to_dict().items()
        if k in ("image_size", "vit_layers", "vit_layer_norm", "cnn_fusion_dim", "pool", "projector_depth")
    }
    config = EarthGPTConfig(
        vision_config=vit.config,
        cnn_config=cnn.config,
        text_config=llm.config,
        image_token_id=_token_id(tokenizer, IMAGE_TOKEN),
        image_start_token_id=_token_id(tokenizer, IMAGE_START),
        image_end_token_id=_token_id(tokenizer, IMAGE_END),
        **{**defaults, **overrides},
    )
    # build the wrapper without allocating its towers, then put the loaded ones in
    with torch.device("meta"):
        model = EarthGPTForConditionalGeneration(config)
    model.vision_tower = vit
    model.cnn_tower = cnn
    model.language_model = llm
    target_dtype = dtype or torch.float32
    for name in ("fusion", "multi_modal_projector"):
        sub = getattr(model, name)
        if sub is None:
            continue
        sub.to_empty(device="cpu")
        sub.apply(model._init_weights)
        sub.to(target_dtype)
    if config.freeze_encoders:
        model.freeze_encoders()
    processor = EarthGPTProcessor.from_config(config, tokenizer)
    return model.eval(), processor
