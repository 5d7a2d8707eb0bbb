"""Scoring generated answers per task, the eval command's refusals, and the toy-world MMRS writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from earthgpt.tasks import format_answer, parse_answer
from pipelines.evaluate import ScoredItem, cli, score_items
from pipelines.mmrs import chip_records

HW = (64, 64)
REF = "There are <p>2 ships</p>[0.10,0.10,0.30,0.30;0.50,0.50,0.80,0.80]"


def test_score_items_per_task() -> None:
    items = [
        ScoredItem("classify", "Harbor.", "harbor", HW),
        ScoredItem("classify", "forest", "harbor", HW),
        ScoredItem("vqa", "2", "2", HW),
        ScoredItem("ground", "[0.10,0.10,0.30,0.30]", "[0.10,0.10,0.30,0.30]", HW),
        ScoredItem("ground", "no box here", "[0.10,0.10,0.30,0.30]", HW),
        ScoredItem("detect", REF, REF, HW),
        # one box right, one far off, count right
        ScoredItem("detect", "There are <p>2 ships</p>[0.10,0.10,0.30,0.30;0.00,0.90,0.05,1.00]", REF, HW),
        ScoredItem("detect", "There are no objects.", "There are no objects.", HW),
        ScoredItem("caption", "a ship in a harbour", "a ship in a harbour", HW),
    ]
    out = score_items(items)
    assert out["classify"] == {"n": 2.0, "accuracy": 0.5}
    assert out["vqa"]["accuracy"] == 1.0
    assert out["ground"]["Acc@0.5"] == 0.5
    det = out["detect"]
    # 4 true boxes; predictions: 2 + 2 boxes, 3 hits
    assert det["precision"] == pytest.approx(0.75) and det["recall"] == pytest.approx(0.75)
    assert det["count_accuracy"] == 1.0
    assert out["caption"]["BLEU-1"] == pytest.approx(1.0)


def test_eval_cli_refuses_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["small", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_chip_records_round_trip_through_the_parsers() -> None:
    chip = {
        "image": "chips/sar/a_0001.png", "sensor": "thermal", "split": "val", "size": [64, 48],
        "scene_class": "harbor",
        "objects": [{"label": "ship", "box": [10, 5, 20, 12]}, {"label": "vehicle", "box": [30, 30, 37, 36]}],
    }  # fmt: skip
    recs = dict(chip_records(chip))
    assert set(recs) == {"det", "cls", "count_vqa", "rsvg", "multiturn"}
    det = recs["det"]
    assert det["sensor"] == "infrared" and det["task"] == "detect" and det["split"] == "val"
    assert det["conversations"][0]["value"].startswith("<image>\n")
    assert "infrared" in det["conversations"][0]["value"]
    parsed = parse_answer("detect", det["conversations"][1]["value"], (48, 64))
    assert parsed.counts == {"ship": 1, "vehicle": 1}
    for box, obj in zip(sorted(parsed.boxes, key=lambda b: b.x1), chip["objects"], strict=True):
        assert box.as_tuple() == pytest.approx(obj["box"], abs=0.33)  # two decimals of a 64-px side
    assert recs["count_vqa"]["conversations"][1]["value"] == "2"
    assert recs["cls"]["conversations"][1]["value"] == "harbor"
    assert len(recs["multiturn"]["conversations"]) == 4
    assert recs["rsvg"]["conversations"][1]["value"] == format_answer("ground", [30, 30, 37, 36], (48, 64))
    json.dumps(recs)  # records are plain JSON


def test_eval_cli_scores_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from catalogs.toyworld import generate_toyworld
    from pipelines.mmrs import write_mmrs

    world = generate_toyworld(tmp_path / "w", scenes=6, seed=2, chips_per_scene=4, val_chips_per_scene=2)
    files = write_mmrs(world.root, tags=("det", "cls"))
    out = tmp_path / "eval.json"
    # a preset = random weights (the untrained baseline); images found next to mmrs/ without --image-root
    assert cli(["tiny", str(files["det_val"]), str(files["cls_val"]), "--limit", "3", "--max-new-tokens", "8",
                "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["records"] == 6 and result["skipped"] == 0
    assert result["metrics"]["detect"]["n"] == 3 and "F1" in result["metrics"]["detect"]
    assert result["metrics"]["classify"]["accuracy"] == 0.0
    assert "detect" in capsys.readouterr().out


def test_detection_map_ranks_boxes_by_their_own_confidence() -> None:
    """mAP orders boxes by the log-probabilities of the tokens that wrote each box, not one score per answer."""
    pred = "There are <p>2 ships</p>[0.10,0.10,0.30,0.30;0.00,0.90,0.05,1.00]"
    spans = parse_answer("detect", pred, HW).box_spans
    ends = list(range(1, len(pred) + 1))  # one token per character

    def item(right: float, wrong: float) -> ScoredItem:
        lps = [right if spans[0][0] <= i < spans[0][1] else wrong if spans[1][0] <= i < spans[1][1] else -0.1
               for i in range(len(pred))]  # fmt: skip
        return ScoredItem("detect", pred, REF, HW, token_ends=ends, token_logprobs=lps)

    sure_of_the_hit = score_items([item(-0.01, -2.0)])["detect"]
    sure_of_the_miss = score_items([item(-2.0, -0.01)])["detect"]
    constant = score_items([ScoredItem("detect", pred, REF, HW)])["detect"]
    assert sure_of_the_hit["F1"] == sure_of_the_miss["F1"] == constant["F1"] == pytest.approx(0.5)
    # 2 true boxes, 1 hit: ranked first AP = 0.5; ranked after the miss AP = 0.5 * 1/2; tied scores: one point
    assert sure_of_the_hit["mAP"] == pytest.approx(0.5)
    assert sure_of_the_miss["mAP"] == pytest.approx(0.25)
    assert constant["mAP"] == pytest.approx(0.25)


def test_scoring_is_shared_without_an_import_cycle() -> None:
    """``earthgpt eval`` and the training job import one scoring module; neither imports the other."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipelines"

    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    training = set().union(*(imported(p) for p in (root / "training").glob("*.py")))
    evaluate = imported(root / "evaluate.py")
    assert "pipelines.scoring" in training and "pipelines.scoring" in evaluate
    assert not {"pipelines.evaluate", "pipelines.train"} & training
    assert not {m for m in evaluate if m.startswith("pipelines.train")} - {"pipelines.training.export"}
    assert not {m for m in imported(root / "training" / "export.py") if m.startswith("pipelines.")}
