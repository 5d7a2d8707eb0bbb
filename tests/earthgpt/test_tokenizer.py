"""The bundled tokenizer: ids the presets rely on, coverage, determinism of its build script."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from earthgpt.presets import BUNDLED_IDS, BUNDLED_VOCAB_SIZE
from earthgpt.processor import TOKENIZER_DIR, bundled_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return bundled_tokenizer()


def test_special_ids_match_presets(tok) -> None:  # type: ignore[no-untyped-def]
    assert len(tok) == BUNDLED_VOCAB_SIZE
    assert tok.unk_token_id == BUNDLED_IDS["unk"]
    assert tok.bos_token_id == BUNDLED_IDS["bos"]
    assert tok.eos_token_id == BUNDLED_IDS["eos"]
    assert tok.pad_token_id == BUNDLED_IDS["pad"]
    assert tok.convert_tokens_to_ids(["<image>", "<img>", "</img>"]) == [
        BUNDLED_IDS["image"], BUNDLED_IDS["image_start"], BUNDLED_IDS["image_end"]
    ]  # fmt: skip


def test_box_syntax_and_numbers_are_single_tokens(tok) -> None:  # type: ignore[no-untyped-def]
    for piece in ["<p>", "</p>", "###", "[", "]", ",", ";", "0.00", "0.07", "0.50", "0.99", "1.00"]:
        assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1, piece
    ids = tok("There are <p>3 ships</p>[0.12,0.40,0.18,0.47]", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 20


@pytest.mark.parametrize(
    "text",
    [
        "Many buildings and green trees are around a playground.",
        "An overexposed cumulonimbus straddles the archipelago; façade, 東京, ☃ and emoji 🛰️.",
        "There are <p>2 storage tanks</p>[0.10,0.20,0.30,0.40;0.5,0.5,1,1]",
    ],
)
def test_any_text_round_trips_without_unknown(tok, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_build_script_reproduces_the_committed_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_tokenizer"] = module
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path)]) == 0
    committed = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert rebuilt == committed
