"""benchmarks/ngram_draft.py: the draft and pass counting behind its figures (the model part is engine.py's)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def ngram() -> ModuleType:
    return load_script("ngram_draft")


def test_draft_continues_the_earliest_match_of_the_longest_tail(ngram: ModuleType) -> None:
    context = [1, 2, 3, 9, 1, 2, 3, 4, 7, 1, 2, 3]
    assert ngram.draft(context, 3) == [9, 1, 2]  # tail (1, 2, 3) first seen at 0
    assert ngram.draft([5, 6, 7], 4) == []  # the last token never appeared before
    assert ngram.draft([8, 8], 4) == [8]  # only what the context holds


def test_passes_one_per_token_without_repeats_and_fewer_on_a_loop(ngram: ModuleType) -> None:
    prompt = [100, 101, 102]
    fresh = list(range(20))
    assert ngram.passes(prompt, fresh, 8) == len(fresh)
    loop = [7] * 64
    for k in (2, 4, 8):
        n = ngram.passes(prompt, loop, k)
        assert -(-64 // (k + 1)) <= n < 64  # a pass yields at most k + 1 tokens
    assert ngram.passes(prompt, loop, 8) < ngram.passes(prompt, loop, 2)
    assert ngram.passes(prompt, [], 4) == 0
