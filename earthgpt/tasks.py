"""One template set and one parser set for EarthGPT's tasks, used for training targets and inference alike.

Tasks: ``classify`` (scene classification), ``caption``, ``region_caption``, ``vqa``, ``ground`` (visual grounding /
referring expression comprehension) and ``detect`` (object detection), for ``optical``, ``sar`` and ``infrared``
images.

- :func:`build_prompt` writes the human question (the conversation template is applied later, see
  :mod:`earthgpt.conversation`).
- :func:`format_answer` writes the answer in the MMRS-1M style. Boxes are normalised to the side of the image
  centre-padded to a square (``max(h, w)``), two decimals, ``[x1,y1,x2,y2]``; several boxes of one class are joined
  by ``;`` and sorted by ``y1`` then ``x1``; detections read ``There are <p>3 ships</p>[0.12,0.40,0.18,0.47;...]``,
  one ``<p>..</p>[..]`` group per class (classes in alphabetical order) joined by ``" and "``.
- :func:`parse_answer` turns model text back into a :class:`ParsedAnswer`, boxes in tile pixel coordinates (the
  padding undone exactly, clamped to the tile). It never raises on model text: malformed boxes are dropped and
  counted in ``n_malformed``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from earthgpt.boxes import Box, PadInfo, format_box
from earthgpt.conversation import SEP

TASKS = ("classify", "caption", "region_caption", "vqa", "ground", "detect")
"""Task names accepted by every function here."""

SENSORS = ("optical", "sar", "infrared")
"""Sensor names accepted by :func:`build_prompt`."""

BOX_TASKS = frozenset({"region_caption", "ground", "detect"})
"""Tasks whose prompt or answer holds boxes, so they need the image shape."""

SENSOR_NOUNS = {
    "optical": "optical remote sensing image",
    "sar": "SAR image",
    "infrared": "infrared image",
}
"""How each sensor's image is named in the questions."""

TEMPLATES = {
    "classify": "What is the category of this {image}? Answer the question using a single word or phrase.",
    "classify_choices": "Classify this {image} into one of the following classes: {choices}. "
    "Answer the question using a single word or phrase.",
    "caption": "Describe this {image} in one sentence.",
    "region_caption": "Describe the region {box} of this {image} in one sentence.",
    "vqa": "{question} Answer the question using a single word or phrase.",
    "ground": "Output the bounding box of the following object in this {image}: {description}",
    "detect": "Detect all objects in this {image} and output their bounding boxes.",
    "detect_labels": "Detect all {labels} in this {image} and output their bounding boxes.",
}
"""The question templates; ``{image}`` is filled from :data:`SENSOR_NOUNS`."""

NO_OBJECTS = "There are no objects."
"""Detection answer for an image without objects."""

# Plural forms that the suffix rules below get wrong, and nouns whose plural is themselves.
_IRREGULAR_PLURALS = {"person": "people", "bus": "buses", "gas": "gases", "child": "children"}
_INVARIANT_NOUNS = {"aircraft", "series", "species", "chassis", "sheep", "fish"}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}


@dataclass
class ParsedAnswer:
    """Structured result of :func:`parse_answer`.

    Attributes:
        task: The task the text was parsed as.
        text: The answer text, cut at the separator and trimmed (for caption, region caption and VQA: the result).
        label: ``classify``: the normalised class label (snapped to ``choices`` when given); else ``None``.
        boxes: ``detect``: every well-formed box; ``ground``: the first well-formed box. Tile pixel coordinates.
        counts: ``detect``: the object count the text states per (singular) label, e.g. ``{"ship": 3}``.
        n_malformed: Boxes (and ``<p>`` phrases) that could not be parsed and were dropped.
        box_spans: ``detect`` / ``ground``: for each of ``boxes``, the ``(start, end)`` character span of its
            coordinates in ``text`` (what :func:`span_confidence` scores a box by).
    """

    task: str
    text: str
    label: str | None = None
    boxes: list[Box] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    n_malformed: int = 0
    box_spans: list[tuple[int, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Nouns


def plural(noun: str) -> str:
    """English plural of a class name; only the last word changes (``storage tank`` -> ``storage tanks``).

    Args:
        noun: A singular noun phrase, e.g. ``"ship"``, ``"airplane"``, ``"storage tank"``, ``"overpass"``.

    Returns:
        The plural phrase (``"ships"``, ``"airplanes"``, ``"storage tanks"``, ``"overpasses"``).
    """
    words = noun.strip().split(" ")
    last = words[-1]
    lower = last.lower()
    if lower in _INVARIANT_NOUNS:
        new = last
    elif lower in _IRREGULAR_PLURALS:
        new = _IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        new = last + "es"
    elif lower.endswith("y") and len(lower) > 1 and lower[-2] not in "aeiou":
        new = last[:-1] + "ies"
    else:
        new = last + "s"
    return " ".join([*words[:-1], new])


def singular(noun: str) -> str:
    """English singular of a (possibly plural) class name; the inverse of :func:`plural` on class names.

    Args:
        noun: ``"ships"``, ``"storage tanks"``, ``"ship"`` (already singular: returned as is).

    Returns:
        The singular phrase.
    """
    words = noun.strip().split(" ")
    last = words[-1]
    lower = last.lower()
    if lower in _INVARIANT_NOUNS or lower in _IRREGULAR_PLURALS:
        new = last
    elif lower in _IRREGULAR_SINGULARS:
        new = _IRREGULAR_SINGULARS[lower]
    elif lower.endswith("ies") and len(lower) > 3:
        new = last[:-3] + "y"
    elif lower.endswith(("sses", "xes", "zes", "ches", "shes")):
        new = last[:-2]
    elif lower.endswith("s") and not lower.endswith(("ss", "us", "is")):
        new = last[:-1]
    else:
        new = last
    return " ".join([*words[:-1], new])


def count_phrase(n: int, label: str) -> str:
    """``"1 ship"``, ``"3 ships"``, ``"0 storage tanks"``."""
    return f"{n} {label if n == 1 else plural(label)}"


# --------------------------------------------------------------------------------------------------------------------
# Prompts


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _pad_for(image_hw: Sequence[int] | None, task: str) -> PadInfo:
    if image_hw is None:
        raise ValueError(f"task {task!r} needs image_hw=(height, width) to normalise boxes")
    return PadInfo.for_shape(int(image_hw[0]), int(image_hw[1]))


def _join_words(words: Sequence[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def build_prompt(
    task: str,
    sensor: str = "optical",
    *,
    question: str | None = None,
    description: str | None = None,
    box: Box | Sequence[float] | None = None,
    image_hw: Sequence[int] | None = None,
    labels: Sequence[str] | None = None,
    choices: Sequence[str] | None = None,
) -> str:
    """Writes the human question for one task on one image.

    Args:
        task: One of :data:`TASKS`.
        sensor: One of :data:`SENSORS`; names the image in the question.
        question: ``vqa``: the question.
        description: ``ground``: the referring expression.
        box: ``region_caption``: the region, tile pixel ``(x1, y1, x2, y2)`` or a :class:`Box`.
        image_hw: ``region_caption``: the tile's ``(height, width)``, to normalise ``box``.
        labels: ``detect``: restrict to these classes (singular names); all objects when ``None``.
        choices: ``classify``: the candidate classes, listed in the question when given.

    Returns:
        The question text (no template, no image placeholder).

    Raises:
        ValueError: unknown task or sensor, or a keyword the task needs is missing.
    """
    _check_task(task)
    if sensor not in SENSOR_NOUNS:
        raise ValueError(f"unknown sensor {sensor!r}; expected one of {SENSORS}")
    image = SENSOR_NOUNS[sensor]
    if task == "classify":
        if choices:
            return TEMPLATES["classify_choices"].format(image=image, choices=", ".join(choices))
        return TEMPLATES["classify"].format(image=image)
    if task == "caption":
        return TEMPLATES["caption"].format(image=image)
    if task == "region_caption":
        if box is None:
            raise ValueError("region_caption needs box=(x1, y1, x2, y2)")
        coords = box.as_tuple() if isinstance(box, Box) else tuple(float(v) for v in box)
        text = "[" + format_box(_pad_for(image_hw, task), *coords) + "]"
        return TEMPLATES["region_caption"].format(image=image, box=text)
    if task == "vqa":
        if not question:
            raise ValueError("vqa needs question=...")
        return TEMPLATES["vqa"].format(question=question.strip())
    if task == "ground":
        if not description:
            raise ValueError("ground needs description=...")
        return TEMPLATES["ground"].format(image=image, description=description.strip())
    # detect
    if labels:
        return TEMPLATES["detect_labels"].format(image=image, labels=_join_words([plural(x) for x in labels]))
    return TEMPLATES["detect"].format(image=image)


# --------------------------------------------------------------------------------------------------------------------
# Answers


def _as_box(item: Any, default_label: str = "") -> Box:
    if isinstance(item, Box):
        return item
    if isinstance(item, Mapping):
        coords = item.get("bbox", item.get("box"))
        if coords is None:
            coords = [item["x1"], item["y1"], item["x2"], item["y2"]]
        x1, y1, x2, y2 = (float(v) for v in coords)
        return Box(str(item.get("label", default_label)), x1, y1, x2, y2)
    values = list(item)
    if len(values) == 5:
        return Box(str(values[0]), *(float(v) for v in values[1:]))
    if len(values) == 4:
        return Box(default_label, *(float(v) for v in values))
    raise ValueError(f"cannot read a box from {item!r}")


def _sorted_box_texts(pad: PadInfo, boxes: Sequence[Box]) -> list[str]:
    texts = [format_box(pad, *b.as_tuple()) for b in boxes]
    # sort on the written (rounded) values so the order is the one a reader of the text sees: y1, then x1
    return sorted(texts, key=lambda t: tuple(float(v) for v in (t.split(",")[i] for i in (1, 0, 3, 2))))


def format_answer(task: str, target: Any, image_hw: Sequence[int] | None = None) -> str:
    """Writes the answer the model is trained to give, in the MMRS-1M style.

    Args:
        task: One of :data:`TASKS`.
        target: ``classify``: the class label; ``caption`` / ``region_caption`` / ``vqa``: the text; ``ground``:
            one box; ``detect``: a sequence of boxes. A box is a :class:`Box`, ``(label, x1, y1, x2, y2)``,
            ``(x1, y1, x2, y2)`` or ``{"label": ..., "bbox": [x1, y1, x2, y2]}``, in tile pixel coordinates.
        image_hw: The tile's ``(height, width)``; needed by ``ground`` and ``detect``.

    Returns:
        The answer text (without the template's leading space and separator).

    Raises:
        ValueError: unknown task, missing ``image_hw``, or a target that is not a box where one is needed.
    """
    _check_task(task)
    if task in ("classify", "caption", "region_caption", "vqa"):
        return " ".join(str(target).split())
    pad = _pad_for(image_hw, task)
    if task == "ground":
        return "[" + format_box(pad, *_as_box(target).as_tuple()) + "]"
    boxes = [_as_box(b) for b in target]
    if not boxes:
        return NO_OBJECTS
    groups: dict[str, list[Box]] = {}
    for b in boxes:
        groups.setdefault(singular(b.label.strip().lower()) or "object", []).append(b)
    parts = []
    for label in sorted(groups):
        members = groups[label]
        parts.append(
            f"<p>{count_phrase(len(members), label)}</p>[" + ";".join(_sorted_box_texts(pad, members)) + "]"
        )
    first = len(groups[sorted(groups)[0]])
    return f"There {'is' if first == 1 else 'are'} " + " and ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Parsers

_NUMBER_RE = re.compile(r"^\s*(\d{1,6}(?:\.\d*)?|\.\d+)\s*$")
_GROUP_RE = re.compile(r"<p>(?P<phrase>[^<>\[\]]*)</p>\s*(?:\[(?P<boxes>[^\[\]<>]*)(?P<close>\]|$))?")
_BRACKET_RE = re.compile(r"\[(?P<boxes>[^\[\]]*)\]")
_COUNT_RE = re.compile(r"^\s*(\d{1,6})\s+(.*?)\s*$")
_SPACES_RE = re.compile(r"\s+")


def _parse_box(text: str, pad: PadInfo, label: str) -> Box | None:
    parts = text.split(",")
    if len(parts) != 4:
        return None
    values = []
    for part in parts:
        m = _NUMBER_RE.match(part)
        if m is None:
            return None
        values.append(min(max(float(m.group(1)), 0.0), 1.0))
    x1, y1, x2, y2 = pad.denormalise(*values)
    if not (x2 > x1 and y2 > y1):
        return None
    return Box(label, x1, y1, x2, y2)


def _parse_box_list(
    text: str, pad: PadInfo, label: str, offset: int = 0, spans: list[tuple[int, int]] | None = None
) -> tuple[list[Box], int]:
    boxes: list[Box] = []
    bad = 0
    if not text.strip():
        return boxes, bad
    start = 0
    for chunk in text.split(";"):
        chunk_start, start = start, start + len(chunk) + 1
        if not chunk.strip():
            continue
        box = _parse_box(chunk, pad, label)
        if box is None:
            bad += 1
        else:
            boxes.append(box)
            if spans is not None:
                lead = len(chunk) - len(chunk.lstrip())
                spans.append((offset + chunk_start + lead, offset + chunk_start + len(chunk.rstrip())))
    return boxes, bad


def span_confidence(
    spans: Sequence[tuple[int, int]], token_ends: Sequence[int], token_logprobs: Sequence[float]
) -> list[float]:
    """Per-span confidence: ``exp`` of the mean log-probability of the generated tokens that wrote each span.

    The model writes boxes as text, so a box's own confidence is how sure the model was of the tokens of its
    coordinates (``0.12,0.40,0.18,0.47``), not of the whole answer.

    Args:
        spans: ``(start, end)`` character spans in the answer text (e.g. :attr:`ParsedAnswer.box_spans`).
        token_ends: For each generated token, the end offset of its text in the answer text (a token before the
            answer starts has an end <= 0; offsets past the answer are fine).
        token_logprobs: Log-probability of each generated token, aligned with ``token_ends``.

    Returns:
        One confidence in ``(0, 1]`` per span (NaN for a span no token covers).
    """
    out: list[float] = []
    starts = [0, *token_ends[:-1]]
    for a, b in spans:
        picked = [lp for s, e, lp in zip(starts, token_ends, token_logprobs, strict=False) if e > a and s < b]
        out.append(float(math.exp(sum(picked) / len(picked))) if picked else math.nan)
    return out


def normalise_label(text: str) -> str:
    """A class label as the parsers report it: lower case, ``_`` as space, single spaces, no final full stop."""
    text = text.replace("_", " ").strip().rstrip(".").strip().lower()
    return _SPACES_RE.sub(" ", text)


def _snap(label: str, choices: Sequence[str] | None) -> str:
    if not choices:
        return label
    normal = {normalise_label(c): c for c in choices}
    if label in normal:
        return normalise_label(normal[label])
    contained = [c for c in normal if c and c in label]
    if contained:
        return max(contained, key=len)
    return label


def parse_answer(
    task: str, text: str, image_hw: Sequence[int] | None = None, *, choices: Sequence[str] | None = None
) -> ParsedAnswer:
    """Parses model text for one task. Never raises on the text itself.

    Args:
        task: One of :data:`TASKS`.
        text: Generated text (anything after the first ``###`` separator is ignored).
        image_hw: The tile's ``(height, width)``; needed by ``ground`` and ``detect``.
        choices: ``classify``: candidate classes to snap the label to.

    Returns:
        A :class:`ParsedAnswer`; boxes in tile pixel coordinates, the centre padding undone and clamped to the tile.

    Raises:
        ValueError: unknown task, or ``image_hw`` missing for a box task (programming errors, not model text).
    """
    _check_task(task)
    answer = text.split(SEP, 1)[0].strip()
    if task in ("caption", "region_caption", "vqa"):
        return ParsedAnswer(task=task, text=answer)
    if task == "classify":
        return ParsedAnswer(task=task, text=answer, label=_snap(normalise_label(answer), choices))
    pad = _pad_for(image_hw, task)
    if task == "ground":
        bad = 0
        for m in _BRACKET_RE.finditer(answer):
            spans: list[tuple[int, int]] = []
            boxes, n_bad = _parse_box_list(m.group("boxes"), pad, "", m.start("boxes"), spans)
            if boxes:
                return ParsedAnswer(task=task, text=answer, boxes=boxes[:1], n_malformed=bad + n_bad,
                                    box_spans=spans[:1])
            bad += max(n_bad, 1)
        return ParsedAnswer(task=task, text=answer, n_malformed=bad)
    # detect
    result = ParsedAnswer(task=task, text=answer)
    for m in _GROUP_RE.finditer(answer):
        phrase = _SPACES_RE.sub(" ", m.group("phrase")).strip()
        cm = _COUNT_RE.match(phrase)
        noun = cm.group(2) if cm else phrase
        label = singular(normalise_label(noun))
        if not label:
            result.n_malformed += 1
            continue
        if cm:
            result.counts[label] = result.counts.get(label, 0) + int(cm.group(1))
        if m.group("boxes") is not None:
            body = m.group("boxes")
            if not m.group("close"):
                # generation stopped inside the list: the last, unfinished box is malformed, the others count
                body, _, tail = body.rpartition(";")
                if tail.strip():
                    result.n_malformed += 1
            boxes, n_bad = _parse_box_list(body, pad, label, m.start("boxes"), result.box_spans)
            result.boxes.extend(boxes)
            result.n_malformed += n_bad
    return result
