"""EarthGPT: configuration and the whole forward pass, in one file.

Architecture (Zhang et al., "EarthGPT", IEEE TGRS 2024; code lineage SPHINX / LLaMA2-Accessory)::

    pixel_values (N, 3, S, S), normalised with config.image_mean/std
      |-- vision_tower  Dinov2Model (frozen) --> hidden states of blocks config.vit_layers, each through the tower's
      |                                          final LayerNorm (config.vit_layer_norm), CLS dropped, concatenated
      |                                          per token: (N, g*g, len(vit_layers) * D_vit)     g = S / patch
      |-- cnn_tower     ConvNextModel (frozen) --> stage outputs at strides 4, 8, 16, 32
      |        fusion   lateral 1x1 convs, top-down upsample + sum (FPN), resampled onto the g x g ViT grid, 3x3 conv
      |                 --> (N, g*g, cnn_fusion_dim)
      '-- per-token channel concat --> optional 2x2 average pooling (config.pool) --> multi_modal_projector
          (Linear [+ GELU + Linear] + LayerNorm) --> (N, T, D_llm) visual tokens, T = config.num_image_tokens

    language_model  LlamaForCausalLM on   [BOS] <img> <image> x T </img> prompt answer
                    (the embeddings of the <image> positions are replaced by the visual tokens, in order)

Images are not tied one-to-one to text rows: ``image_index[b]`` names the image of row ``b``, so several prompts on one
tile share one encoding. Loss is next-token cross-entropy on positions whose label is not -100 (answers only; the
caller masks the rest). :meth:`EarthGPTForConditionalGeneration.generate` is a batched KV-cache loop (left padding,
greedy or sampling) that also returns each answer's mean token log-probability;
:meth:`EarthGPTForConditionalGeneration.forward_cached` runs one chunk per row against a pre-allocated
:class:`StaticKVCache` (what ``earthgpt.engine``'s static decoder schedules).

Kept importable with only torch + transformers (>= 4.46) so that GPU scripts can run it on a bare machine.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
)

IGNORE_INDEX = -100
"""Label of positions that do not count in the loss."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

POOL_CHOICES = ("2x2", "none")


_C = TypeVar("_C", bound=PretrainedConfig)


def _first_int(value: Any) -> int:
    """``14`` or ``(14, 14)`` -> 14 (square patches)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _sub_config(value: Any, cls: type[_C], default: dict[str, Any]) -> _C:
    if isinstance(value, cls):
        return value
    if isinstance(value, PretrainedConfig):
        return cls(**{k: v for k, v in value.to_dict().items() if k != "model_type"})
    if isinstance(value, dict):
        kwargs = {k: v for k, v in value.items() if k != "model_type"}
        return cls(**kwargs)
    if value is None:
        return cls(**default)
    raise TypeError(f"expected a {cls.__name__}, a dict or None, got {type(value).__name__}")


# Defaults are the paper's component shapes (DINOv2 ViT-L/14, CLIP ConvNeXt-L, LLaMA-2-13B); presets build the rest.
_VISION_DEFAULT: dict[str, Any] = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14, image_size=518,
    layerscale_value=1.0, use_swiglu_ffn=False,
)  # fmt: skip
_CNN_DEFAULT: dict[str, Any] = dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3], patch_size=4)
_TEXT_DEFAULT: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip


class EarthGPTConfig(PretrainedConfig):
    """Configuration of :class:`EarthGPTForConditionalGeneration`: three component configs plus our fields.

    Args:
        vision_config: ViT branch, a ``Dinov2Config`` (or its dict). Defaults to DINOv2 ViT-L/14.
        cnn_config: CNN branch, a ``ConvNextConfig`` (or its dict). Defaults to ConvNeXt-L (CLIP's trunk).
        text_config: LLM, a ``LlamaConfig`` (or its dict). Defaults to LLaMA-2-13B.
        image_size: Side of the square model input, pixels (paper: 448). Must be a multiple of the ViT patch.
        vit_layers: 1-based indices of the ViT blocks whose outputs are fused (multi-layer feature fusion; default 4
            evenly spaced blocks of 24).
        vit_layer_norm: Pass each selected block output through the ViT's final LayerNorm (as DINOv2's
            ``get_intermediate_layers(norm=True)``).
        use_cnn: Use the CNN branch; ``False`` fuses ViT features alone (ablation, smallest models).
        cnn_fusion_dim: Channels of the fused CNN pyramid appended to each visual token.
        pool: ``"2x2"`` average-pools the token grid (1024 -> 256 tokens at 448 px) or ``"none"``.
        projector_depth: 1 = Linear (SPHINX), 2 = Linear-GELU-Linear; then LayerNorm if ``projector_layer_norm``.
        projector_layer_norm: LayerNorm after the projector (SPHINX).
        image_mean: Per-channel mean the processor normalises with (CLIP's by default).
        image_std: Per-channel std the processor normalises with.
        vit_image_mean: Mean the ViT was trained with (ImageNet for DINOv2); the model re-normalises its input when
            it differs from ``image_mean``.
        vit_image_std: Std the ViT was trained with.
        image_token_id: Token id of each ``<image>`` placeholder (one per visual token).
        image_start_token_id: ``<img>`` id, or ``None`` for no delimiter.
        image_end_token_id: ``</img>`` id, or ``None`` for no delimiter.
        freeze_encoders: ViT and CNN parameters get ``requires_grad=False`` at construction.
        shift_parameters: The model carries stage-3 per-linear-layer scale and bias parameters (see
            :mod:`earthgpt.stages`); set by ``set_trainable(model, 3)`` so that checkpoints reload with them.
        shift_targets: Which ``nn.Linear`` modules get shift parameters: ``"llm"`` (every linear layer of the
            decoder layers) or ``"llm+projector"``.
    """

    model_type = "earthgpt"
    sub_configs = {"vision_config": Dinov2Config, "cnn_config": ConvNextConfig, "text_config": LlamaConfig}

    def __init__(
        self,
        vision_config: Dinov2Config | dict[str, Any] | None = None,
        cnn_config: ConvNextConfig | dict[str, Any] | None = None,
        text_config: LlamaConfig | dict[str, Any] | None = None,
        image_size: int = 448,
        vit_layers: Sequence[int] = (6, 12, 18, 24),
        vit_layer_norm: bool = True,
        use_cnn: bool = True,
        cnn_fusion_dim: int = 1024,
        pool: str = "2x2",
        projector_depth: int = 1,
        projector_layer_norm: bool = True,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        vit_image_mean: Sequence[float] = IMAGENET_MEAN,
        vit_image_std: Sequence[float] = IMAGENET_STD,
        image_token_id: int = 32000,
        image_start_token_id: int | None = 32001,
        image_end_token_id: int | None = 32002,
        freeze_encoders: bool = True,
        shift_parameters: bool = False,
        shift_targets: str = "llm",
        **kwargs: Any,
    ) -> None:
        self.vision_config = _sub_config(vision_config, Dinov2Config, _VISION_DEFAULT)
        self.cnn_config = _sub_config(cnn_config, ConvNextConfig, _CNN_DEFAULT)
        self.text_config = _sub_config(text_config, LlamaConfig, _TEXT_DEFAULT)
        self.image_size = int(image_size)
        self.vit_layers = [int(i) for i in vit_layers]
        self.vit_layer_norm = bool(vit_layer_norm)
        self.use_cnn = bool(use_cnn)
        self.cnn_fusion_dim = int(cnn_fusion_dim)
        self.pool = pool
        self.projector_depth = int(projector_depth)
        self.projector_layer_norm = bool(projector_layer_norm)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.vit_image_mean = [float(v) for v in vit_image_mean]
        self.vit_image_std = [float(v) for v in vit_image_std]
        self.image_token_id = int(image_token_id)
        self.image_start_token_id = None if image_start_token_id is None else int(image_start_token_id)
        self.image_end_token_id = None if image_end_token_id is None else int(image_end_token_id)
        self.freeze_encoders = bool(freeze_encoders)
        self.shift_parameters = bool(shift_parameters)
        self.shift_targets = shift_targets
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Checks that the fields fit together.

        Raises:
            ValueError: with the field at fault.
        """
        patch = _first_int(self.vision_config.patch_size)
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the ViT patch size {patch}")
        n_layers = int(self.vision_config.num_hidden_layers)
        if not self.vit_layers or any(not 1 <= i <= n_layers for i in self.vit_layers):
            raise ValueError(f"vit_layers {self.vit_layers} must be 1-based block indices in 1..{n_layers}")
        if self.pool not in POOL_CHOICES:
            raise ValueError(f"pool must be one of {POOL_CHOICES}, got {self.pool!r}")
        if self.pool == "2x2" and self.grid_size % 2:
            raise ValueError(f"pool='2x2' needs an even token grid, got {self.grid_size}x{self.grid_size}")
        if self.projector_depth not in (1, 2):
            raise ValueError(f"projector_depth must be 1 or 2, got {self.projector_depth}")
        if self.shift_targets not in ("llm", "llm+projector"):
            raise ValueError(f"shift_targets must be 'llm' or 'llm+projector', got {self.shift_targets!r}")
        for name in ("image_mean", "image_std", "vit_image_mean", "vit_image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} needs 3 values")
        vocab = int(self.text_config.vocab_size)
        for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                raise ValueError(f"{name}={value} is outside the LLM vocabulary (size {vocab})")

    @property
    def grid_size(self) -> int:
        """Side of the ViT token grid (``image_size / patch_size``)."""
        return self.image_size // _first_int(self.vision_config.patch_size)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image after the optional pooling (the number of ``<image>`` placeholders)."""
        side = self.grid_size // 2 if self.pool == "2x2" else self.grid_size
        return side * side

    @property
    def vit_feature_dim(self) -> int:
        """Channels of the fused ViT features per token."""
        return int(self.vision_config.hidden_size) * len(self.vit_layers)

    @property
    def visual_feature_dim(self) -> int:
        """Channels per token entering the projector."""
        return self.vit_feature_dim + (self.cnn_fusion_dim if self.use_cnn else 0)


@dataclass
class EarthGPTOutput:
    """Output of :meth:`EarthGPTForConditionalGeneration.forward` (a plain dataclass, stable across transformers
    versions).

    Attributes:
        loss: Mean next-token cross-entropy over label positions (when ``labels`` were given).
        logits: ``(B, L, V)`` next-token logits.
        cache: KV cache (when ``use_cache``); also readable as ``past_key_values``.
        image_features: ``(N, T, D)`` projected visual tokens of the images in this call (``None`` without images).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None
    image_features: torch.Tensor | None = None

    @property
    def past_key_values(self) -> Any:
        """Alias of ``cache``."""
        return self.cache


@dataclass
class EarthGPTGenerateOutput:
    """Output of :meth:`EarthGPTForConditionalGeneration.generate`.

    Attributes:
        sequences: ``(B, T)`` new token ids; rows that stopped early are filled with the pad id.
        token_logprobs: ``(B, T)`` log-probability of each new token under the model (temperature 1); 0 after stop.
        mean_logprob: ``(B,)`` mean of ``token_logprobs`` over each row's tokens (stop token included).
        n_tokens: ``(B,)`` tokens each row generated, the stop token included.
    """

    sequences: torch.Tensor
    token_logprobs: torch.Tensor
    mean_logprob: torch.Tensor
    n_tokens: torch.Tensor


class StaticKVCache:
    """Pre-allocated keys and values of every decoder layer, one row ("slot") per sequence.

    ``key`` and ``value`` are ``(layers, slots, kv_heads, max_len, head_dim)``, allocated once. A slot holds its
    sequence from position 0 (no padding in front). Keys past a slot's own length may hold stale values: the chunk
    mask of :meth:`EarthGPTForConditionalGeneration.forward_cached` lets each query see only positions up to its own,
    all of which the row itself wrote. The decoder layers call :meth:`update` with each chunk's new keys and values;
    :meth:`bind` says where they go.

    Args:
        num_layers: Decoder layers.
        slots: Sequences held at once (the decode batch).
        kv_heads: Key/value heads held here (a tensor-parallel rank holds its share).
        max_len: Positions per slot (longest prompt + generation budget).
        head_dim: Channels per head.
        device: Where to allocate.
        dtype: Dtype of the keys and values (the model's).
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.key = torch.zeros(shape, device=device, dtype=dtype)
        self.value = torch.zeros(shape, device=device, dtype=dtype)
        self._all_rows = torch.arange(slots, device=device)
        # flat offset of (slot, head) rows in a layer's (slots * kv_heads * max_len, head_dim) view
        self._head_rows = torch.arange(kv_heads, device=device) * max_len
        self._rows: int | torch.Tensor = 0
        self._flat = torch.zeros(0, dtype=torch.long, device=device)
        self._span = 0
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        """``(cos, sin)`` tables ``(max_len, head_dim)`` of the rotary embedding, set by the model."""
        self.rope_sin_signed: torch.Tensor | None = None
        """``sin`` with its first half negated: ``rotate_half(x) * sin == flip_halves(x) * sin_signed`` exactly."""

    @property
    def slots(self) -> int:
        """Sequences held at once."""
        return int(self.key.shape[1])

    @property
    def max_len(self) -> int:
        """Positions per slot."""
        return int(self.key.shape[3])

    @property
    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        return 2 * self.key.numel() * self.key.element_size()

    def bind(self, rows: int | torch.Tensor, positions: torch.Tensor, span: int) -> None:
        """Says where the next chunk's keys and values go.

        Args:
            rows: ``n`` for slots ``0 .. n-1`` (attended as a view, no copy) or ``(B,)`` slot indices.
            positions: ``(B, C)`` position of each chunk token (where its key and value are written).
            span: Keys returned to attention: positions ``0 .. span-1`` (at least ``positions.max() + 1``).
        """
        if span > self.max_len:
            raise ValueError(f"span {span} exceeds the cache's {self.max_len} positions")
        index = self._all_rows[:rows] if isinstance(rows, int) else rows
        # one flat index per (row, chunk token, head), computed once for every layer: each layer's write is then a
        # single index_copy_ (advanced-index assignment over dims 0 and 2 was the prefill's slowest op)
        base = index * (self._head_rows.numel() * self.max_len)
        self._flat = (base[:, None, None] + positions[:, :, None] + self._head_rows).reshape(-1)
        self._rows, self._span = rows, int(span)

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Writes one layer's ``(B, C, H, D)`` chunk keys/values at the bound rows and positions."""
        d = self.key.shape[-1]
        key, value = self.key[layer_idx].view(-1, d), self.value[layer_idx].view(-1, d)
        key.index_copy_(0, self._flat, key_states.reshape(-1, d).to(key.dtype))
        value.index_copy_(0, self._flat, value_states.reshape(-1, d).to(value.dtype))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes one layer's ``(B, C, H, D)`` chunk keys/values and returns the attended ``(B, H, span, D)``."""
        self.write(key_states, value_states, layer_idx)
        key, value, rows = self.key[layer_idx], self.value[layer_idx], self._rows
        if isinstance(rows, int):
            return key[:rows, :, : self._span], value[:rows, :, : self._span]
        return key[rows, :, : self._span], value[rows, :, : self._span]

    def copy_rows(self, src: Sequence[int], dst: Sequence[int], length: int) -> None:
        """Copies the first ``length`` positions of slots ``src`` into slots ``dst`` (every layer)."""
        if not src:
            return
        s = torch.as_tensor(list(src), device=self.key.device)
        d = torch.as_tensor(list(dst), device=self.key.device)
        self.key[:, d, :, :length] = self.key[:, s, :, :length]
        self.value[:, d, :, :length] = self.value[:, s, :, :length]


# transformers 5.x renamed the KV-cache argument and output field from ``past_key_values`` to ``cache``
_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class EarthGPTCNNFusion(nn.Module):
    """Top-down FPN fusion of the CNN stage outputs, resampled onto the ViT token grid.

    ``P_last = lateral(C_last)``; ``P_i = lateral_i(C_i) + upsample(P_{i+1})`` down to the finest stage; the finest map
    is resampled to ``grid x grid`` (area averaging when shrinking, bilinear when growing) and smoothed by a 3x3 conv.
    Smoothing after resampling keeps the 3x3 conv on the small grid (at 448 px: 32x32 instead of 112x112).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in in_channels)
        self.smooth = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, maps: Sequence[torch.Tensor], grid: int) -> torch.Tensor:
        """Fuses ``maps`` (finest first) into ``(N, out_channels, grid, grid)``."""
        fused = self.lateral[-1](maps[-1])
        for i in range(len(maps) - 2, -1, -1):
            lateral = self.lateral[i](maps[i])
            fused = lateral + F.interpolate(fused, size=lateral.shape[-2:], mode="nearest")
        h, w = fused.shape[-2:]
        if h >= grid and w >= grid:
            fused = F.adaptive_avg_pool2d(fused, grid)
        else:
            fused = F.interpolate(fused, size=(grid, grid), mode="bilinear", align_corners=False)
        return self.smooth(fused)


class EarthGPTProjector(nn.Module):
    """Maps fused visual tokens into the LLM embedding space: Linear (+ GELU + Linear) + LayerNorm (SPHINX)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 1, layer_norm: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU() if depth == 2 else nn.Identity()
        self.linear_2 = nn.Linear(out_dim, out_dim) if depth == 2 else nn.Identity()
        self.norm = nn.LayerNorm(out_dim) if layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T, in_dim)`` -> ``(N, T, out_dim)``."""
        return self.norm(self.linear_2(self.act(self.linear_1(x))))


class ShiftParameters(nn.Module):
    """Stage-3 parameters: a per-output-channel scale (init 1) and bias (init 0) for each targeted ``nn.Linear``.

    The targeted layer computes ``y = (x W^T + b) * scale + bias`` through a forward hook, so the model's outputs are
    unchanged at initialisation and only these parameters need training (LLaMA-Adapter V2's bias/scale tuning).
    Keys are module paths with ``.`` replaced by ``__``.
    """

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.scales = nn.ParameterDict()
        self.biases = nn.ParameterDict()
        for name, linear in linears.items():
            key = name.replace(".", "__")
            weight = linear.weight
            self.scales[key] = nn.Parameter(
                torch.ones(linear.out_features, device=weight.device, dtype=weight.dtype)
            )
            self.biases[key] = nn.Parameter(
                torch.zeros(linear.out_features, device=weight.device, dtype=weight.dtype)
            )

    def reset_parameters(self) -> None:
        """Scale 1, bias 0: the identity."""
        with torch.no_grad():
            for p in self.scales.values():
                p.fill_(1.0)
            for p in self.biases.values():
                p.zero_()


class _ShiftHook:
    """Forward hook applying one layer's shift parameters (an object, so that ``copy.deepcopy`` rebinds it)."""

    def __init__(self, shift: ShiftParameters, key: str) -> None:
        self.shift = shift
        self.key = key

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.shift.scales[self.key] + self.shift.biases[self.key]


def _zero3_external_parameter_registrar() -> Any:
    """``deepspeed.zero.register_external_parameter`` when DeepSpeed is already imported, else ``None``.

    ZeRO-3 jobs import DeepSpeed before they build or convert the model, so checking ``sys.modules`` is enough and
    keeps DeepSpeed an optional import of this file.
    """
    if "deepspeed" not in sys.modules:
        return None
    try:
        from deepspeed.runtime.zero import register_external_parameter
    except Exception:  # noqa: BLE001 - a broken DeepSpeed install must not break model building
        return None
    return register_external_parameter


class EarthGPTPreTrainedModel(PreTrainedModel):
    """Base class: config class, weight initialisation of EarthGPT's own modules."""

    config_class = EarthGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Dinov2Layer", "ConvNextLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = float(getattr(self.config.text_config, "initializer_range", 0.02))
        with torch.no_grad():
            if isinstance(module, ShiftParameters):
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(
                module, nn.Embedding
            ):  # reached only by transformers 4.x, which applies this everywhere
                nn.init.normal_(module.weight, mean=0.0, std=std)


class EarthGPTForConditionalGeneration(EarthGPTPreTrainedModel):
    """The EarthGPT model: two frozen visual encoders, fusion, projector, LLaMA decoder.

    Submodules: ``vision_tower`` (Dinov2Model), ``cnn_tower`` (ConvNextModel, absent when ``use_cnn=False``),
    ``fusion`` (:class:`EarthGPTCNNFusion`), ``multi_modal_projector`` (:class:`EarthGPTProjector`),
    ``language_model`` (LlamaForCausalLM), ``shift`` (:class:`ShiftParameters`, stage 3 only).

    Build from a config (random weights) with ``EarthGPTForConditionalGeneration(config)`` or
    ``earthgpt.presets.build_model``; from public backbones with ``earthgpt.presets.from_backbones``; reload a saved
    model with ``from_pretrained`` (also via ``AutoModel`` / ``AutoModelForImageTextToText``).
    """

    def __init__(self, config: EarthGPTConfig) -> None:
        super().__init__(config)
        self.vision_tower = Dinov2Model(config.vision_config)
        self.cnn_tower = ConvNextModel(config.cnn_config) if config.use_cnn else None
        self.fusion = (
            EarthGPTCNNFusion(list(config.cnn_config.hidden_sizes or []), config.cnn_fusion_dim)
            if config.use_cnn
            else None
        )
        self.multi_modal_projector = EarthGPTProjector(
            config.visual_feature_dim,
            int(config.text_config.hidden_size),
            depth=config.projector_depth,
            layer_norm=config.projector_layer_norm,
        )
        self.language_model = LlamaForCausalLM(config.text_config)
        self.shift: ShiftParameters | None = None
        if config.shift_parameters:
            self.add_shift_parameters()
        if config.freeze_encoders:
            self.freeze_encoders()
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------------
    # Parameter groups

    def freeze_encoders(self) -> None:
        """Sets ``requires_grad=False`` on the ViT and CNN towers."""
        for tower in (self.vision_tower, self.cnn_tower):
            if tower is not None:
                tower.requires_grad_(False)

    def shift_target_linears(self) -> dict[str, nn.Linear]:
        """The ``nn.Linear`` modules that get stage-3 shift parameters, by module path."""
        prefixes = ["language_model.model.layers."]
        if self.config.shift_targets == "llm+projector":
            prefixes.append("multi_modal_projector.")
        return {
            name: m
            for name, m in self.named_modules()
            if isinstance(m, nn.Linear) and any(name.startswith(p) for p in prefixes)
        }

    def add_shift_parameters(self) -> ShiftParameters:
        """Adds (once) the stage-3 scale/bias parameters and their hooks; outputs stay identical (scale 1, bias 0).

        Also sets ``config.shift_parameters = True`` so that a saved checkpoint reloads with them.

        Returns:
            The :class:`ShiftParameters` module (``model.shift``).
        """
        if self.shift is not None:
            return self.shift
        linears = self.shift_target_linears()
        self.shift = ShiftParameters(linears)
        register_external = _zero3_external_parameter_registrar()
        for name, linear in linears.items():
            key = name.replace(".", "__")
            linear.register_forward_hook(_ShiftHook(self.shift, key))
            if register_external is not None:
                # under ZeRO-3 a module's forward only gathers its own parameters: declare the ones the hook reads
                register_external(linear, self.shift.scales[key])
                register_external(linear, self.shift.biases[key])
        self.config.shift_parameters = True
        return self.shift

    def merge_shift_parameters(self) -> None:
        """Folds the shift parameters into the linear layers' weights and biases and removes the hooks.

        For inference engines that replace modules (DeepSpeed kernel injection, tensor parallelism). The merged model
        computes the same function but no longer matches its config: do not ``save_pretrained`` it.
        """
        if self.shift is None:
            return
        with torch.no_grad():
            for name, linear in self.shift_target_linears().items():
                key = name.replace(".", "__")
                scale, bias = self.shift.scales[key], self.shift.biases[key]
                linear.weight.mul_(scale[:, None].to(linear.weight.dtype))
                new_bias = bias.clone() if linear.bias is None else linear.bias * scale + bias
                linear.bias = nn.Parameter(new_bias.to(linear.weight.dtype), requires_grad=False)
                for hook_id, hook in list(linear._forward_hooks.items()):
                    if isinstance(hook, _ShiftHook):
                        del linear._forward_hooks[hook_id]
        self.shift = None

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ----------------------------------------------------------------------------------------------------------------
    # Vision

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (N, 3, H, W), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 channels, got {pixel_values.shape[1]}")
        s = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (s, s):
            raise ValueError(
                f"pixel_values must be {s}x{s} (config.image_size), got {tuple(pixel_values.shape[-2:])}: "
                "preprocess with EarthGPTProcessor"
            )

    def _renormalise(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        if list(mean) == list(self.config.image_mean) and list(std) == list(self.config.image_std):
            return x
        m0 = torch.tensor(self.config.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s0 = torch.tensor(self.config.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        m1 = torch.tensor(list(mean), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        s1 = torch.tensor(list(std), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * s0 + m0 - m1) / s1

    def get_vit_hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the ViT blocks in ``config.vit_layers`` (before any LayerNorm), CLS token included.

        Args:
            pixel_values: ``(N, 3, S, S)`` normalised with ``config.image_mean/std``.

        Returns:
            One ``(N, 1 + g*g, D_vit)`` tensor per selected block (``hidden_states[i]`` of ``Dinov2Model``).
        """
        x = self._renormalise(pixel_values, self.config.vit_image_mean, self.config.vit_image_std)
        out = self.vision_tower(pixel_values=x, output_hidden_states=True, return_dict=True)
        return [out.hidden_states[i] for i in self.config.vit_layers]

    def _encoders_need_grad(self) -> bool:
        towers = [t for t in (self.vision_tower, self.cnn_tower) if t is not None]
        return torch.is_grad_enabled() and any(p.requires_grad for t in towers for p in t.parameters())

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encodes images into visual tokens in the LLM embedding space.

        Args:
            pixel_values: ``(N, 3, S, S)`` normalised with ``config.image_mean/std`` (see ``EarthGPTProcessor``).

        Returns:
            ``(N, config.num_image_tokens, text hidden size)``.

        Raises:
            ValueError: on a wrong shape, channel count or image size.
        """
        self._check_pixels(pixel_values)
        cfg = self.config
        pixel_values = pixel_values.to(self.vision_tower.dtype)
        n, g = pixel_values.shape[0], cfg.grid_size
        # frozen encoders: no graph through them (saves the activations of two large towers during training)
        with torch.set_grad_enabled(self._encoders_need_grad()):
            states = self.get_vit_hidden_states(pixel_values)
            if cfg.vit_layer_norm:
                states = [self.vision_tower.layernorm(s) for s in states]
            vit = torch.cat([s[:, -g * g :, :] for s in states], dim=-1)  # drop CLS (and register tokens)
            cnn_maps = None
            if self.cnn_tower is not None:
                x = pixel_values.to(self.cnn_tower.dtype)
                cnn_out = self.cnn_tower(pixel_values=x, output_hidden_states=True, return_dict=True)
                cnn_maps = list(cnn_out.hidden_states[-len(cfg.cnn_config.hidden_sizes) :])
        grid = vit.transpose(1, 2).reshape(n, -1, g, g)
        if cnn_maps is not None and self.fusion is not None:
            fused = self.fusion([m.to(self.fusion.smooth.weight.dtype) for m in cnn_maps], g)
            grid = torch.cat([grid, fused.to(grid.dtype)], dim=1)
        if cfg.pool == "2x2":
            grid = F.avg_pool2d(grid, kernel_size=2)
        tokens = grid.flatten(2).transpose(1, 2)
        return self.multi_modal_projector(tokens.to(self.multi_modal_projector.linear_1.weight.dtype))

    # ----------------------------------------------------------------------------------------------------------------
    # Text + images

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_index: torch.Tensor | Sequence[int] | None = None,
        image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the visual tokens spliced in at the ``<image>`` positions.

        Args:
            input_ids: ``(B, L)``; each row holds ``config.num_image_tokens`` image tokens, or none (text only).
            pixel_values: ``(N, 3, S, S)`` images, or ``None``.
            image_index: ``(B,)`` index into the images for each row; default ``arange(B)`` (needs ``N == B``).
            image_features: Precomputed ``get_image_features`` output ``(N, T, D)``, instead of ``pixel_values``.

        Returns:
            ``(inputs_embeds (B, L, D), image_features or None)``.

        Raises:
            ValueError: when a row's number of image tokens differs from ``config.num_image_tokens``, images are
                given without image tokens (or the reverse), or ``image_index`` does not fit.
        """
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        per_row = is_image.sum(dim=1)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is None:
            if bool(per_row.any()):
                raise ValueError(
                    "input_ids contain image tokens but no pixel_values / image_features were given"
                )
            return embeds, None
        n_images, t = image_features.shape[0], image_features.shape[1]
        if t != self.config.num_image_tokens:
            raise ValueError(
                f"image_features have {t} tokens per image, config says {self.config.num_image_tokens}"
            )
        bad = (per_row != t).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"rows {bad[:8]} hold {per_row[bad[0]].item()} image tokens, expected {t} per row "
                f"(config.num_image_tokens): build inputs with EarthGPTProcessor"
            )
        if image_index is None:
            if n_images != input_ids.shape[0]:
                raise ValueError(
                    f"{n_images} images for {input_ids.shape[0]} rows: pass image_index to map rows"
                )
            index = torch.arange(n_images, device=input_ids.device)
        else:
            index = torch.as_tensor(image_index, device=input_ids.device, dtype=torch.long)
            if (
                index.shape != (input_ids.shape[0],)
                or bool((index < 0).any())
                or bool((index >= n_images).any())
            ):
                raise ValueError(
                    f"image_index must be ({input_ids.shape[0]},) with values in [0, {n_images})"
                )
        rows = image_features.to(embeds.dtype)[index]  # (B, T, D)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), rows.reshape(-1, rows.shape[-1]))
        return embeds, image_features

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_index: torch.Tensor | Sequence[int] | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> EarthGPTOutput:
        """Runs the model on a batch of (image, text) rows.

        Args:
            pixel_values: ``(N, 3, S, S)`` images normalised by ``EarthGPTProcessor``; ``None`` for text only.
            input_ids: ``(B, L)`` token ids with ``config.num_image_tokens`` ``<image>`` tokens per row.
            attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding (left or right).
            labels: ``(B, L)`` target ids aligned with ``input_ids`` (the loss shifts them), -100 where no loss is
                wanted: everything but the answer tokens.
            image_index: ``(B,)`` image of each row (several rows may share one image); default one image per row.
            image_features: Precomputed visual tokens instead of ``pixel_values``.
            position_ids: ``(B, L)``; default ``cumsum(attention_mask) - 1`` (correct for left padding).
            cache: KV cache to extend (``past_key_values=`` is accepted too).
            use_cache: Build and return the KV cache (default: no).
            **kwargs: ``past_key_values``; anything else is ignored (trainer extras such as ``num_items_in_batch``).

        Returns:
            :class:`EarthGPTOutput` with ``loss`` (when ``labels``), ``logits``, ``past_key_values``,
            ``image_features``.
        """
        if input_ids is None:
            raise ValueError("input_ids are required")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is None:
            cache = kwargs.get("past_key_values")
        embeds, feats = self.embed_inputs(input_ids, pixel_values, image_index, image_features)
        if position_ids is None and cache is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=bool(use_cache),  # no cache unless asked: training and scoring need none
            return_dict=True,
            **{_CACHE_KW: cache},
        )
        logits = self.language_model.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return EarthGPTOutput(
            loss=loss, logits=logits, cache=_cache_of(out) if use_cache else None, image_features=feats
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_index: torch.Tensor | Sequence[int] | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> EarthGPTGenerateOutput:
        """Batched generation with a KV cache; prompts must be LEFT-padded.

        Args:
            input_ids: ``(B, L)`` prompts (left-padded), ``<image>`` tokens included.
            attention_mask: ``(B, L)``; default all ones.
            pixel_values: ``(N, 3, S, S)`` images, encoded once each.
            image_index: ``(B,)`` image of each prompt (several prompts may share an image).
            image_features: Precomputed visual tokens instead of ``pixel_values``.
            max_new_tokens: Generation budget per row.
            do_sample: Sample (``temperature``, ``top_k``, ``top_p``) instead of greedy argmax.
            temperature: Sampling temperature (> 0); the reported log-probabilities are always at temperature 1.
            top_k: Keep the k most likely tokens when sampling (0: all).
            top_p: Nucleus sampling mass (1: all).
            stop_token_ids: A row stops after emitting any of these; default ``text_config.eos_token_id``.
            pad_token_id: Filler after a row stopped; default ``text_config.pad_token_id`` or 0.
            generator: Random generator for reproducible sampling.
            **kwargs: Ignored.

        Returns:
            :class:`EarthGPTGenerateOutput`.
        """
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        text_cfg = self.config.text_config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape[1] and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate needs LEFT-padded prompts (a row ends with padding)")
        stops = _as_id_list(stop_token_ids if stop_token_ids is not None else text_cfg.eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (text_cfg.pad_token_id or 0)
        from transformers import DynamicCache

        cache = DynamicCache()
        embeds, _ = self.embed_inputs(input_ids, pixel_values, image_index, image_features)
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{_CACHE_KW: cache},
        )
        cache = _cache_of(out)
        # a 3-D input: DeepSpeed's tensor-parallel LM head slices the last dimension of (B, L, D)
        logits = self.language_model.lm_head(out.last_hidden_state[:, -1:, :])[:, 0].float()
        b = input_ids.shape[0]
        device = input_ids.device
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        stop_tensor = torch.tensor(stops, device=device, dtype=torch.long)
        tokens, logprobs = [], []
        n_tokens = torch.zeros(b, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1)
            if do_sample:
                next_token = _sample(logits / temperature, top_k, top_p, generator)
            else:
                next_token = logits.argmax(dim=-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            token_logp = logp.gather(-1, next_token[:, None]).squeeze(-1)
            token_logp = torch.where(finished, torch.zeros_like(token_logp), token_logp)
            tokens.append(next_token)
            logprobs.append(token_logp)
            n_tokens += (~finished).long()
            finished = finished | torch.isin(next_token, stop_tensor)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.language_model.model(
                input_ids=next_token[:, None],
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                **{_CACHE_KW: cache},
            )
            cache = _cache_of(out)
            logits = self.language_model.lm_head(out.last_hidden_state[:, -1:, :])[:, 0].float()
        if tokens:
            sequences = torch.stack(tokens, dim=1)
            token_logprobs = torch.stack(logprobs, dim=1)
        else:
            sequences = torch.empty(b, 0, dtype=torch.long, device=device)
            token_logprobs = torch.empty(b, 0, device=device)
        mean = token_logprobs.sum(dim=1) / n_tokens.clamp(min=1)
        return EarthGPTGenerateOutput(
            sequences=sequences, token_logprobs=token_logprobs, mean_logprob=mean, n_tokens=n_tokens
        )

    def new_static_cache(self, slots: int, max_len: int) -> StaticKVCache:
        """A :class:`StaticKVCache` for this model's decoder (on its device, in its dtype).

        Key/value heads are read from the ``k_proj`` weights, so a tensor-parallel rank gets its own share.
        """
        decoder = self.language_model.model
        attn = decoder.layers[0].self_attn
        head_dim = int(attn.head_dim)
        weight = attn.k_proj.weight
        cache = StaticKVCache(
            len(decoder.layers), slots, int(weight.shape[0]) // head_dim, max_len, head_dim,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        # one table for every position: the rotary module's own numbers, computed once instead of at every step
        positions = torch.arange(max_len, device=weight.device)[None]
        cos, sin = decoder.rotary_emb(torch.empty(0, device=weight.device, dtype=weight.dtype), positions)
        cache.rope = (cos[0], sin[0])
        half = int(sin.shape[-1]) // 2
        cache.rope_sin_signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return cache

    @torch.no_grad()
    def fused_projections(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per decoder layer, the q/k/v weights stacked and the gate/up weights stacked (copies), for
        :meth:`forward_cached`: two matmuls where there were five, the same numbers.

        Returns:
            ``[(qkv_weight, gate_up_weight), ...]``, or ``None`` when a projection is not a bias-free ``nn.Linear``
            without hooks (stage-3 shift parameters, DeepSpeed's tensor-parallel layers): those need their modules.
        """
        out = []
        for layer in self.language_model.model.layers:
            linears = _fused_linears(layer)
            if any(type(m) is not nn.Linear or m.bias is not None or m._forward_hooks or m._forward_pre_hooks
                   for m in linears):  # fmt: skip
                return None
            q, k, v, gate, up = linears
            out.append((torch.cat([q.weight, k.weight, v.weight]), torch.cat([gate.weight, up.weight])))
        return out

    def fused_projections_nbytes(self) -> int:
        """Bytes the stacked copies of :meth:`fused_projections` would take (read from the weights, nothing made)."""
        weights = [getattr(m, "weight", None) for layer in self.language_model.model.layers for m in _fused_linears(layer)]
        return sum(w.numel() * w.element_size() for w in weights if isinstance(w, torch.Tensor))

    @torch.no_grad()
    def forward_cached(
        self,
        inputs_embeds: torch.Tensor,
        cache: StaticKVCache,
        rows: int | torch.Tensor,
        start: torch.Tensor,
        last: torch.Tensor | None,
        span: int,
        projections: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor | None:
        """Runs the decoder on one chunk per row against a static KV cache (prefill and decode alike).

        Row ``b``'s chunk token ``i`` sits at position ``start[b] + i``, its key and value are written there, and it
        attends to positions ``0 .. start[b] + i`` of its slot. Rows are RIGHT-padded: what padding writes lies past
        the row's length and is overwritten before anything attends to it.

        Args:
            inputs_embeds: ``(B, C, D)`` chunk embeddings (``embed_inputs`` output for chunks holding the image).
            cache: The cache (:meth:`new_static_cache`).
            rows: ``B`` for slots ``0 .. B-1``, or ``(B,)`` slot indices.
            start: ``(B,)`` position of each row's first chunk token.
            last: ``(B,)`` index in the chunk of each row's last real token, or ``None`` for no logits.
            span: Keys attended: ``max(start) + C`` or more.
            projections: :meth:`fused_projections` output: one matmul for q/k/v and one for gate/up per layer
                (the same numbers as the separate layers).

        Returns:
            ``(B, V)`` float32 next-token logits at ``last``, or ``None``.
        """
        decoder = self.language_model.model
        b, c = inputs_embeds.shape[0], inputs_embeds.shape[1]
        positions = start[:, None] + torch.arange(c, device=start.device)
        cache.bind(rows, positions, span)
        # a chunk that starts every row (a prefix) attends only to itself: plain causal attention, nothing read back
        fresh = c > 1 and span == c and not bool(start.any())
        keys = torch.arange(span, device=start.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, C, span): causal per row
        assert cache.rope is not None and cache.rope_sin_signed is not None
        # (B, C, 1, D); a decode step's positions are one per row: plain row gathers
        cos, sin = cache.rope[0][positions][:, :, None], cache.rope_sin_signed[positions][:, :, None]
        hidden = inputs_embeds
        # the decoder layers' own submodules, called directly: the same arithmetic as LlamaDecoderLayer (whose
        # wrappers cost more than the arithmetic at small sizes), and still their hooks (stage-3 shift parameters) and
        # DeepSpeed's tensor-parallel replacements of the linear layers
        for layer_idx, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = attn.head_dim
            fused = projections[layer_idx] if projections is not None else None
            normed = _rms_norm(layer.input_layernorm, hidden, fused is not None)
            if fused is not None:
                qkv = F.linear(normed, fused[0]).view(b, c, -1, head_dim)  # (B, C, heads + 2 kv_heads, D)
                kv_heads = attn.k_proj.out_features // head_dim
                n_q = qkv.shape[2] - 2 * kv_heads
                qk = _rotate(qkv[:, :, : n_q + kv_heads], cos, sin)  # queries and keys rotated at once
                q, k, v = qk[:, :, :n_q], qk[:, :, n_q:], qkv[:, :, n_q + kv_heads :]
            else:
                q = _rotate(attn.q_proj(normed).view(b, c, -1, head_dim), cos, sin)
                k = _rotate(attn.k_proj(normed).view(b, c, -1, head_dim), cos, sin)
                v = attn.v_proj(normed).view(b, c, -1, head_dim)
            q = q.transpose(1, 2)
            if fresh:
                cache.write(k, v, layer_idx)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            else:
                k, v = cache.update(k, v, layer_idx)
            groups = q.shape[1] // k.shape[1]
            if groups > 1 and c == 1:
                # grouped-query decode: a group's queries attend their shared head together
                out = F.scaled_dot_product_attention(
                    q.reshape(b, k.shape[1], groups, head_dim), k, v, attn_mask=mask, scale=attn.scaling
                ).reshape(b, -1, 1, head_dim)
            else:
                if groups > 1:
                    k = k.repeat_interleave(groups, dim=1)
                    v = v.repeat_interleave(groups, dim=1)
                if fresh:  # right padding only follows the real tokens: causal is the whole mask
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + _linear(attn.o_proj, out.transpose(1, 2).reshape(b, c, -1))
            normed = _rms_norm(layer.post_attention_layernorm, hidden, fused is not None)
            if fused is not None:
                gate, up = F.linear(normed, fused[1]).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
            act = F.silu(gate) if type(mlp.act_fn) is nn.SiLU or _is_hf_silu(mlp.act_fn) else mlp.act_fn(gate)
            hidden = hidden + _linear(mlp.down_proj, act * up)
        if last is None:
            return None
        hidden = hidden[:, 0] if c == 1 else hidden[torch.arange(b, device=hidden.device), last]
        hidden = _rms_norm(decoder.norm, hidden, projections is not None)
        # (B, 1, D): DeepSpeed's tensor-parallel LM head slices a 3-D input
        return _linear(self.language_model.lm_head, hidden[:, None])[:, 0].float()


def _rms_norm(norm: nn.Module, x: torch.Tensor, plain: bool) -> torch.Tensor:
    """``norm(x)``; one fused op for a hook-free float32 LLaMA RMSNorm (bit-identical there, fewer dispatches)."""
    eps = getattr(norm, "variance_epsilon", None)
    weight = getattr(norm, "weight", None)
    usable = plain and not norm._forward_hooks and isinstance(weight, torch.Tensor)
    if usable and eps is not None and x.dtype == torch.float32:
        assert isinstance(weight, torch.Tensor)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return norm(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding, ``x * cos + rotate_half(x) * sin`` (transformers' ``apply_rotary_pos_emb``), bit for
    bit: ``rotate_half(x) = cat(-x2, x1)`` times ``sin`` equals the halves swapped times ``sin`` with its first half
    negated (a sign flip rounds the same), in fewer ops."""
    shape = x.shape
    swapped = x.reshape(*shape[:-1], 2, shape[-1] // 2).flip(-2).reshape(shape)
    return x * cos + swapped * sin_signed


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; ``F.linear`` directly for a hook-free, bias-free ``nn.Linear`` (no module-call overhead)."""
    if (
        type(module) is nn.Linear
        and module.bias is None
        and not module._forward_hooks
        and not module._forward_pre_hooks
    ):
        return F.linear(x, module.weight)
    return module(x)


def _is_hf_silu(act: nn.Module) -> bool:
    return type(act).__name__ == "SiLUActivation" and not act._forward_hooks


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose (shifted) label is not -100, computed in float32.

    Args:
        logits: ``(B, L, V)``.
        labels: ``(B, L)`` aligned with the inputs; position ``t`` predicts ``labels[t + 1]``.

    Returns:
        Scalar loss; 0 (with a graph) when no position has a label.
    """
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    keep = shift_labels != IGNORE_INDEX
    if not bool(keep.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(shift_logits[keep].float(), shift_labels[keep])


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _sample(
    logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _register_auto_classes() -> None:
    """Registers EarthGPT with ``AutoConfig``, ``AutoModel`` and the image-text-to-text Auto class."""
    with contextlib.suppress(ValueError):  # already registered (module reloaded)
        AutoConfig.register(EarthGPTConfig.model_type, EarthGPTConfig)
    import transformers

    for name in ("AutoModel", "AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        with contextlib.suppress(ValueError):
            auto.register(EarthGPTConfig, EarthGPTForConditionalGeneration)


_register_auto_classes()

__all__ = [
    "IGNORE_INDEX",
    "EarthGPTConfig",
    "EarthGPTForConditionalGeneration",
    "EarthGPTOutput",
    "EarthGPTGenerateOutput",
    "EarthGPTPreTrainedModel",
    "EarthGPTProjector",
    "EarthGPTCNNFusion",
    "ShiftParameters",
    "StaticKVCache",
    "causal_lm_loss",
]


def _fused_linears(layer: Any) -> tuple[Any, ...]:
    """A decoder layer's q/k/v and gate/up projections: what :meth:`fused_projections` stacks."""
    attn, mlp = layer.self_attn, layer.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
