"""The static decoder (static KV cache, shared prefixes, continuous batching, planned batches) answers exactly as the
baseline decoder does, token for token, and does less prefill."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from earthgpt.engine import Generation, InferenceEngine, plan_batch
from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.presets import build_model, earthgpt_paper, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor
from earthgpt.stages import set_trainable
from earthgpt.tasks import build_prompt

from .conftest import random_tiles

TOY = Path(__file__).resolve().parents[2] / "models" / "earthgpt-toy"


@pytest.fixture(scope="module")
def peaky_model() -> EarthGPTForConditionalGeneration:
    """Large initial weights: decisive logits, so greedy answers do not hinge on the last bit."""
    return build_model(earthgpt_tiny(text_config={"initializer_range": 0.5}), seed=0)


def _pair(
    model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, **static: object
) -> tuple[InferenceEngine, InferenceEngine]:
    base = InferenceEngine(copy.deepcopy(model), processor, device="cpu", decoding="baseline")
    new = InferenceEngine(copy.deepcopy(model), processor, device="cpu", **static)  # type: ignore[arg-type]
    return base, new


def _tile_prompts(n_tiles: int) -> tuple[list[str], list[int]]:
    tasks: list[tuple[str, dict[str, Any]]] = [
        ("caption", {}),
        ("detect", {}),
        ("vqa", {"question": "How many ships are there?"}),
    ]
    prompts, index = [], []
    for j in range(n_tiles):
        for k in range(1 + j % 3):  # 1, 2 or 3 prompts per tile
            task, kw = tasks[k]
            prompts.append(build_prompt(task, ("optical", "sar", "infrared")[j % 3], **kw))
            index.append(j)
    return prompts, index


def _assert_same(a: list[Generation], b: list[Generation]) -> None:
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.n_tokens for g in a] == [g.n_tokens for g in b]
    np.testing.assert_allclose([g.mean_logprob for g in a], [g.mean_logprob for g in b], atol=1e-4)
    for x, y in zip(a, b, strict=True):
        assert len(y.token_logprobs) == y.n_tokens
        np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)


@pytest.mark.parametrize("decode_batch,prefill_batch", [(None, None), (3, 2), (1, 1)])
def test_static_greedy_matches_baseline(
    peaky_model: EarthGPTForConditionalGeneration,
    processor: EarthGPTProcessor,
    decode_batch: int | None,
    prefill_batch: int | None,
) -> None:
    base, new = _pair(peaky_model, processor, decode_batch=decode_batch, prefill_batch=prefill_batch)
    tiles = random_tiles(5, seed=3, shapes=((32, 32), (24, 40)))
    prompts, index = _tile_prompts(5)
    a = base.generate(tiles, prompts, max_new_tokens=12, image_index=index)
    b = new.generate(tiles, prompts, max_new_tokens=12, image_index=index)
    _assert_same(a, b)
    if decode_batch is not None:
        assert new.batch_plan["decode_batch"] == decode_batch
        assert new.batch_plan["prefill_batch"] == prefill_batch


@pytest.mark.parametrize("decode_batch", [None, 3, 1])
def test_static_shapes_match_baseline_and_keep_their_cache(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, decode_batch: int | None
) -> None:
    """Fixed-shape decode steps (rows padded to a power of two, keys to 64 positions: what CUDA graphs replay) give
    the baseline's answers; the cache is kept from one call to the next while it fits."""
    base, new = _pair(peaky_model, processor, decode_batch=decode_batch, static_shapes=True)
    tiles = random_tiles(5, seed=3, shapes=((32, 32), (24, 40)))
    prompts, index = _tile_prompts(5)  # 1-3 prompts per tile: prompts of several lengths, rows stop at different steps
    _assert_same(
        base.generate(tiles, prompts, max_new_tokens=12, image_index=index),
        new.generate(tiles, prompts, max_new_tokens=12, image_index=index),
    )
    steps = new._steps
    assert steps is not None and steps.cache.max_len % 64 == 0
    slots = steps.cache.slots
    assert slots == (16 if decode_batch is None else decode_batch)  # 10 prompts: 16 rows, or the fixed batch
    assert new.batch_plan["static_shapes"] is True and new.batch_plan["cuda_graphs"] is False
    # a smaller call reuses the kept cache (no new allocation, and on a GPU no new graphs)
    _assert_same(
        base.generate(tiles[:2], prompts[:3], max_new_tokens=12, image_index=index[:3]),
        new.generate(tiles[:2], prompts[:3], max_new_tokens=12, image_index=index[:3]),
    )
    assert new._steps is steps and steps.cache.slots == slots
    # a longer budget needs more positions: a new cache
    new.generate(tiles[:1], prompts[:1], max_new_tokens=steps.cache.max_len, image_index=[0])
    assert new._steps is not steps
    new.release_memory()
    assert new._steps is None


def test_the_kept_cache_counts_as_memory_to_plan_with(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning while the fixed-shape cache is kept counts that cache as the engine's own: the next call plans with
    the memory the first one had, so it keeps the cache (and on a GPU its graphs) instead of shrinking and replacing
    it on every call."""
    import psutil

    class _Machine:
        available = 8 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Machine)
    new = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu", static_shapes=True)
    before = new._memory()[0]
    tiles = random_tiles(5, seed=3, shapes=((32, 32),))
    prompts, index = _tile_prompts(5)
    new.generate(tiles, prompts, max_new_tokens=12, image_index=index)
    steps = new._steps
    assert steps is not None and steps.cache.nbytes > 0
    _Machine.available -= steps.cache.nbytes  # the machine's view once the cache is allocated
    assert new._memory()[0] == before
    new.generate(tiles, prompts, max_new_tokens=12, image_index=index)
    assert new._steps is steps


def test_cuda_graphs_need_a_gpu_and_one_rank(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA GPU"):
        InferenceEngine(peaky_model, processor, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="static_shapes needs decoding='static'"):
        InferenceEngine(peaky_model, processor, device="cpu", decoding="baseline", static_shapes=True)


@pytest.mark.gpu
def test_cuda_graphs_replay_the_same_answers(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    """On a GPU: captured and replayed decode steps answer as the eager static decoder (float32), graphs reused."""
    eager = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cuda")
    graphs = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cuda", cuda_graphs=True)
    tiles = random_tiles(5, seed=3, shapes=((32, 32), (24, 40)))
    prompts, index = _tile_prompts(5)
    a = eager.generate(tiles, prompts, max_new_tokens=12, image_index=index)
    _assert_same(a, graphs.generate(tiles, prompts, max_new_tokens=12, image_index=index))
    steps = graphs._steps
    assert steps is not None and steps.captures > 0
    captures = steps.captures
    _assert_same(a, graphs.generate(tiles, prompts, max_new_tokens=12, image_index=index))
    assert steps.captures == captures  # the second call replays, captures nothing


def test_static_default_weights_and_features(
    tiny_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    base, new = _pair(tiny_model, processor)
    tiles = random_tiles(4, seed=1)
    prompts, index = _tile_prompts(4)
    features = new.encode_images(tiles)
    a = base.generate(tiles, prompts, max_new_tokens=16, image_index=index)
    b = new.generate(None, prompts, max_new_tokens=16, image_index=index, image_features=features)
    _assert_same(a, b)
    assert new.batch_plan["fused_projections"] is True


def test_trained_model_stops_early_and_matches(tmp_path: Path) -> None:
    """The toy-world checkpoint answers in a few tokens: rows leave the batch as they stop, waiting prompts refill it."""
    model = EarthGPTForConditionalGeneration.from_pretrained(TOY)
    processor = EarthGPTProcessor.from_pretrained(TOY)
    base, new = _pair(model, processor, decode_batch=4, prefill_batch=2)
    tiles = random_tiles(6, seed=5, shapes=((64, 64),))
    prompts = [build_prompt(t, s) for s in ("optical", "sar", "infrared") for t in ("caption", "detect")] * 2
    index = [i // 2 for i in range(len(prompts))]
    a = base.generate(tiles, prompts, max_new_tokens=48, image_index=index)
    b = new.generate(tiles, prompts, max_new_tokens=48, image_index=index)
    _assert_same(a, b)
    lengths = [g.n_tokens for g in b]
    assert (
        min(lengths) < max(lengths) <= 48
    )  # answers of different lengths: the batch changed as rows stopped
    stops = set(processor.stop_token_ids)
    assert all(g.token_ids[-1] in stops for g in b if g.n_tokens < 48)
    # decoded tokens are exactly the answers' (no lock-step padding): the first comes from the prefill
    assert new.last_stats["decode_tokens"] == sum(n - 1 for n in lengths)


def test_shared_prefix_is_prefilled_once(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    base, new = _pair(peaky_model, processor)
    tiles = random_tiles(2, seed=2)
    prompts = [build_prompt(t, "optical") for t in ("caption", "detect", "classify")] * 2
    index = [0, 0, 0, 1, 1, 1]
    b = new.generate(tiles, prompts, max_new_tokens=6, image_index=index)
    _assert_same(base.generate(tiles, prompts, max_new_tokens=6, image_index=index), b)
    # alone, each prompt gives the same answer (sharing changes nothing but the work)
    for i, q in enumerate(prompts):
        alone = new.generate([tiles[index[i]]], [q], max_new_tokens=6)
        assert alone[0].token_ids == b[i].token_ids
    new.generate(tiles, prompts, max_new_tokens=6, image_index=index)
    rows = [processor.encode_prompt(q) for q in prompts]
    prefix = 0
    while all(r[prefix] == rows[0][prefix] for r in rows[:3]):
        prefix += 1
    assert prefix > processor.num_image_tokens + 3  # image tokens, delimiters and the system line are shared
    full = sum(len(r) for r in rows)
    stats = new.last_stats
    assert stats["prefill_tokens"] == full - 2 * 2 * prefix  # per tile: one prefix instead of three
    assert stats["shared_prefix_tokens"] == 2 * 2 * prefix


def test_out_of_memory_halves_the_batch_and_loses_nothing(
    peaky_model: EarthGPTForConditionalGeneration,
    processor: EarthGPTProcessor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, new = _pair(peaky_model, processor, decode_batch=8, prefill_batch=8)
    real = new.model.forward_cached

    def small_device(embeds: torch.Tensor, *args: object, **kwargs: object) -> object:
        if embeds.shape[0] > 2:  # what a GPU does when the batch does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(embeds, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(new.model, "forward_cached", small_device)
    tiles = random_tiles(4, seed=4)
    prompts, index = _tile_prompts(4)
    a = base.generate(tiles, prompts, max_new_tokens=8, image_index=index)
    b = new.generate(tiles, prompts, max_new_tokens=8, image_index=index)
    _assert_same(a, b)
    assert new.batch_plan["oom_halvings"] == 2
    assert new.batch_plan["decode_batch"] == 2 and new.batch_plan["prefill_batch"] == 2
    # later calls start from the smaller batches
    _assert_same(a, new.generate(tiles, prompts, max_new_tokens=8, image_index=index))
    assert new.batch_plan["oom_halvings"] == 2

    def no_device(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(new.model, "forward_cached", no_device)
    with pytest.raises(torch.OutOfMemoryError):
        new.generate(tiles, prompts, max_new_tokens=8, image_index=index)


def test_stage3_shift_parameters_use_the_modules(processor: EarthGPTProcessor) -> None:
    """Hooked projections (stage-3 scale/bias) are not stacked: the static decoder calls the modules and agrees."""
    model = build_model(earthgpt_tiny(text_config={"initializer_range": 0.5}), seed=1)
    set_trainable(model, 3)
    assert model.shift is not None
    with torch.no_grad():
        for p in model.shift.parameters():
            p.add_(0.1 * torch.randn_like(p))
    base, new = _pair(model, processor)
    assert new.batch_plan["fused_projections"] is False
    tiles = random_tiles(3, seed=6)
    prompts, index = _tile_prompts(3)
    _assert_same(
        base.generate(tiles, prompts, max_new_tokens=10, image_index=index),
        new.generate(tiles, prompts, max_new_tokens=10, image_index=index),
    )


def test_budgets_sampling_and_bad_arguments(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    engine = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu")
    tiles = random_tiles(2)
    prompts = [build_prompt("caption", "optical"), build_prompt("detect", "sar")]
    assert [g.n_tokens for g in engine.generate(tiles, prompts, max_new_tokens=0)] == [0, 0]
    assert [g.n_tokens for g in engine.generate(tiles, prompts, max_new_tokens=1)] == [1, 1]
    s1 = engine.generate(tiles, prompts, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    s2 = engine.generate(tiles, prompts, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3)
    assert [g.token_ids for g in s1] == [g.token_ids for g in s2]
    assert all(1 <= g.n_tokens <= 6 and len(g.token_logprobs) == g.n_tokens for g in s1)
    with pytest.raises(ValueError, match="image_index"):
        engine.generate(tiles, prompts, image_index=[0, 2])
    with pytest.raises(ValueError, match="decoding"):
        InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu", decoding="paged")
    with pytest.raises(ValueError, match="decode_batch"):
        InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu", decode_batch=0)


def test_bfloat16_keeps_rotary_frequencies_in_float32(
    peaky_model: EarthGPTForConditionalGeneration, processor: EarthGPTProcessor
) -> None:
    engine = InferenceEngine(copy.deepcopy(peaky_model), processor, device="cpu", dtype=torch.bfloat16)
    rotary = engine.model.language_model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert engine.model.language_model.lm_head.weight.dtype == torch.bfloat16
    out = engine.generate(random_tiles(1), [build_prompt("caption", "optical")], max_new_tokens=4)
    assert out[0].n_tokens >= 1


def test_plan_batch_fits_the_budget() -> None:
    paper = earthgpt_paper()
    gib = 2**30
    h100 = plan_batch(80 * gib, paper, torch.bfloat16, prompt_len=315, max_new_tokens=64)
    assert h100["kv_bytes_per_token"] == 2 * 40 * 5120 * 2
    assert 24 * gib < h100["weights_bytes"] < 27 * gib
    used = (
        h100["weights_bytes"]
        + h100["decode_batch"] * h100["decode_bytes_per_row"]
        + h100["prefill_batch"] * h100["prefill_bytes_per_row"]
    )
    assert used <= 80 * gib * 0.9
    assert 32 <= h100["decode_batch"] < 256
    h200 = plan_batch(141 * gib, paper, torch.bfloat16, prompt_len=315, max_new_tokens=64)
    assert h200["decode_batch"] > h100["decode_batch"]
    longer = plan_batch(80 * gib, paper, torch.bfloat16, prompt_len=315, max_new_tokens=512)
    assert longer["decode_batch"] < h100["decode_batch"]
    tp2 = plan_batch(80 * gib, paper, torch.bfloat16, prompt_len=315, max_new_tokens=64, tp_size=2)
    assert tp2["kv_bytes_per_token"] == h100["kv_bytes_per_token"] // 2
    assert tp2["decode_batch"] > h100["decode_batch"]
    with pytest.raises(ValueError, match="memory_bytes"):
        plan_batch(24 * gib, paper, torch.bfloat16, prompt_len=315, max_new_tokens=64)
