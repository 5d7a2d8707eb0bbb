"""The conversation template (SPHINX conv_v1)."""

from __future__ import annotations

import pytest

from earthgpt.conversation import SEP, SYSTEM, render_answer, render_prompt, render_turns, strip_answer


def test_prompt_is_conv_v1() -> None:
    assert render_prompt("<image>\nWhat is this?") == f"{SYSTEM}### Human: What is this?### Assistant:"
    assert SYSTEM.startswith("A chat between a curious human and an artificial intelligence assistant.")


def test_turns_concatenate_to_prompt_plus_answer() -> None:
    turns = render_turns([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "harbor"}])
    assert "".join(t for t, _ in turns) == render_prompt("Q?") + render_answer("harbor")
    assert [a for _, a in turns] == [False, False, True]
    assert turns[-1][0] == " harbor###"


def test_multi_turn_marks_each_answer() -> None:
    turns = render_turns([("human", "A?"), ("gpt", "a"), ("human", "B?"), ("gpt", "b")])
    assert [t for t, a in turns if a] == [" a###", " b###"]
    assert "".join(t for t, _ in turns).count(SEP) == 5


@pytest.mark.parametrize("bad", [[("gpt", "a")], [("human", "A"), ("human", "B")], [("robot", "x")]])
def test_bad_turns_raise(bad: list) -> None:
    with pytest.raises(ValueError):
        render_turns(bad)


def test_strip_answer_inverts_render_answer() -> None:
    assert strip_answer(render_answer("  There is <p>1 ship</p>[0.1,0.1,0.2,0.2] ")) == (
        "There is <p>1 ship</p>[0.1,0.1,0.2,0.2]"
    )
    assert strip_answer(" harbor### Human: more") == "harbor"
