"""The conversation template EarthGPT is tuned and prompted with (SPHINX / LLaMA2-Accessory ``conv_v1``).

A rendered single-turn prompt reads::

    A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed,
    and polite answers to the human's questions.### Human: What is the category of this SAR image?### Assistant:

and the answer the model is trained to produce (and generation stops after) is ``" harbor###"``.

The image is not part of the text: the processor puts ``[BOS] <img> visual tokens </img>`` in front of the rendered
text (DESIGN §3), so the ``<image>`` placeholder of MMRS-1M / LLaVA records is removed here.

This module is the single source of the template for training targets (``earthgpt.data``) and inference prompts
(``earthgpt.processor``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""System line of SPHINX's ``conv_v1`` template."""

ROLES = ("Human", "Assistant")
"""Speaker names: the user, then the model."""

SEP = "###"
"""Separator that closes the system line and every turn; the model ends each answer with it."""

IMAGE_PLACEHOLDER = "<image>"
"""Placeholder of LLaVA-style records (``"<image>\\n<question>"``); removed from the text by :func:`clean_user_text`."""

_HUMAN_SOURCES = {"human", "user", ROLES[0].lower()}
_ASSISTANT_SOURCES = {"gpt", "assistant", "model", ROLES[1].lower()}
_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(IMAGE_PLACEHOLDER) + r"\s*")


def clean_user_text(text: str) -> str:
    """Removes the ``<image>`` placeholder (and the newline around it) from a human turn.

    Args:
        text: The human turn as stored in a record, e.g. ``"<image>\\nWhat is in this image?"``.

    Returns:
        The question alone, whitespace-trimmed.
    """
    return _PLACEHOLDER_RE.sub(" ", text).strip()


def render_prompt(user_text: str) -> str:
    """Renders a one-turn prompt, ending where the model starts answering.

    Args:
        user_text: The human question (``earthgpt.tasks.build_prompt`` output); an ``<image>`` placeholder, if any, is
            dropped.

    Returns:
        ``"{SYSTEM}### Human: {question}### Assistant:"``.
    """
    return f"{SYSTEM}{SEP} {ROLES[0]}: {clean_user_text(user_text)}{SEP} {ROLES[1]}:"


def render_answer(answer_text: str) -> str:
    """Renders one answer as the model must produce it: a leading space, the text, then the separator."""
    return f" {answer_text.strip()}{SEP}"


def strip_answer(generated: str) -> str:
    """Cuts generated text at the first separator and trims it: the inverse of :func:`render_answer`."""
    return generated.split(SEP, 1)[0].strip()


def render_turns(
    conversations: Sequence[Mapping[str, str]] | Sequence[tuple[str, str]],
) -> list[tuple[str, bool]]:
    """Renders a multi-turn conversation as text pieces, each flagged as answer (trained on) or not.

    The concatenation of the pieces is exactly the text of the conversation; for a single turn it is
    ``render_prompt(q) + render_answer(a)``. Tokenise each piece separately (no special tokens) and set the labels
    of non-answer pieces to -100.

    Args:
        conversations: LLaVA-style turns ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]``
            or ``(role, text)`` pairs; roles ``human``/``user`` and ``gpt``/``assistant`` (case-insensitive).
            Turns must alternate, starting with the human.

    Returns:
        ``[(text, is_answer), ...]``: the system line and each question (with the ``" Assistant:"`` cue) are not
        answers; each answer (with its trailing separator) is.

    Raises:
        ValueError: if the turns do not alternate human/assistant starting with the human, or a role is unknown.
    """
    pieces: list[tuple[str, bool]] = [(f"{SYSTEM}{SEP}", False)]
    expect_human = True
    for i, turn in enumerate(conversations):
        if isinstance(turn, Mapping):
            role, text = str(turn.get("from", "")), str(turn.get("value", ""))
        else:
            role, text = turn
        role = role.lower()
        if role in _HUMAN_SOURCES:
            is_human = True
        elif role in _ASSISTANT_SOURCES:
            is_human = False
        else:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected human/gpt)")
        if is_human != expect_human:
            raise ValueError(f"turn {i}: expected a {'human' if expect_human else 'gpt'} turn, got {role!r}")
        if is_human:
            pieces.append((f" {ROLES[0]}: {clean_user_text(text)}{SEP} {ROLES[1]}:", False))
        else:
            pieces.append((render_answer(text), True))
        expect_human = not expect_human
    return pieces
