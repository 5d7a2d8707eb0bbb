"""The processor: image layouts, centre padding, prompt rows, left padding, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earthgpt.boxes import PadInfo
from earthgpt.conversation import render_answer, render_prompt, render_turns
from earthgpt.processor import EarthGPTProcessor


def _unnormalise(processor: EarthGPTProcessor, pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    return pixels * std + mean


def test_float_chw_uint8_hwc_and_pil_agree(processor: EarthGPTProcessor) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    chw = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0
    a, _ = processor.preprocess_images([chw])
    b, _ = processor.preprocess_images([rgb])
    c, _ = processor.preprocess_images([Image.fromarray(rgb)])
    d, _ = processor.preprocess_images(torch.from_numpy(chw))
    assert a.shape == (1, 3, 32, 32)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)
    torch.testing.assert_close(_unnormalise(processor, a[0]), torch.from_numpy(chw), atol=1e-5, rtol=0)


def test_centre_padding_keeps_offsets(processor: EarthGPTProcessor) -> None:
    # a 16 x 32 (h x w) white tile padded to 32 x 32: 8 black rows above and below; already the model size
    pixels, pads = processor.preprocess_images([np.ones((3, 16, 32), dtype=np.float32)])
    assert pads == [PadInfo(height=16, width=32, side=32, top=8, left=0)]
    raw = _unnormalise(processor, pixels[0])
    assert torch.allclose(raw[:, :8], torch.zeros(1), atol=1e-5)
    assert torch.allclose(raw[:, 8:24], torch.ones(1), atol=1e-5)
    assert torch.allclose(raw[:, 24:], torch.zeros(1), atol=1e-5)
    # larger tiles are resized after padding; NaN (nodata) becomes padding
    tile = np.full((3, 64, 40), np.nan, dtype=np.float32)
    pixels, pads = processor.preprocess_images([tile])
    assert pixels.shape == (1, 3, 32, 32) and pads[0] == PadInfo(64, 40, 64, 0, 12)
    assert torch.isfinite(pixels).all()


@pytest.mark.parametrize("shape", [(4, 32, 32), (32, 32), (32, 32, 4), (1, 3, 32, 32)])
def test_wrong_channels_or_rank_raise(processor: EarthGPTProcessor, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="channels|shape"):
        processor.preprocess_images([np.zeros(shape, dtype=np.float32)])


def test_build_inputs_left_pads_and_shares_images(processor: EarthGPTProcessor) -> None:
    images = [np.random.rand(3, 32, 48).astype(np.float32)]
    prompts = ["What is the category of this SAR image?", "Describe this image in one sentence, please."]
    batch = processor.build_inputs(images, prompts, image_index=[0, 0])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["image_index"].tolist() == [0, 0]
    assert mask[:, -1].all() and not mask[0, 0]  # left padding: the shorter row starts with padding
    for row in range(2):
        real = ids[row][mask[row].bool()].tolist()
        assert real[:2] == [processor.bos_token_id, processor.image_start_token_id]
        assert real.count(processor.image_token_id) == processor.num_image_tokens
        text = processor.tokenizer.decode(real[3 + processor.num_image_tokens :])
        assert text == render_prompt(prompts[row])
    with pytest.raises(ValueError, match="image_index"):
        processor.build_inputs(images, prompts)


def test_encode_turns_labels_only_answers(processor: EarthGPTProcessor) -> None:
    turns = render_turns([("human", "<image>\nWhat is it?"), ("gpt", "harbor")])
    ids, labels = processor.encode_turns(turns)
    assert len(ids) == len(labels)
    answer = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    assert processor.tokenizer.decode(answer[:-1]) == render_answer("harbor")
    assert answer[-1] == processor.eos_token_id
    assert ids[: len(processor.image_prefix_ids())] == processor.image_prefix_ids()


def test_save_and_load(processor: EarthGPTProcessor, tmp_path: Path) -> None:
    processor.save_pretrained(tmp_path)
    loaded = EarthGPTProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.encode_prompt("Describe.") == processor.encode_prompt("Describe.")
    assert loaded.stop_token_ids == processor.stop_token_ids == [2, processor.tokenize("###")[0]]
