"""One inference adapter over the model: plain PyTorch or DeepSpeed-inference, same ``generate`` either way.

``InferenceEngine(model, processor, kind="deepspeed", dtype=torch.bfloat16, tp_size=1)`` wraps the model with
``deepspeed.init_inference`` (tensor parallelism and dtype from the arguments; fp16 needs a GPU). Kernel injection
(``kernel_inject=True``, GPU only) stays off by default: it failed with transformers 5 on the project's own GPU run
(benchmarks/results/gpu_generate_h200.txt). On CPU, set ``DS_ACCELERATOR=cpu`` (the engine sets it when no CUDA is present
and the variable is unset).

Batches: ``generate(images, prompts, image_index=...)`` encodes each image once, however many prompts use it.

Two decoders, same answers (greedy: token for token):

- ``decoding="static"`` (default): a pre-allocated KV cache (:class:`earthgpt.modeling.StaticKVCache`); the prompts
  of one image share their common prefix (``[BOS] <img> visual tokens </img>`` + system line + ...), prefilled once
  and copied to each prompt's slot; answers that stop leave the decode batch at once and waiting prompts take their
  slots (continuous batching); prefill and decode batch sizes are planned separately from the memory budget
  (:func:`plan_batch`, the choice in ``engine.batch_plan``); an out-of-memory error halves both and retries the
  prompts not yet answered. ``static_shapes=True`` runs every decode step at fixed shapes (rows padded to a power of
  two, keys to a multiple of 64 positions, one cache kept across calls); ``cuda_graphs=True`` (GPU, off by default)
  captures each such step once as a CUDA graph and replays it, so a step costs one launch instead of hundreds.
- ``decoding="baseline"``: :meth:`earthgpt.modeling.EarthGPTForConditionalGeneration.generate`, one left-padded
  batch in lock-step with a dynamic cache (the reference, kept for comparisons).
"""

from __future__ import annotations

import gc
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from earthgpt.modeling import EarthGPTConfig, EarthGPTForConditionalGeneration, StaticKVCache, _sample
from earthgpt.processor import EarthGPTProcessor

ENGINE_KINDS = ("plain", "deepspeed")
DECODINGS = ("static", "baseline")


@dataclass
class Generation:
    """One generated answer.

    Attributes:
        text: The answer, cut at the separator and trimmed (feed it to ``earthgpt.tasks.parse_answer``).
        mean_logprob: Mean log-probability of the generated tokens (stop token included): a confidence in
            ``(-inf, 0]``.
        n_tokens: Tokens generated (stop token included).
        token_ids: The generated ids (stop token included, padding excluded).
        token_logprobs: Log-probability of each of ``token_ids`` (temperature 1), aligned with them: what
            per-box confidences are computed from.
    """

    text: str
    mean_logprob: float
    n_tokens: int
    token_ids: list[int]
    token_logprobs: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------------
# Memory planning

_HEADROOM = 0.10
"""Share of the budget kept free (allocator fragmentation, the image encoders' activations, temporaries)."""
_PREFILL_SHARE = 0.25
"""Share of the memory left after the weights that prefill activations may take."""


def _itemsize(dtype: torch.dtype) -> int:
    return int(torch.empty((), dtype=dtype).element_size())


def weights_nbytes(config: EarthGPTConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of the model's weights in ``dtype`` (the language model split over ``tp_size`` ranks).

    Counted on the ``meta`` device: no memory is allocated.
    """
    from earthgpt.presets import build_model

    model = build_model(config, device="meta")
    llm = sum(p.numel() for p in model.language_model.parameters())
    rest = sum(p.numel() for p in model.parameters()) - llm
    return (rest + llm // max(int(tp_size), 1)) * _itemsize(dtype)


def plan_batch(
    memory_bytes: int,
    config: EarthGPTConfig,
    dtype: torch.dtype,
    *,
    prompt_len: int,
    max_new_tokens: int,
    tp_size: int = 1,
    weights_bytes: int | None = None,
    max_batch: int = 256,
) -> dict[str, Any]:
    """The largest prefill and decode batches (in prompts) that fit a memory budget.

    Memory = weights + decode batch x (KV cache of one full sequence + one step's activations) + prefill batch x
    (activations of one prompt, attention scores included) + 10 % headroom. Prefill activations may take a quarter of
    what the weights leave; the decode batch takes the rest.

    Args:
        memory_bytes: The budget (a GPU's memory, or the RAM to use).
        config: Model config (``earthgpt.presets.preset_config("paper")`` ...).
        dtype: Weight and KV-cache dtype.
        prompt_len: Tokens of the longest prompt (visual tokens included).
        max_new_tokens: Generation budget per answer.
        tp_size: Tensor-parallel ranks sharing the language model (each holds ``1/tp_size`` of it and its cache).
        weights_bytes: Weight bytes per rank; default counted from ``config``.
        max_batch: Upper bound on either batch.

    Returns:
        ``{"decode_batch", "prefill_batch", "memory_bytes", "weights_bytes", "kv_bytes_per_token",
        "kv_bytes_per_row", "prefill_bytes_per_row", "decode_bytes_per_row", "max_seq_len", "tp_size", "dtype"}``.

    Raises:
        ValueError: when the budget cannot hold the weights and one sequence.
    """
    text = config.text_config
    item = _itemsize(dtype)
    tp = max(int(tp_size), 1)
    if weights_bytes is None:
        weights_bytes = weights_nbytes(config, dtype, tp)
    hidden, inter = int(text.hidden_size), int(text.intermediate_size)
    n_heads = int(text.num_attention_heads)
    heads = max(n_heads // tp, 1)
    kv_heads = max(int(getattr(text, "num_key_value_heads", None) or n_heads) // tp, 1)
    head_dim = int(getattr(text, "head_dim", None) or hidden // n_heads)
    layers, vocab = int(text.num_hidden_layers), int(text.vocab_size)
    seq = int(prompt_len) + int(max_new_tokens)
    kv_token = 2 * layers * kv_heads * head_dim * item
    # live activations of one token in one layer (residual, norm, q/k/v, attention out, MLP gate/up/act)
    per_token = (8 * hidden + 3 * inter) * item
    logits = 3 * vocab * 4  # float32 logits, log-softmax and probabilities of one position
    # prefill: a prompt's activations, its attention scores (math kernel, float32) and its keys/values gathered for one
    # layer; decode: the whole sequence's cache plus one step
    prefill_row = (
        prompt_len * per_token + heads * prompt_len * prompt_len * 4 + 2 * kv_token // layers * seq + logits
    )
    decode_row = seq * kv_token + per_token + heads * seq * 4 + logits
    usable = int(memory_bytes * (1 - _HEADROOM)) - int(weights_bytes)
    if usable < prefill_row + decode_row:
        raise ValueError(
            f"memory_bytes {memory_bytes / 2**30:.2f} GiB cannot hold the weights ({weights_bytes / 2**30:.2f} GiB) "
            f"and one {seq}-token sequence"
        )
    prefill = int(min(max_batch, max(1, usable * _PREFILL_SHARE // prefill_row)))
    decode = int(min(max_batch, max(1, (usable - prefill * prefill_row) // decode_row)))
    return {
        "decode_batch": decode,
        "prefill_batch": prefill,
        "memory_bytes": int(memory_bytes),
        "weights_bytes": int(weights_bytes),
        "kv_bytes_per_token": int(kv_token),
        "kv_bytes_per_row": int(seq * kv_token),
        "prefill_bytes_per_row": int(prefill_row),
        "decode_bytes_per_row": int(decode_row),
        "max_seq_len": seq,
        "tp_size": tp,
        "dtype": str(dtype).removeprefix("torch."),
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or the host) ran out of memory: what a smaller batch may fix."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ------------------------------------------------------------------------------------------------------------------


class InferenceEngine:
    """Runs EarthGPT for inference, plainly or through DeepSpeed-inference.

    Args:
        model: The model (moved to ``device`` and ``dtype`` here, put in eval mode).
        processor: Its processor.
        kind: ``"plain"`` or ``"deepspeed"``.
        dtype: Weight dtype (float32, bfloat16; float16 on GPU only).
        tp_size: DeepSpeed tensor-parallel size (automatic tensor parallelism, one process per rank).
        kernel_inject: DeepSpeed fused-kernel injection (GPU only; off by default).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        decoding: ``"static"`` (static KV cache, shared prefixes, continuous batching) or ``"baseline"`` (always with
            ``kernel_inject``).
        memory_budget: Bytes the engine may use (weights included) when planning batches; default: free GPU memory
            and cached-unused memory plus the weights on CUDA, available RAM plus the weights on CPU.
        decode_batch: Fixed decode batch (prompts decoded at once) instead of the planned one.
        prefill_batch: Fixed prefill batch (rows prefilled at once) instead of the planned one.
        max_batch: Upper bound of planned batches.
        fuse_projections: Static decoding keeps stacked copies of each layer's q/k/v and gate/up weights (two matmuls
            instead of five: fewer dispatches, same numbers); default when the copies take at most 5 % of the memory
            budget. The weights must not change while the engine lives.
        static_shapes: Decode steps at fixed shapes: the rows padded to the next power of two (at most the slots),
            the keys to the next multiple of 64 positions; the KV cache is kept from one call to the next while its
            shape fits. Same answers, some padded work; what CUDA graphs (and ``torch.compile``) need. Default: on
            with ``cuda_graphs``.
        cuda_graphs: Capture each fixed-shape decode step (one per rows x keys bucket, on first use) as a CUDA graph
            and replay it. CUDA only, ``tp_size=1``; off by default.

    Attributes:
        batch_plan: What the static decoder chose for the last ``generate`` call (before it, for a 64-token
            budget): :func:`plan_batch`'s dict plus ``decoding``, ``memory_source`` and ``oom_halvings``.
        last_stats: Counters of the last static ``generate`` call: ``prefill_tokens``, ``prefill_s``,
            ``decode_steps``, ``decode_tokens``, ``decode_context_tokens``, ``decode_s``, ``shared_prefix_tokens``.

    Raises:
        ValueError: unknown kind or decoding, or kernel injection / fp16 requested without a GPU.
    """

    def __init__(
        self,
        model: EarthGPTForConditionalGeneration,
        processor: EarthGPTProcessor,
        kind: str = "plain",
        dtype: torch.dtype = torch.float32,
        tp_size: int = 1,
        kernel_inject: bool = False,
        device: str | torch.device | None = None,
        *,
        decoding: str = "static",
        memory_budget: int | None = None,
        decode_batch: int | None = None,
        prefill_batch: int | None = None,
        max_batch: int = 256,
        fuse_projections: bool | None = None,
        static_shapes: bool | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if kind not in ENGINE_KINDS:
            raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        for name, value in (
            ("decode_batch", decode_batch),
            ("prefill_batch", prefill_batch),
            ("max_batch", max_batch),
        ):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.device = torch.device(device) if device is not None else _default_device()
        if self.device.type != "cuda":
            if kernel_inject:
                raise ValueError(
                    "kernel_inject needs a CUDA GPU (DeepSpeed's fused kernels do not run on CPU)"
                )
            if dtype == torch.float16:
                raise ValueError("float16 inference needs a GPU; use float32 or bfloat16 on CPU")
        if kernel_inject and kind != "deepspeed":
            raise ValueError("kernel_inject is a DeepSpeed option: use kind='deepspeed'")
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError("cuda_graphs needs a CUDA GPU")
            if int(tp_size) != 1:
                raise ValueError("cuda_graphs needs tp_size=1 (tensor-parallel collectives are not captured)")
            if decoding != "static" or kernel_inject:
                raise ValueError("cuda_graphs needs decoding='static' without kernel_inject")
            if static_shapes is False:
                raise ValueError("cuda_graphs needs static_shapes")
        if static_shapes and decoding != "static":
            raise ValueError("static_shapes needs decoding='static'")
        if kernel_inject:
            # injected kernels replace the decoder layers the static decoder drives
            decoding = "baseline"
        self.kind = kind
        self.dtype = dtype
        self.tp_size = int(tp_size)
        self.kernel_inject = bool(kernel_inject)
        self.decoding = decoding
        self.processor = processor
        self.config = model.config
        model = model.eval()
        if kind == "plain":
            with _float32_rotary(model):
                torch.nn.Module.to(model, device=self.device, dtype=dtype)
            self.model = model
            self._ds_engine = None
        else:
            # module-replacing engines would drop the stage-3 hooks: fold them into the weights first
            model.merge_shift_parameters()
            with _float32_rotary(model):
                self._ds_engine = _deepspeed_init(model, dtype, self.tp_size, self.kernel_inject, self.device)
            self.model = self._ds_engine.module
        self._memory_budget = memory_budget
        self._fixed = {"decode_batch": decode_batch, "prefill_batch": prefill_batch}
        self._max_batch = int(max_batch)
        self._oom_caps: dict[str, int] = {}
        self._oom_halvings = 0
        self._weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.last_stats: dict[str, float] = {}
        self.batch_plan: dict[str, Any] = {}
        self._projections: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cuda_graphs = bool(cuda_graphs)
        self.static_shapes = bool(cuda_graphs if static_shapes is None else static_shapes)
        self._steps: _DecodeSteps | None = None  # fixed-shape decode: the kept cache, its buffers and graphs
        if decoding == "static":
            prompt_len = len(processor.encode_prompt("What is in this image?")) + 64
            self.batch_plan = self._plan(prompt_len, 64)
            # the stacked copies are sized from the weights first: a paper-scale model's would be ~18 GB, made only
            # to be dropped
            if fuse_projections or (
                fuse_projections is None
                and self.model.fused_projections_nbytes() <= 0.05 * self.batch_plan["memory_bytes"]
            ):
                self._projections = self.model.fused_projections()
            self.batch_plan["fused_projections"] = self._projections is not None
        else:
            self.batch_plan = {"decoding": "baseline"}

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path, *, seed: int = 0, **kwargs: Any) -> InferenceEngine:
        """An engine for a saved model folder, or for a preset with random weights.

        Args:
            path_or_preset: A folder written by ``model.save_pretrained`` + ``processor.save_pretrained``, or a
                preset name (``tiny``, ``small``, ``paper``; ``earthgpt_tiny`` ...) for a random-weight model.
            seed: Weight seed for presets.
            **kwargs: :class:`InferenceEngine` arguments (``kind``, ``dtype``, ``device``, ``decoding``, ...).
        """
        from earthgpt.presets import PRESETS, build_model, preset_config

        name = str(path_or_preset)
        if name.removeprefix("earthgpt_").removeprefix("earthgpt-") in PRESETS and not Path(name).exists():
            config = preset_config(name)
            model = build_model(config, seed=seed)
            processor = EarthGPTProcessor.from_config(config)
        else:
            from earthgpt.weights import require_safetensors

            require_safetensors(name)  # never unpickle weights
            model = EarthGPTForConditionalGeneration.from_pretrained(name, use_safetensors=True)
            processor = EarthGPTProcessor.from_pretrained(name)
        return cls(model, processor, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any] | Any) -> torch.Tensor:
        """Visual tokens ``(N, T, D)`` of the images (reusable through ``generate(image_features=...)``)."""
        pixel_values, _ = self.processor.preprocess_images(images)
        return self.model.get_image_features(self._pixels(pixel_values))

    @torch.no_grad()
    def generate(
        self,
        images: Sequence[Any] | Any,
        prompts: Sequence[str] | str,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        *,
        image_index: Sequence[int] | None = None,
        image_features: torch.Tensor | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """Answers a batch of prompts about images.

        Args:
            images: N images (``(3, H, W)`` float in [0, 1], ``(H, W, 3)`` uint8, PIL); ignored when
                ``image_features`` is given.
            prompts: B human questions (``earthgpt.tasks.build_prompt``); the template is applied here.
            max_new_tokens: Budget per answer.
            do_sample: Sample instead of greedy decoding.
            temperature: Sampling temperature.
            image_index: Image of each prompt (default: prompt ``i`` uses image ``i``); each image is encoded once,
                and (static decoding) the prompts of one image share the prefill of their common prefix.
            image_features: Precomputed :meth:`encode_images` output, to skip the encoders.
            top_p: Nucleus sampling mass.
            seed: Seed for sampling.

        Returns:
            One :class:`Generation` per prompt, in order.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        p = self.processor
        index = list(range(len(prompts))) if image_index is None else [int(i) for i in image_index]
        if len(index) != len(prompts):
            raise ValueError(f"image_index has {len(index)} entries for {len(prompts)} prompts")
        rows = [p.encode_prompt(q) for q in prompts]
        if image_features is not None:
            features = image_features.to(self.device)
            pixel_values = None
        else:
            pixel_values, _ = p.preprocess_images(images)
            if image_index is None and pixel_values.shape[0] != len(prompts):
                raise ValueError(
                    f"{pixel_values.shape[0]} images for {len(prompts)} prompts: pass image_index"
                )
            pixel_values = self._pixels(pixel_values)
            features = None
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        sampling = (do_sample, float(temperature), float(top_p), generator)
        if self.decoding == "baseline":
            return self._generate_baseline(rows, index, pixel_values, features, max_new_tokens, sampling)
        if features is None:
            assert pixel_values is not None
            features = self.model.get_image_features(pixel_values)
        n_images = int(features.shape[0])
        if any(not 0 <= i < n_images for i in index):
            raise ValueError(f"image_index values must be in [0, {n_images})")
        return self._generate_static(rows, index, features, int(max_new_tokens), sampling)

    @torch.no_grad()
    def embed(
        self, images: Sequence[Any] | Any = None, *, image_features: torch.Tensor | None = None
    ) -> np.ndarray:
        """One embedding per image: the mean of its projected visual tokens.

        Args:
            images: N images; ignored when ``image_features`` is given.
            image_features: Precomputed :meth:`encode_images` output: encode a batch once, then pass the same
                features to :meth:`generate` and here.

        Returns:
            ``(N, D)`` float32 array, D the LLM hidden size.
        """
        features = image_features if image_features is not None else self.encode_images(images)
        return features.float().mean(dim=1).cpu().numpy().astype(np.float32)

    # ----------------------------------------------------------------------------------------------------------------
    # Baseline: one left-padded batch, lock-step, dynamic cache

    def _generate_baseline(
        self,
        rows: list[list[int]],
        index: list[int],
        pixel_values: torch.Tensor | None,
        features: torch.Tensor | None,
        max_new_tokens: int,
        sampling: tuple[bool, float, float, torch.Generator | None],
    ) -> list[Generation]:
        p = self.processor
        do_sample, temperature, top_p, generator = sampling
        ids, mask = p.pad_left(rows)
        kwargs: dict[str, Any] = (
            {"image_features": features} if features is not None else {"pixel_values": pixel_values}
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            image_index=torch.tensor(index, device=self.device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=p.stop_token_ids,
            pad_token_id=p.pad_token_id,
            generator=generator,
            **kwargs,
        )
        sequences, logprobs = out.sequences.cpu(), out.token_logprobs.float().cpu()
        results = []
        for row in range(len(rows)):
            n = int(out.n_tokens[row])
            token_ids = sequences[row, :n].tolist()
            results.append(
                Generation(
                    text=p.decode(token_ids),
                    mean_logprob=float(out.mean_logprob[row]),
                    n_tokens=n,
                    token_ids=token_ids,
                    token_logprobs=[float(x) for x in logprobs[row, :n].tolist()],
                )
            )
        return results

    # ----------------------------------------------------------------------------------------------------------------
    # Static: pre-allocated cache, shared prefixes, continuous batching, planned batches

    def _memory(self) -> tuple[int, str]:
        if self._memory_budget is not None:
            return int(self._memory_budget), "configured"
        # the kept cache of fixed-shape decoding is ours to plan with: a plan that counted it as taken would come out
        # smaller than the cache and replace it, graphs and all, on every call
        kept = self._steps.cache.nbytes if self._steps is not None else 0
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # memory PyTorch holds in its cache but no tensor uses is ours too
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(free + cached + kept) + self._weights_bytes, "cuda_free+cached+weights"
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil ships with Ray; a bare GPU machine may lack it
            available = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        return available + kept + self._weights_bytes, "ram_available+weights"

    def _plan(self, prompt_len: int, max_new_tokens: int) -> dict[str, Any]:
        memory, source = self._memory()
        plan = plan_batch(
            memory, cast(EarthGPTConfig, self.config), self.dtype, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
            tp_size=self.tp_size, weights_bytes=self._weights_bytes, max_batch=self._max_batch,
        )  # fmt: skip
        for key in ("decode_batch", "prefill_batch"):
            fixed = self._fixed[key]
            if fixed is not None:
                plan[key] = int(fixed)
            if key in self._oom_caps:
                plan[key] = min(plan[key], self._oom_caps[key])
        plan.update(
            decoding="static", memory_source=source, oom_halvings=self._oom_halvings,
            fused_projections=self._projections is not None, static_shapes=self.static_shapes,
            cuda_graphs=self.cuda_graphs,
        )  # fmt: skip
        return plan

    def _generate_static(
        self,
        rows: list[list[int]],
        index: list[int],
        features: torch.Tensor,
        max_new_tokens: int,
        sampling: tuple[bool, float, float, torch.Generator | None],
    ) -> list[Generation]:
        results: list[Generation | None] = [None] * len(rows)
        if max_new_tokens <= 0:
            return [
                Generation(text="", mean_logprob=0.0, n_tokens=0, token_ids=[], token_logprobs=[])
                for _ in rows
            ]
        self.last_stats = dict.fromkeys(
            ("prefill_tokens", "prefill_s", "decode_steps", "decode_tokens", "decode_context_tokens", "decode_s",
             "shared_prefix_tokens"), 0.0,
        )  # fmt: skip
        while True:
            todo = [i for i, r in enumerate(results) if r is None]
            if not todo:
                return [r for r in results if r is not None]
            plan = self._plan(max(len(rows[i]) for i in todo), max_new_tokens)
            self.batch_plan = plan
            try:
                with torch.inference_mode():  # no autograd bookkeeping at all: less work per dispatched op
                    self._run_static(todo, rows, index, features, max_new_tokens, sampling, plan, results)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if plan["decode_batch"] == 1 and plan["prefill_batch"] == 1:
                    raise
                # halve and retry the prompts not answered yet; later calls keep the smaller batches
                self._oom_caps = {
                    "decode_batch": max(1, plan["decode_batch"] // 2),
                    "prefill_batch": max(1, plan["prefill_batch"] // 2),
                }
                self._oom_halvings += 1
                del exc
                self.release_memory()

    def release_memory(self) -> None:
        """Frees what a failed batch left behind (the kept cache and graphs, garbage, and on CUDA the allocator's
        cached blocks)."""
        self._steps = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _run_static(
        self,
        todo: list[int],
        rows: list[list[int]],
        index: list[int],
        features: torch.Tensor,
        max_new_tokens: int,
        sampling: tuple[bool, float, float, torch.Generator | None],
        plan: dict[str, Any],
        results: list[Generation | None],
    ) -> None:
        p, model, device, stats = self.processor, self.model, self.device, self.last_stats
        do_sample, temperature, top_p, generator = sampling
        slots = min(int(plan["decode_batch"]), len(todo))
        prefill_batch = int(plan["prefill_batch"])
        queue = deque(_prefix_groups(todo, rows, index, slots))
        max_len = max(g.prefix for g in queue) + max(
            len(rows[i]) - g.prefix for g in queue for i in g.prompts
        )
        steps_runner: _DecodeSteps | None = None
        if self.static_shapes:
            steps_runner = self._decode_steps(slots, max_len + max_new_tokens, int(plan["decode_batch"]))
            cache = steps_runner.cache
            slots = cache.slots
        else:
            cache = model.new_static_cache(slots, max_len + max_new_tokens)
        stops = torch.tensor(p.stop_token_ids, device=device)
        n_rows = len(rows)
        tokens = torch.full((n_rows, max_new_tokens), p.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
        # per slot: prompt, next write position (host), tokens emitted, last token
        slot_prompt = torch.zeros(slots, dtype=torch.long, device=device)
        host_prompt = np.zeros(slots, dtype=np.int64)
        host_len = np.zeros(slots, dtype=np.int64)
        steps = torch.zeros(slots, dtype=torch.long, device=device)
        last_token = torch.zeros(slots, dtype=torch.long, device=device)
        embed_tokens = model.get_input_embeddings()
        active = 0

        def emit(logits: torch.Tensor, lo: int, hi: int) -> np.ndarray:
            if do_sample:
                token = _sample(logits / temperature, 0, top_p, generator)
            else:
                token = logits.argmax(dim=-1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
            prompt, step = slot_prompt[lo:hi], steps[lo:hi]
            tokens[prompt, step] = token
            logprobs[prompt, step] = logp
            steps[lo:hi] += 1
            last_token[lo:hi] = token
            done = torch.isin(token, stops) | (steps[lo:hi] >= max_new_tokens)
            return done.cpu().numpy()

        def retire(done: np.ndarray) -> None:
            # answers that stopped leave; the last live slots move into their places (keys and values included)
            nonlocal active
            finished = [s for s in range(active) if done[s]]
            if not finished:
                return
            prompts = [int(host_prompt[s]) for s in finished]
            counts = steps[torch.as_tensor(finished, device=device)].cpu().tolist()
            ids = tokens[prompts].cpu()
            lps = logprobs[prompts].cpu()
            for k, (i, n) in enumerate(zip(prompts, counts, strict=True)):
                token_ids = ids[k, :n].tolist()
                results[i] = Generation(
                    text=p.decode(token_ids),
                    mean_logprob=float(lps[k].sum() / max(n, 1)),
                    n_tokens=int(n),
                    token_ids=token_ids,
                    token_logprobs=[float(x) for x in lps[k, :n].tolist()],
                )
            live = active - len(finished)
            holes = [s for s in finished if s < live]
            movers = [s for s in range(live, active) if not done[s]]
            if holes:
                cache.copy_rows(movers, holes, int(host_len[movers].max()))
                src = torch.as_tensor(movers, device=device)
                dst = torch.as_tensor(holes, device=device)
                for state in (slot_prompt, steps, last_token):
                    state[dst] = state[src]
                host_prompt[holes] = host_prompt[movers]
                host_len[holes] = host_len[movers]
            active = live

        while queue or active:
            free = slots - active
            waiting = sum(len(g.prompts) for g in queue)
            if queue and (active == 0 or free >= min(prefill_batch, waiting)):
                admitted: list[_PrefixGroup] = []
                taken = 0
                while queue and taken + len(queue[0].prompts) <= free:
                    group = queue.popleft()
                    admitted.append(group)
                    taken += len(group.prompts)
                if admitted:
                    t0 = time.perf_counter()
                    logits = self._prefill(
                        admitted, active, cache, rows, features, prefill_batch, embed_tokens
                    )
                    lo = active
                    for group in admitted:
                        for i in group.prompts:
                            host_prompt[active] = i
                            host_len[active] = len(rows[i])
                            active += 1
                    slot_prompt[lo:active] = torch.as_tensor(host_prompt[lo:active], device=device)
                    steps[lo:active] = 0
                    done = np.zeros(active, dtype=bool)
                    done[lo:active] = emit(logits, lo, active)
                    stats["prefill_s"] += time.perf_counter() - t0
                    retire(done)
                    continue
            if not active:
                continue
            t0 = time.perf_counter()
            step_logits: torch.Tensor | None
            if steps_runner is not None:
                step_logits = steps_runner.step(last_token, host_len, active)
            else:
                start = torch.as_tensor(host_len[:active], device=device)
                span = int(host_len[:active].max()) + 1
                embeds = embed_tokens(last_token[:active, None])
                step_logits = model.forward_cached(
                    embeds, cache, active, start, torch.zeros_like(start), span, self._projections
                )
            assert step_logits is not None
            stats["decode_context_tokens"] += float(host_len[:active].sum() + active)
            host_len[:active] += 1
            done = emit(step_logits, 0, active)
            stats["decode_steps"] += 1
            stats["decode_tokens"] += active
            stats["decode_s"] += time.perf_counter() - t0
            retire(done)

    def _decode_steps(self, slots: int, min_len: int, max_slots: int) -> _DecodeSteps:
        """The fixed-shape decode runner: the kept one while its cache has ``slots`` to ``max_slots`` rows and at
        least ``min_len`` positions, else a new one (rows: ``slots`` rounded up to a power of two, at most
        ``max_slots``; positions: ``min_len`` rounded up to a multiple of :data:`_KEY_BUCKET`)."""
        steps = self._steps
        if steps is None or not slots <= steps.cache.slots <= max_slots or steps.cache.max_len < min_len:
            # the old cache and graphs go (by reference count) before the new cache is allocated
            steps = None
            self.release_memory()
            max_len = -(-int(min_len) // _KEY_BUCKET) * _KEY_BUCKET
            cache = self.model.new_static_cache(min(_pow2_at_least(slots), int(max_slots)), max_len)
            steps = _DecodeSteps(self.model, cache, self._projections, graphs=self.cuda_graphs)
            self._steps = steps
        return steps

    def _prefill(
        self,
        groups: list[_PrefixGroup],
        first_slot: int,
        cache: StaticKVCache,
        rows: list[list[int]],
        features: torch.Tensor,
        prefill_batch: int,
        embed_tokens: torch.nn.Module,
    ) -> torch.Tensor:
        """Prefills admitted groups into slots ``first_slot ...``: each shared prefix once, then every suffix.

        Returns the first-token logits of the admitted prompts, in slot order.
        """
        model, device, pad, stats = self.model, self.device, self.processor.pad_token_id, self.last_stats
        slot_of: list[int] = []
        for group in groups:
            slot_of.extend(range(first_slot + len(slot_of), first_slot + len(slot_of) + len(group.prompts)))
        # 1. one row per group: [BOS] <img> visual tokens </img> + the common start of its prompts
        leaders, slot = [], first_slot
        for group in groups:
            leaders.append(slot)
            slot += len(group.prompts)
        for lo in range(0, len(groups), prefill_batch):
            chunk = groups[lo : lo + prefill_batch]
            width = max(g.prefix for g in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            for r, g in enumerate(chunk):
                ids[r, : g.prefix] = torch.as_tensor(rows[g.prompts[0]][: g.prefix])
            embeds, _ = model.embed_inputs(
                ids.to(device), image_features=features, image_index=[g.image for g in chunk]
            )
            model.forward_cached(
                embeds, cache, torch.as_tensor(leaders[lo : lo + prefill_batch], device=device),
                torch.zeros(len(chunk), dtype=torch.long, device=device), None, width, self._projections,
            )  # fmt: skip
            stats["prefill_tokens"] += sum(g.prefix for g in chunk)
        # 2. the other prompts of a group start from a copy of the leader's prefix
        src: list[int] = []
        dst: list[int] = []
        longest = 0
        for group, leader in zip(groups, leaders, strict=True):
            for k in range(1, len(group.prompts)):
                src.append(leader)
                dst.append(leader + k)
                longest = max(longest, group.prefix)
                stats["shared_prefix_tokens"] += group.prefix
        cache.copy_rows(src, dst, longest)
        # 3. every prompt's own rest, right-padded
        suffixes = [(i, g.prefix) for g in groups for i in g.prompts]
        logits = []
        for lo in range(0, len(suffixes), prefill_batch):
            pieces = suffixes[lo : lo + prefill_batch]
            width = max(len(rows[i]) - start for i, start in pieces)
            ids = torch.full((len(pieces), width), pad, dtype=torch.long)
            for r, (i, start) in enumerate(pieces):
                ids[r, : len(rows[i]) - start] = torch.as_tensor(rows[i][start:])
            starts = torch.as_tensor([start for _, start in pieces], device=device)
            last = torch.as_tensor([len(rows[i]) - start - 1 for i, start in pieces], device=device)
            out = model.forward_cached(
                embed_tokens(ids.to(device)), cache, torch.as_tensor(slot_of[lo : lo + prefill_batch], device=device),
                starts, last, int(max(start for _, start in pieces)) + width, self._projections,
            )  # fmt: skip
            assert out is not None
            logits.append(out)
            stats["prefill_tokens"] += sum(len(rows[i]) - start for i, start in pieces)
        return torch.cat(logits)


@dataclass
class _PrefixGroup:
    """Prompts of one image admitted together, sharing the prefill of their first ``prefix`` tokens."""

    image: int
    prompts: list[int]
    prefix: int


_KEY_BUCKET = 64
"""Fixed-shape decode: keys attended in multiples of this many positions (and the kept cache's length)."""


def _pow2_at_least(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


class _DecodeSteps:
    """Decode steps at fixed shapes over one kept :class:`StaticKVCache`, optionally replayed as CUDA graphs.

    A step runs the first ``rows`` slots (``rows`` the live slots rounded up to a power of two, at most the cache's
    slots) over the first ``span`` keys (the longest live row plus one, rounded up to a multiple of
    :data:`_KEY_BUCKET`). Padded slots are free ones: they read token 0 at position 0 and write only there, which the
    prefill of whatever prompt takes that slot next overwrites; their logits are dropped. Live rows get the answers of
    the dynamic-shape step (the mask hides the extra keys).

    With ``graphs``, each ``(rows, span)`` step is captured once as a CUDA graph (all graphs share one memory pool;
    each step's logits are read before the next replay) and replayed: a whole decoder step in one launch.
    """

    def __init__(
        self,
        model: EarthGPTForConditionalGeneration,
        cache: StaticKVCache,
        projections: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        *,
        graphs: bool,
    ) -> None:
        self.model, self.cache, self.projections, self.graphs = model, cache, projections, graphs
        device = cache.key.device
        self.device = device
        self.tokens = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self.start = torch.zeros(cache.slots, dtype=torch.long, device=device)
        self._host_start = np.zeros(cache.slots, dtype=np.int64)
        self._embed = model.get_input_embeddings()
        self._captured: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.captures = 0

    def _forward(self, rows: int, span: int) -> torch.Tensor:
        start = self.start[:rows]
        logits = self.model.forward_cached(
            self._embed(self.tokens[:rows, None]), self.cache, rows, start, torch.zeros_like(start), span,
            self.projections,
        )  # fmt: skip
        assert logits is not None
        return logits

    def _capture(self, rows: int, span: int) -> tuple[Any, torch.Tensor]:
        # warm-up on a side stream (allocator and kernel selection), then capture; both compute this very step, so
        # the keys and values they write are the replay's own
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(rows, span)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(rows, span)
        if self._pool is None:
            self._pool = graph.pool()
        self.captures += 1
        return graph, logits

    def step(self, last_token: torch.Tensor, host_len: np.ndarray, active: int) -> torch.Tensor:
        """Next-token logits ``(active, V)`` of the live slots, whose tokens are ``last_token[:active]`` at positions
        ``host_len[:active]``."""
        cache = self.cache
        rows = min(_pow2_at_least(active), cache.slots)
        span = min(-(-(int(host_len[:active].max()) + 1) // _KEY_BUCKET) * _KEY_BUCKET, cache.max_len)
        self._host_start[:active] = host_len[:active]
        self._host_start[active:rows] = 0
        self.start[:rows].copy_(torch.from_numpy(self._host_start[:rows]))
        self.tokens[:active].copy_(last_token[:active])
        self.tokens[active:rows] = 0
        if not self.graphs:
            return self._forward(rows, span)[:active]
        entry = self._captured.get((rows, span))
        if entry is None:
            entry = self._captured[(rows, span)] = self._capture(rows, span)
        graph, logits = entry
        graph.replay()
        return logits[:active]


def _prefix_groups(
    todo: list[int], rows: list[list[int]], index: list[int], max_prompts: int
) -> list[_PrefixGroup]:
    """Groups prompts by image (first-seen order), at most ``max_prompts`` per group.

    A group's prefix is the longest common start of its prompts' ids, less at least one token per prompt (the last
    prompt token gives the first answer token's logits); it always covers the image tokens, which every prompt
    starts with.
    """
    by_image: dict[int, list[int]] = {}
    for i in todo:
        by_image.setdefault(index[i], []).append(i)
    groups = []
    for image, prompts in by_image.items():
        for lo in range(0, len(prompts), max_prompts):
            members = prompts[lo : lo + max_prompts]
            first = rows[members[0]]
            common = min(len(rows[i]) for i in members) - 1
            for i in members[1:]:
                row = rows[i]
                k = 0
                while k < common and row[k] == first[k]:
                    k += 1
                common = k
            groups.append(_PrefixGroup(image=image, prompts=members, prefix=common))
    return groups


class _float32_rotary:
    """Keeps rotary inverse frequencies in float32 while the model is cast to a 16-bit dtype.

    ``Module.to(bfloat16)`` casts every floating buffer; LLaMA's RoPE frequencies in bfloat16 err by ~0.4 %, which at
    position 300 turns the fastest rotation by about a radian. Transformers computes RoPE in float32 on purpose.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[torch.nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> _float32_rotary:
        for module in self.model.modules():
            for name in ("inv_freq", "original_inv_freq"):
                value = module._buffers.get(name)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.saved.append((module, name, value.detach().float().clone()))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, value in self.saved:
            current = module._buffers.get(name)
            device = current.device if isinstance(current, torch.Tensor) else value.device
            module._buffers[name] = value.to(device)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _deepspeed_init(
    model: EarthGPTForConditionalGeneration,
    dtype: torch.dtype,
    tp_size: int,
    kernel_inject: bool,
    device: torch.device,
) -> Any:
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type != "cuda":
        torch.nn.Module.to(model, device)
    config = {
        "dtype": dtype,
        "tensor_parallel": {"tp_size": tp_size},
        "replace_with_kernel_inject": kernel_inject,
    }
    return deepspeed.init_inference(model, config=config)
