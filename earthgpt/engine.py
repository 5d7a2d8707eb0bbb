"""One inference adapter over the model: plain PyTorch or DeepSpeed-inference, same ``generate`` either way.

``InferenceEngine(model, processor, kind="deepspeed", dtype=torch.bfloat16, tp_size=1, kernel_inject=True)`` wraps
the model with ``deepspeed.init_inference`` (tensor parallelism, dtype and kernel injection from the arguments;
kernel injection and fp16 need a GPU). On CPU, set ``DS_ACCELERATOR=cpu`` (the engine sets it when no CUDA is present
and the variable is unset).

Batches: ``generate(images, prompts, image_index=...)`` encodes each image once, however many prompts use it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.processor import EarthGPTProcessor

ENGINE_KINDS = ("plain", "deepspeed")


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


class InferenceEngine:
    """Runs EarthGPT for inference, plainly or through DeepSpeed-inference.

    Args:
        model: The model (moved to ``device`` and ``dtype`` here, put in eval mode).
        processor: Its processor.
        kind: ``"plain"`` or ``"deepspeed"``.
        dtype: Weight dtype (float32, bfloat16; float16 on GPU only).
        tp_size: DeepSpeed tensor-parallel size (``deepspeed`` launcher with that many ranks).
        kernel_inject: DeepSpeed fused-kernel injection (GPU only).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.

    Raises:
        ValueError: unknown kind, or kernel injection / fp16 requested without a GPU.
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
    ) -> None:
        if kind not in ENGINE_KINDS:
            raise ValueError(f"kind must be one of {ENGINE_KINDS}, got {kind!r}")
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
        self.kind = kind
        self.dtype = dtype
        self.tp_size = int(tp_size)
        self.kernel_inject = bool(kernel_inject)
        self.processor = processor
        self.config = model.config
        model = model.eval()
        if kind == "plain":
            torch.nn.Module.to(model, device=self.device, dtype=dtype)
            self.model = model
            self._ds_engine = None
        else:
            # module-replacing engines would drop the stage-3 hooks: fold them into the weights first
            model.merge_shift_parameters()
            self._ds_engine = _deepspeed_init(model, dtype, self.tp_size, self.kernel_inject, self.device)
            self.model = self._ds_engine.module

    @classmethod
    def from_pretrained(cls, path_or_preset: str | Path, *, seed: int = 0, **kwargs: Any) -> InferenceEngine:
        """An engine for a saved model folder, or for a preset with random weights.

        Args:
            path_or_preset: A folder written by ``model.save_pretrained`` + ``processor.save_pretrained``, or a
                preset name (``tiny``, ``small``, ``paper``; ``earthgpt_tiny`` ...) for a random-weight model.
            seed: Weight seed for presets.
            **kwargs: :class:`InferenceEngine` arguments (``kind``, ``dtype``, ``device``, ...).
        """
        from earthgpt.presets import PRESETS, build_model, preset_config

        name = str(path_or_preset)
        if name.removeprefix("earthgpt_").removeprefix("earthgpt-") in PRESETS and not Path(name).exists():
            config = preset_config(name)
            model = build_model(config, seed=seed)
            processor = EarthGPTProcessor.from_config(config)
        else:
            model = EarthGPTForConditionalGeneration.from_pretrained(name)
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
            image_index: Image of each prompt (default: prompt ``i`` uses image ``i``); each image is encoded once.
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
        p = self.processor
        index = list(range(len(prompts))) if image_index is None else [int(i) for i in image_index]
        ids, mask = p.pad_left([p.encode_prompt(q) for q in prompts])
        kwargs: dict[str, Any] = {}
        if image_features is not None:
            kwargs["image_features"] = image_features.to(self.device)
        else:
            pixel_values, _ = p.preprocess_images(images)
            if image_index is None and pixel_values.shape[0] != len(prompts):
                raise ValueError(
                    f"{pixel_values.shape[0]} images for {len(prompts)} prompts: pass image_index"
                )
            kwargs["pixel_values"] = self._pixels(pixel_values)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
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
        results = []
        for row in range(len(prompts)):
            n = int(out.n_tokens[row])
            token_ids = out.sequences[row, :n].tolist()
            results.append(
                Generation(
                    text=p.decode(token_ids),
                    mean_logprob=float(out.mean_logprob[row]),
                    n_tokens=n,
                    token_ids=token_ids,
                    token_logprobs=[float(x) for x in out.token_logprobs[row, :n].tolist()],
                )
            )
        return results

    @torch.no_grad()
    def embed(self, images: Sequence[Any] | Any = None, *, image_features: torch.Tensor | None = None) -> np.ndarray:
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
