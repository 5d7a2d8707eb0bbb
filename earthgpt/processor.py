"""Images and prompts -> model inputs, and generated ids -> answer text.

Images come from two places:

- ``catalogs`` sensor recipes: ``(3, H, W)`` float32 arrays (NumPy or torch) in [0, 1], any sensor (optical, SAR,
  infrared); NaN (nodata) becomes the padding value;
- MMRS-1M chips: ``(H, W, 3)`` uint8 arrays or PIL images.

Each image is centre-padded to a square of side ``max(H, W)`` (the padding is kept in a :class:`PadInfo`, which the
task parsers use to map boxes back to tile pixels), resized to ``image_size`` (bilinear, antialiased) and normalised
with ``image_mean`` / ``image_std``.

Text rows read ``[BOS] <img> <image> x T </img> {rendered prompt}``; batches are LEFT-padded for generation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from earthgpt.boxes import PadInfo
from earthgpt.conversation import SEP, render_prompt, strip_answer

IMAGE_TOKEN = "<image>"
IMAGE_START = "<img>"
IMAGE_END = "</img>"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
"""The bundled tokenizer of the small presets (``scripts/build_tokenizer.py``)."""


def bundled_tokenizer() -> Any:
    """Loads the bundled 1024-token tokenizer (offline; left padding).

    Built from ``tokenizer.json`` directly rather than ``AutoTokenizer``, so that it loads with any transformers
    version (its ``tokenizer_config.json`` is written by the installed one).
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _to_chw_float(image: Any) -> torch.Tensor:
    """One image -> ``(3, H, W)`` float32 tensor in [0, 1]."""
    if (
        hasattr(image, "convert")
        and hasattr(image, "size")
        and not isinstance(image, (np.ndarray, torch.Tensor))
    ):
        image = np.asarray(image.convert("RGB"))  # PIL
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
    else:
        t = torch.from_numpy(np.array(image))  # a copy: inputs may be read-only (PIL, memory-mapped rasters)
    if t.dim() != 3:
        raise ValueError(f"an image must be (3, H, W) or (H, W, 3), got shape {tuple(t.shape)}")
    integer = not (t.is_floating_point() or t.is_complex())
    channels_first = t.shape[0] == 3 and (t.shape[-1] != 3 or not integer)
    if not channels_first:
        if t.shape[-1] != 3:
            raise ValueError(
                f"an image must have 3 channels, got shape {tuple(t.shape)} (apply a sensor recipe that makes 3 bands)"
            )
        t = t.permute(2, 0, 1)
    if integer:
        t = t.float() / 255.0
    else:
        t = t.float()
    return torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)


class EarthGPTProcessor:
    """Holds the tokenizer and the image settings of one model.

    Args:
        tokenizer: A Hugging Face tokenizer holding ``<image>``, ``<img>``, ``</img>`` (the bundled one, or the LLaMA
            tokenizer extended by ``from_backbones``).
        image_size: Model input side, pixels.
        num_image_tokens: ``<image>`` placeholders per image (``config.num_image_tokens``).
        image_mean: Normalisation mean (``config.image_mean``).
        image_std: Normalisation std (``config.image_std``).
        pad_value: Value of the padding pixels in [0, 1] space, before normalisation.
        use_image_delimiters: Wrap the image tokens in ``<img>`` ... ``</img>``.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_size: int,
        num_image_tokens: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        pad_value: float = 0.0,
        use_image_delimiters: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.pad_value = float(pad_value)
        self.use_image_delimiters = bool(use_image_delimiters)
        ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, IMAGE_START, IMAGE_END])
        unk = tokenizer.unk_token_id
        if any(i is None or (unk is not None and i == unk) for i in ids[: 3 if use_image_delimiters else 1]):
            raise ValueError(f"the tokenizer lacks {IMAGE_TOKEN}/{IMAGE_START}/{IMAGE_END} tokens")
        self.image_token_id, self.image_start_token_id, self.image_end_token_id = (int(i) for i in ids)
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer has no BOS token")
        self.bos_token_id = int(tokenizer.bos_token_id)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self.pad_token_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Construction and persistence

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any | None = None) -> EarthGPTProcessor:
        """A processor matching a model config; ``tokenizer`` defaults to the bundled one."""
        tokenizer = tokenizer if tokenizer is not None else bundled_tokenizer()
        processor = cls(
            tokenizer,
            image_size=config.image_size,
            num_image_tokens=config.num_image_tokens,
            image_mean=config.image_mean,
            image_std=config.image_std,
            use_image_delimiters=config.image_start_token_id is not None,
        )
        if processor.image_token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_TOKEN} id {processor.image_token_id} != config.image_token_id "
                f"{config.image_token_id}"
            )
        return processor

    def to_dict(self) -> dict[str, Any]:
        """The image settings (what ``processor_config.json`` holds)."""
        return {
            "image_size": self.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "pad_value": self.pad_value,
            "use_image_delimiters": self.use_image_delimiters,
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the tokenizer files and ``processor_config.json`` into ``directory`` (next to the model)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        (path / PROCESSOR_CONFIG).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> EarthGPTProcessor:
        """Loads a processor written by :meth:`save_pretrained` (offline)."""
        from transformers import AutoTokenizer

        path = Path(directory)
        settings = json.loads((path / PROCESSOR_CONFIG).read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        return cls(tokenizer, **settings)

    # ----------------------------------------------------------------------------------------------------------------
    # Images

    def preprocess_images(self, images: Sequence[Any] | Any) -> tuple[torch.Tensor, list[PadInfo]]:
        """Pads, resizes and normalises images.

        Args:
            images: One image or a sequence: ``(3, H, W)`` float arrays/tensors in [0, 1], ``(H, W, 3)`` uint8 arrays,
                or PIL images. Sizes may differ.

        Returns:
            ``(pixel_values (N, 3, image_size, image_size) float32, [PadInfo per image])``.

        Raises:
            ValueError: an image without 3 channels or of another rank.
        """
        if (
            isinstance(images, (np.ndarray, torch.Tensor))
            and images.ndim == 3
            or not isinstance(images, (list, tuple))
            and not isinstance(images, (np.ndarray, torch.Tensor))
        ):
            images = [images]
        out, pads = [], []
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        for image in images:
            t = _to_chw_float(image)
            pad = PadInfo.for_shape(t.shape[1], t.shape[2])
            # pad to square first: MMRS-1M boxes are normalised to the padded side
            square = torch.full((3, pad.side, pad.side), self.pad_value)
            square[:, pad.top : pad.top + pad.height, pad.left : pad.left + pad.width] = t
            if pad.side != self.image_size:
                square = F.interpolate(
                    square[None], size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                    align_corners=False,
                )[0]  # fmt: skip
            out.append((square - mean) / std)
            pads.append(pad)
        if not out:
            return torch.empty(0, 3, self.image_size, self.image_size), []
        return torch.stack(out), pads

    # ----------------------------------------------------------------------------------------------------------------
    # Text

    def image_prefix_ids(self) -> list[int]:
        """``[BOS, <img>, <image> x T, </img>]``: what precedes the text of every row."""
        ids = [self.bos_token_id]
        if self.use_image_delimiters:
            ids.append(self.image_start_token_id)
        ids.extend([self.image_token_id] * self.num_image_tokens)
        if self.use_image_delimiters:
            ids.append(self.image_end_token_id)
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text piece, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, user_text: str, *, rendered: bool = False) -> list[int]:
        """Ids of one generation prompt: image prefix + the rendered template (ends with ``" Assistant:"``).

        Args:
            user_text: The human question (``earthgpt.tasks.build_prompt``), or an already rendered prompt.
            rendered: ``user_text`` is already rendered with the template.
        """
        return self.image_prefix_ids() + self.tokenize(user_text if rendered else render_prompt(user_text))

    def encode_turns(self, turns: Sequence[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Ids and labels of a training conversation (``earthgpt.conversation.render_turns`` output).

        Args:
            turns: ``[(text, is_answer), ...]``.

        Returns:
            ``(input_ids, labels)`` of equal length: image prefix + pieces (+ EOS after the last answer); labels are
            the ids on answer pieces and the EOS, -100 elsewhere.
        """
        ids = self.image_prefix_ids()
        labels = [-100] * len(ids)
        for text, is_answer in turns:
            piece = self.tokenize(text)
            ids.extend(piece)
            labels.extend(piece if is_answer else [-100] * len(piece))
        if turns and turns[-1][1]:
            ids.append(self.eos_token_id)
            labels.append(self.eos_token_id)
        return ids, labels

    def pad_left(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pads id rows into ``(input_ids, attention_mask)`` tensors."""
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
                mask[i, width - len(row) :] = 1
        return ids, mask

    def build_inputs(
        self,
        images: Sequence[Any] | Any,
        prompts: Sequence[str] | str,
        image_index: Sequence[int] | None = None,
        *,
        rendered: bool = False,
    ) -> dict[str, Any]:
        """A generation batch: each prompt paired with one image, several prompts may share an image.

        Args:
            images: N images (see :meth:`preprocess_images`); each is encoded once by the model.
            prompts: B human questions (``earthgpt.tasks.build_prompt``), rendered here with the template.
            image_index: For each prompt, the index of its image; default ``range(B)`` (needs ``N == B``).
            rendered: The prompts are already rendered with the template.

        Returns:
            ``{"input_ids": (B, L) left-padded, "attention_mask": (B, L), "pixel_values": (N, 3, S, S),
            "image_index": (B,) long, "pad_info": [PadInfo per image]}``; the first four go straight to
            ``model.generate(**...)``.

        Raises:
            ValueError: when prompts and images do not pair up.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        pixel_values, pads = self.preprocess_images(images)
        n = pixel_values.shape[0]
        index = list(range(len(prompts))) if image_index is None else [int(i) for i in image_index]
        if len(index) != len(prompts):
            raise ValueError(f"image_index has {len(index)} entries for {len(prompts)} prompts")
        if image_index is None and n != len(prompts):
            raise ValueError(f"{n} images for {len(prompts)} prompts: pass image_index to share images")
        if any(not 0 <= i < n for i in index):
            raise ValueError(f"image_index values must be in [0, {n})")
        ids, mask = self.pad_left([self.encode_prompt(p, rendered=rendered) for p in prompts])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": pixel_values,
            "image_index": torch.tensor(index, dtype=torch.long),
            "pad_info": pads,
        }

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops after EOS or the ``###`` separator (when the tokenizer has it as one token)."""
        ids = [self.eos_token_id]
        sep = self.tokenize(SEP)
        if len(sep) == 1:
            ids.append(sep[0])
        return ids

    def answer_token_ends(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """Where each generated token's text ends in the answer :meth:`decode` returns (character offsets).

        Used to map parts of an answer (a box's coordinates) back to the tokens, and so the log-probabilities,
        that wrote them. Offsets are relative to the trimmed answer: a token that only wrote leading spaces ends
        at or before 0.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = list(ids)
        raw = [self.tokenizer.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
        full = raw[-1] if raw else ""
        lead = len(full) - len(full.lstrip())
        return [len(r) - lead for r in raw]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids -> answer text (special tokens dropped, cut at the separator, trimmed)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return strip_answer(self.tokenizer.decode(list(ids), skip_special_tokens=True))
