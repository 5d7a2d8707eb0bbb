"""MMRS-1M-format instruction data -> training examples, and the collator that batches them.

MMRS-1M ships one JSON file per dataset and task (``NWPU-RESISC45_cls.json``, ``rsvg_trainval.json``, ...); each is a
list of LLaVA-style records::

    {"id": "...", "image": "relative/or/absolute/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the category of this image?"},
                       {"from": "gpt", "value": "harbor"}, ...more turns...]}

Optional keys we read when present: ``task`` (one of :data:`earthgpt.tasks.TASKS`) and ``sensor``
(``optical``/``sar``/``infrared``); otherwise the source's defaults apply (the task is guessed from the file name).

The path of a record to the model:

1. :func:`iter_raw_records` reads a source file (local or any fsspec URL such as ``s3://``; a JSON array or JSON
   lines) and yields each record as JSON text, so that a data pipeline can stream records without a schema.
2. :func:`parse_record` validates one record and resolves its image path; anything wrong raises
   :class:`MalformedRecord` with a short reason, which callers count and skip.
3. :class:`ExampleBuilder` loads the image, runs the model's :class:`~earthgpt.processor.EarthGPTProcessor` (the same
   padding, resizing and normalisation as inference) and renders the conversation with
   :func:`earthgpt.conversation.render_turns`: labels are the token ids on answer pieces and ``-100`` elsewhere
   (system line, questions, image tokens), so the loss covers answers only. Multi-turn records train on every answer.
4. :class:`Collator` right-pads a list of examples into tensors for ``EarthGPTForConditionalGeneration``.

Mixing several sources with weights: a source's ``weight`` is its sampling rate per pass (1.0 every record once,
0.25 a quarter of them, 3.0 three copies); :func:`repeat_count` rounds it stochastically and reproducibly per record
and pass.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from earthgpt.conversation import render_turns
from earthgpt.metrics import IGNORE_INDEX
from earthgpt.tasks import SENSORS, TASKS

if TYPE_CHECKING:  # torch is imported where tensors are made: record streaming stays light (no torch import)
    import torch

# File-name fragments of MMRS-1M / common RS benchmarks -> task (checked in order; first hit wins).
_TASK_HINTS: tuple[tuple[str, str], ...] = (
    ("region", "region_caption"),
    ("rsvg", "ground"),
    ("ground", "ground"),
    ("refer", "ground"),
    ("_rec", "ground"),
    ("vqa", "vqa"),
    ("_det", "detect"),
    ("detect", "detect"),
    ("_cls", "classify"),
    ("classif", "classify"),
    ("_cap", "caption"),
    ("caption", "caption"),
)
_SENSOR_ALIASES = {"optical": "optical", "rgb": "optical", "sar": "sar", "infrared": "infrared", "ir": "infrared",
                   "thermal": "infrared", "tir": "infrared"}  # fmt: skip


MALFORMED_REASONS = (
    "bad_json", "not_an_object", "no_image", "bad_turns", "bad_task", "bad_sensor", "image_unreadable", "bad_image",
    "too_long",
)  # fmt: skip
"""Every :attr:`MalformedRecord.reason` (a fixed list, so that counters can be summed across workers)."""


class MalformedRecord(ValueError):
    """A record that cannot become a training example; ``reason`` is a short category used for counting.

    Args:
        reason: Category, e.g. ``"bad_json"``, ``"no_image"``, ``"bad_turns"``, ``"image_unreadable"``,
            ``"too_long"``.
        detail: Human-readable detail.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One validated MMRS-1M record.

    Attributes:
        image: Full path or URL of the image.
        conversations: Turns as ``{"from": ..., "value": ...}`` dicts, human first, alternating.
        task: Task name (:data:`earthgpt.tasks.TASKS`) or ``None`` when unknown.
        sensor: ``optical``, ``sar`` or ``infrared``.
        source: Name of the source it came from.
        id: The record's id (or its index in the source file).
    """

    image: str
    conversations: tuple[Mapping[str, str], ...]
    task: str | None
    sensor: str
    source: str
    id: str


@dataclass
class Example:
    """A tokenised training example.

    Attributes:
        input_ids: Image prefix + rendered conversation (+ EOS).
        labels: Same length; ``-100`` outside answer tokens.
        pixel_values: ``(3, S, S)`` float32, normalised by the processor.
        record: The record it came from.
    """

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor
    record: Record


def guess_task(source_name: str) -> str | None:
    """The task a source file holds, from its name (``NWPU-RESISC45_cls.json`` -> ``classify``); ``None`` if unclear."""
    name = posixpath.basename(source_name.replace("\\", "/")).lower()
    for hint, task in _TASK_HINTS:
        if hint in name:
            return task
    return None


def normalise_sensor(value: str | None, default: str = "optical") -> str:
    """Maps sensor spellings (``thermal``, ``IR``, ``RGB``...) to :data:`earthgpt.tasks.SENSORS`.

    Raises:
        MalformedRecord: for an unknown sensor name.
    """
    if value is None or value == "":
        return default
    key = str(value).strip().lower()
    if key not in _SENSOR_ALIASES:
        raise MalformedRecord("bad_sensor", f"unknown sensor {value!r}; expected one of {SENSORS}")
    return _SENSOR_ALIASES[key]


def join_path(root: str | None, path: str) -> str:
    """Joins an image path to its root folder or URL; absolute paths and URLs are kept as they are."""
    if not root or "://" in path or path.startswith("/"):
        return path
    return root.rstrip("/") + "/" + path.removeprefix("./")


def _open(path: str, mode: str = "rb") -> Any:
    if "://" in path:
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path, mode)  # noqa: SIM115 - returned to a with-statement by the caller


def iter_raw_records(path: str) -> Iterator[str]:
    """Streams the records of one source file as JSON text, without validating them.

    Args:
        path: A local path or fsspec URL of a JSON array file (MMRS-1M) or a JSON-lines file.

    Yields:
        Each record's JSON text (a JSON-lines line as it is, even if it is not valid JSON: validation is
        :func:`parse_record`'s job).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is neither a JSON array nor JSON lines.
    """
    with _open(path, "rb") as fh:
        data = fh.read().decode("utf-8")
    stripped = data.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a valid JSON array ({exc})") from exc
        for item in items:
            yield json.dumps(item)
        return
    for line in data.splitlines():
        if line.strip():
            yield line


def count_records(path: str) -> int:
    """Number of records in a source file (reads it once)."""
    return sum(1 for _ in iter_raw_records(path))


def parse_record(
    raw: str | Mapping[str, Any],
    *,
    source: str = "",
    image_root: str | None = None,
    task: str | None = None,
    sensor: str | None = None,
    index: int | None = None,
) -> Record:
    """Validates one record and resolves its image path.

    Args:
        raw: The record as JSON text or a dict.
        source: Source name (also used to guess the task when neither the record nor ``task`` gives it).
        image_root: Folder or URL that relative image paths are relative to.
        task: The source's task, used when the record has no ``task`` key.
        sensor: The source's sensor, used when the record has no ``sensor`` key (default ``optical``).
        index: Position in the source, the id when the record has none.

    Returns:
        The :class:`Record`.

    Raises:
        MalformedRecord: not JSON, not an object, no image, turns that are missing, empty, not strings, not
            alternating human/gpt, without an answer, or an unknown task/sensor.
    """
    if isinstance(raw, (str, bytes)):
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedRecord("bad_json", str(exc)) from exc
    else:
        obj = raw
    if not isinstance(obj, Mapping):
        raise MalformedRecord("not_an_object", type(obj).__name__)
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        raise MalformedRecord("no_image", repr(image)[:80])
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise MalformedRecord("bad_turns", "conversations missing or empty")
    clean: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, Mapping)
            or not isinstance(turn.get("value"), str)
            or not isinstance(turn.get("from"), str)
        ):
            raise MalformedRecord("bad_turns", f"turn {i} is not {{'from': str, 'value': str}}")
        clean.append({"from": turn["from"], "value": turn["value"]})
    try:
        pieces = render_turns(clean)
    except ValueError as exc:
        raise MalformedRecord("bad_turns", str(exc)) from exc
    if not any(is_answer and text.strip() for text, is_answer in pieces) or any(
        is_answer and not text.strip().removesuffix("###").strip() for text, is_answer in pieces
    ):
        raise MalformedRecord("bad_turns", "no answer, or an empty answer")
    rec_task = obj.get("task", task) or guess_task(source)
    if rec_task is not None and rec_task not in TASKS:
        raise MalformedRecord("bad_task", f"unknown task {rec_task!r}")
    rec_sensor = normalise_sensor(obj.get("sensor"), default=normalise_sensor(sensor))
    rec_id = obj.get("id", obj.get("question_id", index if index is not None else ""))
    return Record(
        image=join_path(image_root, image.strip()),
        conversations=tuple(clean),
        task=rec_task,
        sensor=rec_sensor,
        source=source,
        id=str(rec_id),
    )


def load_image(path: str) -> np.ndarray:
    """Reads an image file (local or URL) as an ``(H, W, 3)`` uint8 array.

    Raises:
        MalformedRecord: ``image_unreadable`` when it cannot be opened or decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _open(path, "rb") as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MalformedRecord("image_unreadable", f"{path}: {exc}") from exc


def repeat_count(weight: float, key: Sequence[int]) -> int:
    """How many copies of a record a pass takes at sampling rate ``weight`` (stochastic rounding).

    ``floor(weight)`` copies plus one more with probability ``weight - floor(weight)``, drawn from a generator seeded
    by ``key`` (e.g. ``(seed, pass, source, record)``), so the mixture is reproducible and unbiased.

    Args:
        weight: Expected copies per pass, ``>= 0``.
        key: Integers that identify the draw.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    whole = int(np.floor(weight))
    frac = weight - whole
    if frac <= 0:
        return whole
    return whole + int(np.random.default_rng([abs(int(k)) for k in key]).random() < frac)


@dataclass
class ExampleBuilder:
    """Record -> :class:`Example` with the model's processor (images and the conversation template).

    Args:
        processor: An :class:`earthgpt.processor.EarthGPTProcessor`.
        max_length: Longest sequence in tokens. Longer multi-turn records keep their first turns that fit; a record
            whose first turn alone is too long is malformed (``too_long``).
    """

    processor: Any
    max_length: int = 512
    malformed: Counter[str] = field(default_factory=Counter)

    def __call__(self, record: Record) -> Example:
        """Builds one example.

        Raises:
            MalformedRecord: ``image_unreadable``, ``bad_image`` (not convertible to 3 channels) or ``too_long``.
        """
        image = load_image(record.image)
        try:
            pixel_values, _ = self.processor.preprocess_images([image])
        except ValueError as exc:
            raise MalformedRecord("bad_image", str(exc)) from exc
        pieces = render_turns(list(record.conversations))
        # drop whole trailing (question, answer) pairs until the sequence fits; the system line stays
        while True:
            input_ids, labels = self.processor.encode_turns(pieces)
            if len(input_ids) <= self.max_length:
                break
            if len(pieces) <= 3:
                raise MalformedRecord("too_long", f"{len(input_ids)} tokens > max_length {self.max_length}")
            pieces = pieces[:-2]
        return Example(input_ids=input_ids, labels=labels, pixel_values=pixel_values[0], record=record)

    def build_many(self, raws: Sequence[str | Mapping[str, Any]], **parse_kwargs: Any) -> list[Example]:
        """Parses and builds a batch of raw records, counting (in :attr:`malformed`) and skipping bad ones.

        Args:
            raws: Raw records (JSON text or dicts).
            **parse_kwargs: Passed to :func:`parse_record` (``source``, ``image_root``, ``task``, ``sensor``).
        """
        out = []
        for raw in raws:
            try:
                out.append(self(parse_record(raw, **parse_kwargs)))
            except MalformedRecord as exc:
                self.malformed[exc.reason] += 1
        return out


@dataclass
class Collator:
    """Right-pads examples into a model batch.

    Args:
        pad_token_id: Id used for padding ``input_ids`` (labels are padded with ``-100``, the mask with 0).
    """

    pad_token_id: int

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Returns ``{"input_ids", "attention_mask", "labels", "pixel_values"}`` (one image per row).

        Raises:
            ValueError: for an empty list.
        """
        import torch

        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(e.input_ids) for e in examples)
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e.input_ids)
            input_ids[i, :k] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[i, :k] = torch.tensor(e.labels, dtype=torch.long)
            mask[i, :k] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": torch.stack([e.pixel_values for e in examples]),
        }
