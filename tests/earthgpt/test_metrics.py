"""Metrics against values computed by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import math

import pytest
import torch

from earthgpt import metrics as M
from earthgpt.metrics import Detection

CAND = "The cat sat on the mat."
REF = "the cat is on the mat"


def test_bleu_hand_computed() -> None:
    # 1-grams 5/6 (the x2, cat, on, mat), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3
    out = M.bleu([CAND], [[REF]])
    assert out["BLEU-1"] == pytest.approx(5 / 6)
    assert out["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert out["BLEU-3"] == pytest.approx(0.5)
    assert out["BLEU-4"] < 1e-3


def test_bleu_brevity_penalty_and_closest_reference() -> None:
    # candidate of 2 tokens, closest reference has 6 tokens: BP = exp(1 - 6/2)
    out = M.bleu(["the cat"], [["the cat sat on the mat", "a dog is lying on the old red mat"]])
    assert out["BLEU-1"] == pytest.approx(math.exp(-2.0))
    # clipping: "the the the" against "the cat": only one "the" counts
    assert M.bleu(["the the the"], [["the cat sat"]])["BLEU-1"] == pytest.approx(1 / 3)


def test_bleu_is_corpus_level() -> None:
    # counts are summed before dividing: (2 + 0) / (2 + 2) = 0.5, lengths equal so no penalty
    out = M.bleu(["a b", "c d"], [["a b"], ["e f"]], max_n=1)
    assert out["BLEU-1"] == pytest.approx(0.5)


def test_rouge_l_hand_computed() -> None:
    assert M.rouge_l([CAND], [[REF]]) == pytest.approx(5 / 6)  # LCS 5 of 6 both ways
    # LCS("a b c", "a x b y") = 2: P = 2/3, R = 1/2, F = 2.44 P R / (R + 1.44 P)
    p, r = 2 / 3, 0.5
    assert M.rouge_l(["a b c"], [["a x b y"]]) == pytest.approx(2.44 * p * r / (r + 1.44 * p))
    # max precision and max recall are taken over references separately
    assert M.rouge_l(["a b"], [["a b c d", "a"]]) == pytest.approx(2.44 * 1.0 * 1.0 / (1.0 + 1.44))


def test_cider_d_hand_computed() -> None:
    # 2 images, every n-gram has df 1 -> idf = ln 2 everywhere.
    # image 1 identical -> 1 per order -> 10; image 2 shares unigram "c" only: unigram cos 0.5, bigram 0 -> 2.5
    assert M.cider_d(["a b", "c d"], [["a b"], ["c e"]], max_n=2) == pytest.approx((10 + 2.5) / 2)
    # length penalty on the bigram count: image 1 "a b c" (2 bigrams) vs "a b" (1) -> delta 1
    # unigram cos: (ln2^2 * 2) / (sqrt(3) ln2 * sqrt(2) ln2) = 2/sqrt(6); bigram cos: 1/sqrt(2)
    got = M.cider_d(["a b c", "x y"], [["a b"], ["x y"]], max_n=2)
    img1 = (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 2 * math.exp(-1 / 72) * 10
    assert got == pytest.approx((img1 + 10) / 2)


def test_cider_single_image_is_zero_like_coco() -> None:
    # with one image, idf = log(1) - log(1) = 0: coco-caption's CIDEr-D is 0 whatever the caption
    assert M.cider_d(["a b"], [["a b"]]) == 0.0


def test_meteor_hand_computed() -> None:
    # 5 matches, P = R = 5/6, F_mean = 5/6; chunks "the cat" + "on the mat" = 2 -> penalty 0.5 * (2/5)^3 = 0.032
    assert M.meteor([CAND], [[REF]]) == pytest.approx(5 / 6 * (1 - 0.032))
    # identical 4-word sentences: one chunk, penalty 0.5 * (1/4)^3
    assert M.meteor(["a b c d"], [["a b c d"]]) == pytest.approx(1 - 0.5 / 64)
    assert M.meteor(["x y"], [["a b"]]) == 0.0


def test_caption_metrics_keys_and_perfect_scores() -> None:
    caps = ["a ship in the harbour", "a plane on the runway", "green farmland"]
    out = M.caption_metrics(caps, [[c] for c in caps])
    assert list(out) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert out["BLEU-1"] == pytest.approx(1.0) and out["ROUGE-L"] == pytest.approx(1.0)
    # "green farmland" has no 3- or 4-grams: corpus-level BLEU is unaffected, but its CIDEr-D orders 3 and 4 are 0
    # (zero norm), so that image scores (1 + 1 + 0 + 0) / 4 * 10 = 5 and the mean is (10 + 10 + 5) / 3
    assert out["BLEU-4"] == pytest.approx(1.0)
    assert out["CIDEr"] == pytest.approx(25 / 3)


def test_caption_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        M.bleu(["a"], [])
    with pytest.raises(ValueError):
        M.rouge_l(["a"], ["a"])  # a bare string is not a list of references


def test_accuracy_normalises() -> None:
    assert M.accuracy(
        ["Dense residential.", "forest", "river"], ["dense_residential", "Forest", "lake"]
    ) == pytest.approx(2 / 3)


def test_counting_accuracy() -> None:
    assert M.counting_accuracy([2, None, 0, 3], [2, 1, 0, 1]) == pytest.approx(0.5)


def test_box_iou() -> None:
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert M.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_grounding_accuracy() -> None:
    out = M.grounding_accuracy(
        [[0, 0, 10, 10], None, [0, 0, 10, 5]], [[0, 0, 10, 10], [0, 0, 1, 1], [0, 0, 10, 10]]
    )
    assert out == {"Acc@0.5": pytest.approx(2 / 3), "mIoU": pytest.approx(0.5)}


def _det(label: str, box: list[float], score: float = 1.0) -> Detection:
    return Detection(label, (box[0], box[1], box[2], box[3]), score)


def test_detection_metrics_hand_computed() -> None:
    gts = [[_det("ship", [0, 0, 10, 10]), _det("ship", [20, 20, 30, 30])], [_det("plane", [0, 0, 10, 10])]]
    preds = [
        # IoU 1 -> TP; IoU 81/119 -> TP; no overlap -> FP
        [_det("ship", [0, 0, 10, 10]), _det("ship", [21, 21, 31, 31]), _det("ship", [50, 50, 60, 60])],
        [_det("ship", [0, 0, 10, 10])],  # right place, wrong class -> FP, and the plane is a FN
    ]
    out = M.detection_metrics(preds, gts)
    assert (out["TP"], out["FP"], out["FN"]) == (2, 2, 1)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["F1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # all scores tie: ship has one operating point P = 2/4 at R = 1 -> AP 0.5; plane AP 0 -> mAP 0.25
    assert out["mAP"] == pytest.approx(0.25)
    # with scores ranking both TPs first, ship AP = 1 -> mAP 0.5
    scored = [
        [
            _det("ship", [0, 0, 10, 10], 0.9),
            _det("ship", [21, 21, 31, 31], 0.8),
            _det("ship", [50, 50, 60, 60], 0.3),
        ],
        [_det("ship", [0, 0, 10, 10], 0.5)],
    ]
    assert M.detection_metrics(scored, gts)["mAP"] == pytest.approx(0.5)


def test_detection_one_ground_truth_matches_once_and_ties_do_not_depend_on_order() -> None:
    gts = [[_det("ship", [0, 0, 10, 10])]]
    dup = [[_det("ship", [0, 0, 10, 10]), _det("ship", [0, 0, 10, 10])]]
    out = M.detection_metrics(dup, gts)
    assert (out["TP"], out["FP"]) == (1, 1)
    a = M.detection_metrics([[_det("ship", [50, 50, 60, 60]), _det("ship", [0, 0, 10, 10])]], gts)
    b = M.detection_metrics([[_det("ship", [0, 0, 10, 10]), _det("ship", [50, 50, 60, 60])]], gts)
    assert a["mAP"] == b["mAP"] == pytest.approx(0.5)


def test_detection_empty_images() -> None:
    out = M.detection_metrics([[], []], [[], []])
    assert out["F1"] == 0.0 and out["TP"] == 0 and out["mAP"] == 0.0
    out = M.detection_metrics([[], [_det("ship", [0, 0, 4, 4])]], [[], [_det("ship", [0, 0, 4, 4])]])
    assert out["F1"] == pytest.approx(1.0) and out["mAP"] == pytest.approx(1.0)


def test_answer_token_nll_masks_and_shifts() -> None:
    vocab = 7
    logits = torch.zeros(2, 5, vocab)  # uniform: every counted token costs ln(vocab)
    labels = torch.full((2, 5), M.IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([1, 2])
    labels[1, 4] = 3
    # label at position 0 never counts (nothing predicts it)
    labels[1, 0] = 4
    total, count = M.answer_token_nll(logits, labels)
    assert count == 3 == M.count_answer_tokens(labels)
    assert float(total) == pytest.approx(3 * math.log(vocab), rel=1e-6)
    # a confident correct logit lowers exactly its own position's loss
    logits[0, 2, 1] = 20.0
    lowered, _ = M.answer_token_nll(logits, labels)
    assert float(total - lowered) == pytest.approx(math.log(vocab), rel=1e-3)


def test_throughput_meter() -> None:
    meter = M.ThroughputMeter()
    meter.update(4, 100)
    meter.update(4, 60)
    rates = meter.rates()
    assert meter.samples == 8 and meter.tokens == 160
    assert rates["tokens_per_s"] == pytest.approx(20 * rates["samples_per_s"])
    meter.reset()
    assert meter.samples == 0


def test_format_table() -> None:
    text = M.format_table({"detection": {"F1": 0.5, "mAP": float("nan")}})
    assert "detection" in text and "0.5000" in text and "nan" in text


# --------------------------------------------------------------------------------------------------------------------
# Cross-check against the COCO caption evaluation code (pycocoevalcap, a test-only dependency)


def _coco_inputs() -> tuple[list[str], list[list[str]], dict[int, list[str]], dict[int, list[str]]]:
    from tests.earthgpt.caption_pairs import CAPTION_PAIRS

    cands = [c for c, _ in CAPTION_PAIRS]
    refs = [r for _, r in CAPTION_PAIRS]
    # pycocoevalcap scores pre-tokenised text (its PTB tokenizer is a Java step before scoring): give it ours
    res = {i: [" ".join(M.tokenize_caption(c))] for i, c in enumerate(cands)}
    gts = {i: [" ".join(M.tokenize_caption(x)) for x in r] for i, r in enumerate(refs)}
    return cands, refs, gts, res


def test_bleu_rouge_cider_match_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    cands, refs, gts, res = _coco_inputs()
    assert len(cands) >= 30
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = M.bleu(cands, refs)
    assert [ours[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(ref_bleu, rel=1e-9, abs=1e-12)
    assert M.rouge_l(cands, refs) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-9)
    # coco-caption's "CIDEr" is CIDEr-D (sigma 6, clipped counts, x10)
    assert M.cider_d(cands, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9)


def test_our_tokenizer_matches_the_ptb_tokenizer() -> None:
    """coco-caption tokenises with Stanford's PTB tokenizer (Java); ours must split these captions the same way."""
    pytest.importorskip("pycocoevalcap")
    import shutil

    if shutil.which("java") is None:
        pytest.skip("the PTB tokenizer needs Java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    cands, refs, _, _ = _coco_inputs()
    texts = cands + [x for r in refs for x in r]
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [ptb[i][0] for i in range(len(texts))] == [" ".join(M.tokenize_caption(t)) for t in texts]
