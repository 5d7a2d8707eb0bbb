"""End to end on one example: answer-only loss trains the model to say the answer, which greedy decoding recovers
through the KV cache and the parser turns back into the box."""

from __future__ import annotations

import pytest
import torch

from earthgpt.boxes import Box
from earthgpt.conversation import render_turns
from earthgpt.engine import InferenceEngine
from earthgpt.presets import build_model, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor
from earthgpt.tasks import build_prompt, format_answer, parse_answer

from .conftest import random_tiles


@pytest.mark.slow  # ~4 s on an idle 2-core box, much more when shared
def test_overfit_one_detection_example() -> None:
    torch.manual_seed(0)
    config = earthgpt_tiny(freeze_encoders=False)
    model = build_model(config, seed=0).train()
    processor = EarthGPTProcessor.from_config(config)
    tile = random_tiles(1, seed=9, shapes=((32, 48),))[0]
    question = build_prompt("detect", "sar")
    answer = format_answer("detect", [Box("ship", 4.8, 0.0, 14.4, 9.6)], (32, 48))
    ids, labels = processor.encode_turns(render_turns([("human", question), ("gpt", answer)]))
    batch = {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "pixel_values": processor.preprocess_images([tile])[0],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    out = InferenceEngine(model, processor, device="cpu").generate([tile], [question], max_new_tokens=40)[0]
    assert out.text == answer
    assert out.mean_logprob > -0.1
    parsed = parse_answer("detect", out.text, (32, 48))
    assert parsed.counts == {"ship": 1} and parsed.n_malformed == 0
    (box,) = parsed.boxes
    assert abs(box.x1 - 4.8) < 0.3 and abs(box.y2 - 9.6) < 0.3
