"""Shared fixtures of the model tests: the tiny preset, seeded, built once per module."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from earthgpt.modeling import EarthGPTConfig, EarthGPTForConditionalGeneration  # noqa: E402
from earthgpt.presets import build_model, earthgpt_tiny  # noqa: E402
from earthgpt.processor import EarthGPTProcessor  # noqa: E402


@pytest.fixture(scope="module")
def tiny_config() -> EarthGPTConfig:
    return earthgpt_tiny()


@pytest.fixture(scope="module")
def tiny_model(tiny_config: EarthGPTConfig) -> EarthGPTForConditionalGeneration:
    """Random-weight tiny model; tests must not modify it (copy.deepcopy first)."""
    return build_model(tiny_config, seed=0)


@pytest.fixture(scope="module")
def processor(tiny_config: EarthGPTConfig) -> EarthGPTProcessor:
    return EarthGPTProcessor.from_config(tiny_config)


def random_tiles(
    n: int, seed: int = 0, shapes: tuple[tuple[int, int], ...] = ((32, 32),)
) -> list[torch.Tensor]:
    """``n`` float tiles ``(3, H, W)`` in [0, 1], cycling through ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, *shapes[i % len(shapes)], generator=g) for i in range(n)]
