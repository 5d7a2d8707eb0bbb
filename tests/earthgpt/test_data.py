"""MMRS-1M records -> examples: validation, answer-only labels, multi-turn, truncation, collation, mixing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from earthgpt import data as D
from earthgpt.conversation import SEP
from earthgpt.metrics import IGNORE_INDEX, answer_token_nll
from earthgpt.presets import build_model, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor

Q_DET = "<image>\nDetect all objects in this SAR image and output their bounding boxes."
A_DET = "There are <p>2 ships</p>[0.12,0.40,0.18,0.47;0.50,0.51,0.60,0.62]"


@pytest.fixture
def chip(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "chips" / "a.png"
    path.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)).save(path)
    return path


def _rec(**kw: object) -> dict:
    base: dict = {"id": "r1", "image": "chips/a.png",
                  "conversations": [{"from": "human", "value": Q_DET}, {"from": "gpt", "value": A_DET}]}  # fmt: skip
    base.update(kw)
    return base


def test_parse_record_resolves_and_defaults(tmp_path: Path) -> None:
    rec = D.parse_record(
        json.dumps(_rec()), source="SSDD_det_train.json", image_root=str(tmp_path), sensor="thermal"
    )
    assert rec.image == f"{tmp_path}/chips/a.png"
    assert rec.task == "detect"  # guessed from the file name
    assert rec.sensor == "infrared"
    assert rec.id == "r1"
    # the record's own keys win over the source's; absolute paths and URLs stay as they are
    rec = D.parse_record(
        _rec(task="vqa", sensor="SAR", image="s3://b/x.png"), source="x_cls.json", image_root="/r"
    )
    assert (rec.task, rec.sensor, rec.image) == ("vqa", "sar", "s3://b/x.png")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "not_an_object"),
        (json.dumps(_rec(image="")), "no_image"),
        (json.dumps(_rec(conversations=[])), "bad_turns"),
        (
            json.dumps(_rec(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "q"}])),
            "bad_turns",
        ),
        (json.dumps(_rec(conversations=[{"from": "human", "value": "q"}])), "bad_turns"),  # no answer
        (
            json.dumps(_rec(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}])),
            "bad_turns",
        ),
        (
            json.dumps(_rec(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}])),
            "bad_turns",
        ),
        (json.dumps(_rec(task="segment")), "bad_task"),
        (json.dumps(_rec(sensor="lidar")), "bad_sensor"),
    ],
)
def test_parse_record_rejects_malformed(raw: str, reason: str) -> None:
    with pytest.raises(D.MalformedRecord) as info:
        D.parse_record(raw, source="x_det.json")
    assert info.value.reason == reason


def test_guess_task_from_mmrs_file_names() -> None:
    assert D.guess_task("NWPU-RESISC45_cls.json") == "classify"
    assert D.guess_task("rsvg_trainval.json") == "ground"
    assert D.guess_task("/data/DIOR_det.json") == "detect"
    assert D.guess_task("RSVQA-HR_vqa.json") == "vqa"
    assert D.guess_task("NWPU-Captions_cap.json") == "caption"
    assert D.guess_task("misc.json") is None
    # the toy world's caption files mix into training like the other tasks, by file name alone if need be
    assert D.guess_task("toyworld_cap_train.json") == "caption"
    assert D.guess_task("toyworld_region_cap_train.json") == "region_caption"


def test_iter_raw_records_reads_arrays_and_json_lines(tmp_path: Path) -> None:
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([_rec(id="1"), _rec(id="2")]))
    assert [json.loads(r)["id"] for r in D.iter_raw_records(str(arr))] == ["1", "2"]
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps(_rec(id="1")) + "\n{broken\n\n" + json.dumps(_rec(id="3")) + "\n")
    raws = list(D.iter_raw_records(str(lines)))
    assert len(raws) == 3 and raws[1] == "{broken"  # passed on raw: parse_record counts it as malformed
    assert D.count_records(str(lines)) == 3


def test_example_labels_cover_answers_only(processor: EarthGPTProcessor, chip: Path) -> None:
    builder = D.ExampleBuilder(processor, max_length=512)
    ex = builder(D.parse_record(_rec(), image_root=str(chip.parent.parent)))
    assert len(ex.input_ids) == len(ex.labels)
    prefix = processor.image_prefix_ids()
    assert ex.input_ids[: len(prefix)] == prefix
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    # exactly the answer, its separator and EOS carry loss; the image, system line and question do not
    assert processor.tokenizer.decode(labelled[:-1]).strip() == A_DET + SEP
    assert labelled[-1] == processor.eos_token_id
    assert all(lab == IGNORE_INDEX for lab in ex.labels[: len(prefix) + 10])
    # the image goes through the inference processor unchanged
    expected, _ = processor.preprocess_images([np.asarray(Image.open(chip).convert("RGB"))])
    torch.testing.assert_close(ex.pixel_values, expected[0])


def test_multi_turn_trains_every_answer_and_truncates_whole_turns(
    processor: EarthGPTProcessor, chip: Path
) -> None:
    turns = [
        {"from": "human", "value": "<image>\nWhat is the category of this image?"},
        {"from": "gpt", "value": "harbor"},
        {"from": "human", "value": Q_DET},
        {"from": "gpt", "value": A_DET},
    ]
    rec = D.parse_record(_rec(conversations=turns), image_root=str(chip.parent.parent))
    full = D.ExampleBuilder(processor, max_length=512)(rec)
    text = processor.tokenizer.decode([t for t in full.labels if t != IGNORE_INDEX])
    assert "harbor" in text and "0.12,0.40" in text
    # a budget that fits only the first turn keeps it whole and drops the second
    first_only = D.ExampleBuilder(processor, max_length=len(full.input_ids) - 5)(rec)
    text = processor.tokenizer.decode([t for t in first_only.labels if t != IGNORE_INDEX])
    assert "harbor" in text and "0.12" not in text
    with pytest.raises(D.MalformedRecord, match="too_long"):
        D.ExampleBuilder(processor, max_length=len(processor.image_prefix_ids()) + 3)(rec)


def test_build_many_counts_and_skips_malformed(processor: EarthGPTProcessor, chip: Path) -> None:
    builder = D.ExampleBuilder(processor, max_length=512)
    raws = [
        json.dumps(_rec()),
        "{oops",
        json.dumps(_rec(image="chips/missing.png")),
        json.dumps(_rec(id="2")),
    ]
    out = builder.build_many(raws, image_root=str(chip.parent.parent))
    assert len(out) == 2
    assert builder.malformed == {"bad_json": 1, "image_unreadable": 1}


def test_collator_pads_right_and_model_loss_is_answer_only(processor: EarthGPTProcessor, chip: Path) -> None:
    builder = D.ExampleBuilder(processor, max_length=512)
    root = str(chip.parent.parent)
    short = _rec(
        conversations=[{"from": "human", "value": Q_DET}, {"from": "gpt", "value": "There are no objects."}]
    )
    examples = builder.build_many([json.dumps(_rec()), json.dumps(short)], image_root=root)
    batch = D.Collator(processor.pad_token_id)(examples)
    n0, n1 = len(examples[0].input_ids), len(examples[1].input_ids)
    assert batch["input_ids"].shape == (2, max(n0, n1)) and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["attention_mask"][1].sum() == n1 and batch["attention_mask"][1, n1:].sum() == 0
    assert (batch["labels"][1, n1:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, n1:] == processor.pad_token_id).all()
    model = build_model(earthgpt_tiny(), seed=0)
    with torch.no_grad():
        out = model(**batch)
    nll, count = answer_token_nll(out.logits, batch["labels"])
    # the model's loss and the shared helper agree: mean NLL over answer tokens only
    assert float(out.loss) == pytest.approx(float(nll) / count, rel=1e-5)
    # changing a question token changes the inputs but not which positions carry loss
    assert count == sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples)


def test_collator_rejects_empty_batch(processor: EarthGPTProcessor) -> None:
    with pytest.raises(ValueError):
        D.Collator(processor.pad_token_id)([])


def test_repeat_count_is_reproducible_and_unbiased() -> None:
    assert D.repeat_count(2.0, (0, 1)) == 2
    assert D.repeat_count(0.0, (0, 1)) == 0
    draws = [D.repeat_count(0.25, (7, 0, 1, i)) for i in range(4000)]
    assert draws == [D.repeat_count(0.25, (7, 0, 1, i)) for i in range(4000)]
    assert set(draws) == {0, 1}
    assert abs(np.mean(draws) - 0.25) < 0.03
    assert abs(np.mean([D.repeat_count(1.5, (1, i)) for i in range(4000)]) - 1.5) < 0.03
    with pytest.raises(ValueError):
        D.repeat_count(-1.0, (0,))


def test_every_malformed_reason_is_declared() -> None:
    import re

    source = Path(D.__file__).read_text()
    raised = set(re.findall(r'MalformedRecord\("([a-z_]+)"', source))
    assert raised == set(D.MALFORMED_REASONS)
