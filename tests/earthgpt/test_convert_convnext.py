"""CLIP ConvNeXt (open_clip / timm layout) -> HF ConvNextModel, checked against a functional timm-style forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import ConvNextModel

from earthgpt.convert_convnext import convert_state_dict, find_trunk_prefix, main

DIMS = [8, 16, 24, 32]
DEPTHS = [2, 1, 3, 1]


def synthetic_open_clip_state_dict(seed: int = 0, conv_mlp: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors in the key layout and shapes of an open_clip ConvNeXt checkpoint (timm trunk + extras)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "stem.0.weight": r(DIMS[0], 3, 4, 4), "stem.0.bias": r(DIMS[0]),
        "stem.1.weight": 1 + r(DIMS[0]), "stem.1.bias": r(DIMS[0]),
    }  # fmt: skip
    for i, (d, n) in enumerate(zip(DIMS, DEPTHS, strict=True)):
        if i > 0:
            p = DIMS[i - 1]
            sd |= {
                f"stages.{i}.downsample.0.weight": 1 + r(p), f"stages.{i}.downsample.0.bias": r(p),
                f"stages.{i}.downsample.1.weight": r(d, p, 2, 2), f"stages.{i}.downsample.1.bias": r(d),
            }  # fmt: skip
        for j in range(n):
            b = f"stages.{i}.blocks.{j}."
            fc1, fc2 = r(4 * d, d), r(d, 4 * d)
            if conv_mlp:
                fc1, fc2 = fc1[:, :, None, None], fc2[:, :, None, None]
            sd |= {
                b + "conv_dw.weight": r(d, 1, 7, 7), b + "conv_dw.bias": r(d),
                b + "norm.weight": 1 + r(d), b + "norm.bias": r(d),
                b + "mlp.fc1.weight": fc1, b + "mlp.fc1.bias": r(4 * d),
                b + "mlp.fc2.weight": fc2, b + "mlp.fc2.bias": r(d),
                b + "gamma": 1 + r(d),
            }  # fmt: skip
    sd |= {"head.norm.weight": 1 + r(DIMS[-1]), "head.norm.bias": r(DIMS[-1])}
    full = {f"visual.trunk.{k}": v for k, v in sd.items()}
    # parts of an open_clip file that are not the trunk
    full |= {"visual.head.mlp.fc1.weight": r(64, DIMS[-1]), "text.token_embedding.weight": r(10, 8),
             "logit_scale": torch.tensor(4.6)}  # fmt: skip
    return full


def timm_convnext_stages(sd: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """timm's ConvNeXt forward (LayerNorm2d stem/downsample, dwconv 7x7, LN, MLP, layer scale, residual)."""

    def ln_channels(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), w, b, 1e-6).permute(0, 3, 1, 2)

    p = "visual.trunk."
    x = F.conv2d(x, sd[p + "stem.0.weight"], sd[p + "stem.0.bias"], stride=4)
    x = ln_channels(x, sd[p + "stem.1.weight"], sd[p + "stem.1.bias"])
    outs = []
    for i, n in enumerate(DEPTHS):
        s = f"{p}stages.{i}."
        if i > 0:
            x = ln_channels(x, sd[s + "downsample.0.weight"], sd[s + "downsample.0.bias"])
            x = F.conv2d(x, sd[s + "downsample.1.weight"], sd[s + "downsample.1.bias"], stride=2)
        for j in range(n):
            b = f"{s}blocks.{j}."
            y = F.conv2d(x, sd[b + "conv_dw.weight"], sd[b + "conv_dw.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(
                y.permute(0, 2, 3, 1), (x.shape[1],), sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6
            )
            y = F.linear(y, sd[b + "mlp.fc1.weight"].flatten(1), sd[b + "mlp.fc1.bias"])
            y = F.linear(F.gelu(y), sd[b + "mlp.fc2.weight"].flatten(1), sd[b + "mlp.fc2.bias"])
            x = x + (y * sd[b + "gamma"]).permute(0, 3, 1, 2)
        outs.append(x)
    return outs


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_converted_model_matches_timm_forward(conv_mlp: bool) -> None:
    sd = synthetic_open_clip_state_dict(conv_mlp=conv_mlp)
    assert find_trunk_prefix(sd) == "visual.trunk."
    hf_sd, config, skipped = convert_state_dict(sd)
    assert config.hidden_sizes == DIMS and config.depths == DEPTHS and config.patch_size == 4
    assert skipped == []  # only trunk keys are considered; the head and text tower are outside the prefix
    model = ConvNextModel(config).eval()
    model.load_state_dict(hf_sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixel_values=x, output_hidden_states=True).hidden_states[1:]
    theirs = timm_convnext_stages(sd, x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_command_line_writes_a_loadable_folder(tmp_path: Path) -> None:
    sd = synthetic_open_clip_state_dict(seed=3)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "open_clip_model.safetensors"))
    assert main([str(tmp_path / "open_clip_model.safetensors"), str(tmp_path / "hf")]) == 0
    loaded = ConvNextModel.from_pretrained(str(tmp_path / "hf"))
    torch.testing.assert_close(loaded.state_dict()["layernorm.weight"], sd["visual.trunk.head.norm.weight"])
    # a .bin with a "state_dict" wrapper and DDP "module." prefixes works too
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.bin")
    assert main([str(tmp_path / "ckpt.bin"), str(tmp_path / "hf2")]) == 0


def test_missing_trunk_is_reported() -> None:
    with pytest.raises(KeyError, match="stem"):
        convert_state_dict({"text.weight": torch.zeros(1)})
