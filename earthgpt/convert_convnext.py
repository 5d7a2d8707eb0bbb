"""Convert a CLIP ConvNeXt image tower (open_clip / timm layout) into a Hugging Face ``ConvNextModel`` folder.

EarthGPT's CNN branch is CLIP ConvNeXt-L. Its weights are published by open_clip (e.g. the LAION
``CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup`` checkpoint, file ``open_clip_pytorch_model.bin``) with the
image trunk stored as a timm ``convnext_large`` under the prefix ``visual.trunk.``. The conversion is a key rename plus
two small reshapes; the text tower and the CLIP projection head (``visual.head.*``) are not part of the trunk and are
left out:

=========================================  =================================================
timm / open_clip (``visual.trunk.`` + ...)  Hugging Face ``ConvNextModel``
=========================================  =================================================
``stem.0`` (4x4 conv) / ``stem.1`` (LN)     ``embeddings.patch_embeddings`` / ``embeddings.layernorm``
``stages.i.downsample.0`` / ``.1``          ``encoder.stages.i.downsampling_layer.0`` / ``.1``
``stages.i.blocks.j.conv_dw``               ``encoder.stages.i.layers.j.dwconv``
``stages.i.blocks.j.norm``                  ``encoder.stages.i.layers.j.layernorm``
``stages.i.blocks.j.mlp.fc1`` / ``fc2``     ``encoder.stages.i.layers.j.pwconv1`` / ``pwconv2`` (1x1 convs flattened)
``stages.i.blocks.j.gamma``                 ``encoder.stages.i.layers.j.layer_scale_parameter``
``head.norm``                               ``layernorm`` (final norm; EarthGPT does not use it)
=========================================  =================================================

The architecture (stage widths, depths, stem patch) is read from the tensor shapes. Usage::

    python -m earthgpt.convert_convnext open_clip_pytorch_model.bin convnext-large-clip-hf/
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel

_STEM_KEY = "stem.0.weight"
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^stem\.0\.(weight|bias)$"), r"embeddings.patch_embeddings.\1"),
    (re.compile(r"^stem\.1\.(weight|bias)$"), r"embeddings.layernorm.\1"),
    (
        re.compile(r"^stages\.(\d+)\.downsample\.([01])\.(weight|bias)$"),
        r"encoder.stages.\1.downsampling_layer.\2.\3",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(weight|bias)$"),
        r"encoder.stages.\1.layers.\2.dwconv.\3",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.(weight|bias)$"),
        r"encoder.stages.\1.layers.\2.layernorm.\3",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"),
        r"encoder.stages.\1.layers.\2.pwconv1.\3",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"),
        r"encoder.stages.\1.layers.\2.pwconv2.\3",
    ),
    (
        re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$"),
        r"encoder.stages.\1.layers.\2.layer_scale_parameter",
    ),
    (re.compile(r"^head\.norm\.(weight|bias)$"), r"layernorm.\1"),
]


def find_trunk_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The key prefix of the ConvNeXt trunk (``"visual.trunk."`` in open_clip files, ``""`` for a bare timm model).

    Raises:
        KeyError: when no ``stem.0.weight`` key exists.
    """
    candidates = sorted((k[: -len(_STEM_KEY)] for k in state_dict if k.endswith(_STEM_KEY)), key=len)
    if not candidates:
        raise KeyError("no ConvNeXt stem ('...stem.0.weight') in the state dict")
    return candidates[0]


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], ConvNextConfig, list[str]]:
    """Renames a timm/open_clip ConvNeXt state dict into the Hugging Face ``ConvNextModel`` layout.

    Args:
        state_dict: The checkpoint's tensors (a whole open_clip model is fine).
        prefix: Trunk key prefix; found with :func:`find_trunk_prefix` when ``None``.

    Returns:
        ``(hf_state_dict, config, skipped)``: the renamed tensors, the ``ConvNextConfig`` read from their shapes, and
        the trunk keys that have no counterpart (reported, not converted).

    Raises:
        KeyError: when the trunk is not found.
        ValueError: when the stages are not numbered 0..n-1 or blocks are missing.
    """
    prefix = find_trunk_prefix(state_dict) if prefix is None else prefix
    converted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        local = key[len(prefix) :]
        for pattern, target in _RULES:
            if pattern.match(local):
                new_key = pattern.sub(target, local)
                if ".pwconv" in new_key and new_key.endswith("weight") and tensor.dim() == 4:
                    tensor = tensor.flatten(1)  # conv_mlp variants store the MLP as 1x1 convs
                converted[new_key] = tensor.detach().clone()
                break
        else:
            skipped.append(key)
    stage_dims: dict[int, int] = {}
    stage_depths: dict[int, int] = {}
    for key, tensor in converted.items():
        m = re.match(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.weight", key)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            stage_dims[i] = int(tensor.shape[0])
            stage_depths[i] = max(stage_depths.get(i, 0), j + 1)
    n_stages = len(stage_dims)
    if sorted(stage_dims) != list(range(n_stages)) or n_stages == 0:
        raise ValueError(f"ConvNeXt stages must be numbered 0..n-1, found {sorted(stage_dims)}")
    for i in range(n_stages):
        for j in range(stage_depths[i]):
            if f"encoder.stages.{i}.layers.{j}.dwconv.weight" not in converted:
                raise ValueError(f"stage {i} misses block {j}")
    stem = converted["embeddings.patch_embeddings.weight"]
    config = ConvNextConfig(
        num_channels=int(stem.shape[1]),
        patch_size=int(stem.shape[-1]),
        num_stages=n_stages,
        hidden_sizes=[stage_dims[i] for i in range(n_stages)],
        depths=[stage_depths[i] for i in range(n_stages)],
        drop_path_rate=0.0,
        layer_norm_eps=1e-6,
    )
    return converted, config, skipped


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads ``.safetensors`` or a PyTorch pickle (``weights_only``); unwraps ``{"state_dict": ...}``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    data = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    return {k.removeprefix("module."): v for k, v in data.items()}


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> ConvNextModel:
    """Converts an open_clip / timm ConvNeXt checkpoint file into a Hugging Face ``ConvNextModel`` folder.

    Args:
        checkpoint: ``open_clip_pytorch_model.bin`` (or ``.safetensors``, or a timm ConvNeXt checkpoint).
        out_dir: Folder to write (``config.json`` + ``model.safetensors``); pass it as ``cnn_dir`` to
            ``earthgpt.presets.from_backbones``.

    Returns:
        The loaded ``ConvNextModel``.

    Raises:
        RuntimeError: when the converted tensors do not fill the model exactly (missing or unexpected keys).
    """
    state, config, _ = convert_state_dict(load_checkpoint(checkpoint))
    model = ConvNextModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the final LayerNorm is absent from checkpoints whose head was dropped; it is unused by EarthGPT
    missing = [k for k in missing if not k.startswith("layernorm.")]
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(str(out_dir))
    return model


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m earthgpt.convert_convnext CHECKPOINT OUT_DIR``."""
    parser = argparse.ArgumentParser(
        description="Convert a CLIP ConvNeXt (open_clip/timm) to a HF ConvNextModel."
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    model = convert_checkpoint(args.checkpoint, args.out_dir)
    cfg = model.config
    print(f"wrote {args.out_dir}: hidden_sizes={cfg.hidden_sizes} depths={cfg.depths} patch={cfg.patch_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
