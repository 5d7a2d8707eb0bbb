"""The model: shapes, errors, loss masking, shared images, generation, persistence, parity with plain HF models."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, ConvNextModel, Dinov2Model, LlamaForCausalLM

from earthgpt.modeling import EarthGPTConfig, EarthGPTForConditionalGeneration
from earthgpt.presets import build_model, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor

from .conftest import random_tiles

PROMPTS = ["Describe this image.", "What is the category of this SAR image? Answer briefly.", "Count ships."]


@pytest.fixture(scope="module")
def peaky() -> tuple[EarthGPTForConditionalGeneration, EarthGPTProcessor]:
    """A tiny model with large LLM weights: peaked, diverse next-token distributions (greedy ties impossible)."""
    config = earthgpt_tiny(text_config={"initializer_range": 0.5})
    return build_model(config, seed=0), EarthGPTProcessor.from_config(config)


def _batch(processor: EarthGPTProcessor, n: int = 2, seed: int = 0) -> dict:
    batch = processor.build_inputs(random_tiles(n, seed), PROMPTS[:n])
    batch.pop("pad_info")
    return batch


def test_forward_shapes_and_speed(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    batch = _batch(processor)
    with torch.no_grad():
        tiny_model(**batch)  # warm-up
        start = time.perf_counter()
        out = tiny_model(**batch)
        elapsed = time.perf_counter() - start
    assert elapsed < 1.0
    cfg = tiny_model.config
    assert out.logits.shape == (*batch["input_ids"].shape, cfg.text_config.vocab_size)
    assert out.image_features is not None
    assert out.image_features.shape == (2, cfg.num_image_tokens, cfg.text_config.hidden_size)
    assert cfg.num_image_tokens == 4  # 32 px / patch 8 = 4x4 grid, 2x2 pooled


def test_clear_errors(tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor) -> None:
    batch = _batch(processor)
    with pytest.raises(ValueError, match="32x32"):
        tiny_model(**{**batch, "pixel_values": torch.zeros(2, 3, 48, 48)})
    with pytest.raises(ValueError, match="3 channels"):
        tiny_model(**{**batch, "pixel_values": torch.zeros(2, 4, 32, 32)})
    ids = batch["input_ids"].clone()
    ids[0, ids[0] == tiny_model.config.image_token_id] = 7
    with pytest.raises(ValueError, match="image tokens"):
        tiny_model(**{**batch, "input_ids": ids})
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="image_index"):
        tiny_model(**{**batch, "image_index": None, "pixel_values": batch["pixel_values"][:1]})


def test_loss_counts_answer_tokens_only(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    batch = _batch(processor)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -5:] = ids[:, -5:]  # the last five tokens of each row are "the answer"
    out = tiny_model(**batch, labels=labels)
    logits = out.logits.detach()
    manual = F.cross_entropy(logits[:, -6:-1].reshape(-1, logits.shape[-1]), ids[:, -5:].reshape(-1))
    torch.testing.assert_close(out.loss.detach(), manual)
    # no label anywhere: a zero loss that still backpropagates
    none = tiny_model(**batch, labels=torch.full_like(ids, -100)).loss
    assert none.item() == 0.0
    none.backward()


def test_shared_image_equals_repeated_image(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    tiles = random_tiles(2, seed=3)
    shared = processor.build_inputs(tiles, PROMPTS, image_index=[0, 1, 0])
    repeated = processor.build_inputs([tiles[0], tiles[1], tiles[0]], PROMPTS)
    with torch.no_grad():
        a = tiny_model(**{k: v for k, v in shared.items() if k != "pad_info"})
        b = tiny_model(**{k: v for k, v in repeated.items() if k != "pad_info"})
    assert a.image_features is not None and a.image_features.shape[0] == 2  # encoded once each
    torch.testing.assert_close(a.logits, b.logits)


def test_encoders_frozen_by_default(tiny_model: EarthGPTForConditionalGeneration) -> None:
    assert not any(p.requires_grad for p in tiny_model.vision_tower.parameters())
    assert tiny_model.cnn_tower is not None
    assert not any(p.requires_grad for p in tiny_model.cnn_tower.parameters())
    assert all(p.requires_grad for p in tiny_model.multi_modal_projector.parameters())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="vit_layers"):
        earthgpt_tiny(vit_layers=(0, 3))
    with pytest.raises(ValueError, match="multiple of the ViT patch"):
        earthgpt_tiny(image_size=36)
    with pytest.raises(ValueError, match="pool"):
        earthgpt_tiny(pool="3x3")
    assert earthgpt_tiny(pool="none").num_image_tokens == 16
    cfg = earthgpt_tiny(text_config={"hidden_size": 32}, cnn_fusion_dim=8)
    assert (
        cfg.text_config.hidden_size == 32
        and cfg.text_config.num_hidden_layers == 2
        and cfg.cnn_fusion_dim == 8
    )


def test_save_load_round_trip_safetensors_and_auto(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, tmp_path: Path
) -> None:
    tiny_model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    batch = _batch(processor)
    for loader in (EarthGPTForConditionalGeneration, AutoModel):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, EarthGPTForConditionalGeneration)
        assert isinstance(loaded.config, EarthGPTConfig)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded.eval()(**batch).logits, tiny_model(**batch).logits, rtol=0, atol=0
            )
        lm = loaded.language_model
        assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # still tied


# ----------------------------------------------------------------------------------------------------------------
# Parity with the plain Hugging Face models


def test_text_path_equals_llama_for_causal_lm(tiny_model: EarthGPTForConditionalGeneration) -> None:
    reference = LlamaForCausalLM(copy.deepcopy(tiny_model.config.text_config)).eval()
    reference.load_state_dict(tiny_model.language_model.state_dict())
    ids = torch.randint(7, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = tiny_model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs)


def test_multimodal_rows_equal_llama_on_spliced_embeddings(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    batch = processor.build_inputs(random_tiles(1), PROMPTS[:1])  # one row: no padding, positions 0..L-1
    reference = LlamaForCausalLM(copy.deepcopy(tiny_model.config.text_config)).eval()
    reference.load_state_dict(tiny_model.language_model.state_dict())
    with torch.no_grad():
        features = tiny_model.get_image_features(batch["pixel_values"])
        embeds = reference.get_input_embeddings()(batch["input_ids"])
        embeds[batch["input_ids"] == tiny_model.config.image_token_id] = features.reshape(
            -1, features.shape[-1]
        )
        theirs = reference(inputs_embeds=embeds).logits
        ours = tiny_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(ours, theirs)


def test_vit_branch_equals_dinov2_hidden_states(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    cfg = tiny_model.config
    vit = Dinov2Model(copy.deepcopy(cfg.vision_config)).eval()
    vit.load_state_dict(tiny_model.vision_tower.state_dict())
    pixels, _ = processor.preprocess_images(random_tiles(2))
    # the processor normalises with CLIP statistics, DINOv2 expects ImageNet ones
    raw = pixels * torch.tensor(cfg.image_std).view(1, 3, 1, 1) + torch.tensor(cfg.image_mean).view(
        1, 3, 1, 1
    )
    dino_in = (raw - torch.tensor(cfg.vit_image_mean).view(1, 3, 1, 1)) / torch.tensor(
        cfg.vit_image_std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = tiny_model.get_vit_hidden_states(pixels)
        theirs = vit(pixel_values=dino_in, output_hidden_states=True).hidden_states
    assert len(ours) == len(cfg.vit_layers)
    for layer, state in zip(cfg.vit_layers, ours, strict=True):
        torch.testing.assert_close(state, theirs[layer])


def test_image_features_recomputed_from_reference_towers(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    """The fusion order (ViT layers -> LayerNorm -> concat with the CNN pyramid -> 2x2 pool -> projector)."""
    cfg = tiny_model.config
    cnn = ConvNextModel(copy.deepcopy(cfg.cnn_config)).eval()
    cnn.load_state_dict(tiny_model.cnn_tower.state_dict())
    pixels, _ = processor.preprocess_images(random_tiles(2, seed=5))
    g = cfg.grid_size
    with torch.no_grad():
        states = tiny_model.get_vit_hidden_states(pixels)
        vit = torch.cat([tiny_model.vision_tower.layernorm(s)[:, 1:] for s in states], dim=-1)
        vit = vit.transpose(1, 2).reshape(2, -1, g, g)
        maps = cnn(pixel_values=pixels, output_hidden_states=True).hidden_states[1:]
        assert [m.shape[-1] for m in maps] == [8, 4, 2, 1]  # strides 4, 8, 16, 32 of 32 px
        fusion = tiny_model.fusion
        p = fusion.lateral[3](maps[3])
        for i in (2, 1, 0):
            p = fusion.lateral[i](maps[i]) + F.interpolate(p, size=maps[i].shape[-2:], mode="nearest")
        cnn_grid = fusion.smooth(F.adaptive_avg_pool2d(p, g))
        grid = F.avg_pool2d(torch.cat([vit, cnn_grid], dim=1), 2)
        expected = tiny_model.multi_modal_projector(grid.flatten(2).transpose(1, 2))
        torch.testing.assert_close(tiny_model.get_image_features(pixels), expected)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _generate(model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, tiles, prompts, **kw):  # type: ignore[no-untyped-def]
    batch = processor.build_inputs(tiles, prompts, image_index=kw.pop("image_index", None))
    batch.pop("pad_info")
    return model.generate(**batch, stop_token_ids=kw.pop("stop_token_ids", processor.stop_token_ids), **kw)


def test_batched_left_padded_generation_equals_one_by_one(peaky) -> None:  # type: ignore[no-untyped-def]
    model, processor = peaky
    tiles = random_tiles(3, seed=1)
    batched = _generate(model, processor, tiles, PROMPTS, max_new_tokens=8)
    for i in range(3):
        single = _generate(model, processor, [tiles[i]], [PROMPTS[i]], max_new_tokens=8)
        n = int(single.n_tokens[0])
        assert int(batched.n_tokens[i]) == n
        assert batched.sequences[i, :n].tolist() == single.sequences[0, :n].tolist()
        torch.testing.assert_close(batched.mean_logprob[i], single.mean_logprob[0], atol=1e-4, rtol=0)


def test_mean_logprob_matches_teacher_forcing(peaky) -> None:  # type: ignore[no-untyped-def]
    model, processor = peaky
    tiles = random_tiles(1, seed=2)
    out = _generate(model, processor, tiles, PROMPTS[:1], max_new_tokens=6, stop_token_ids=[])
    batch = processor.build_inputs(tiles, PROMPTS[:1])
    full = torch.cat([batch["input_ids"], out.sequences], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, pixel_values=batch["pixel_values"]).logits
    logp = torch.log_softmax(logits[0, -7:-1], dim=-1).gather(-1, out.sequences[0, :, None]).squeeze(-1)
    torch.testing.assert_close(out.token_logprobs[0], logp, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.mean_logprob[0], logp.mean(), atol=1e-4, rtol=0)
    # greedy: each token is the argmax of the teacher-forced distribution
    assert logits[0, -7:-1].argmax(-1).tolist() == out.sequences[0].tolist()


def test_images_change_answers_and_stop_tokens_stop(peaky) -> None:  # type: ignore[no-untyped-def]
    model, processor = peaky
    a = _generate(model, processor, random_tiles(1, seed=10), PROMPTS[:1], max_new_tokens=6)
    b = _generate(model, processor, random_tiles(1, seed=11), PROMPTS[:1], max_new_tokens=6)
    assert a.sequences.tolist() != b.sequences.tolist()
    first = int(a.sequences[0, 0])
    stopped = _generate(
        model, processor, random_tiles(1, seed=10), PROMPTS[:1], max_new_tokens=6, stop_token_ids=[first]
    )
    assert stopped.n_tokens.tolist() == [1] and stopped.sequences.shape == (1, 1)


def test_sampling_is_seeded(peaky) -> None:  # type: ignore[no-untyped-def]
    model, processor = peaky
    tiles = random_tiles(2, seed=4)

    def sample(seed: int):  # type: ignore[no-untyped-def]
        gen = torch.Generator().manual_seed(seed)
        return _generate(
            model, processor, tiles, PROMPTS[:2], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9,
            stop_token_ids=[], generator=gen,
        ).sequences  # fmt: skip

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    with pytest.raises(ValueError, match="LEFT"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]))
