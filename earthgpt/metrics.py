"""Evaluation metrics and the shared numerics of training and evaluation.

One implementation of every figure the project reports, used by the training job (held-out loss, throughput), the
evaluation command and the benchmarks, so that the numbers never drift apart.

Captioning metrics follow the MS-COCO caption evaluation code (``coco-caption`` / ``pycocoevalcap``), which is what
remote-sensing captioning papers (NWPU-Captions, RSICD, EarthGPT) report:

- BLEU-1..4: corpus-level, clipped n-gram precisions summed over the corpus, brevity penalty with the *closest*
  reference length per sentence, the same ``1e-15`` / ``1e-9`` smoothing constants.
- ROUGE-L: per-sentence LCS precision/recall against each reference, max over references, F-measure with
  ``beta = 1.2``, averaged over sentences.
- CIDEr: CIDEr-D (``sigma = 6``, clipped tf-idf, ``x10``), document frequencies from the evaluated references,
  including coco-caption's length term (the number of bigrams).
- METEOR: the coco code calls the METEOR 1.5 Java jar (exact, stem, synonym and paraphrase modules, its own
  parameters and function-word weights, statistics pooled over the corpus). Ours stays a pure-Python stand-in: METEOR's
  scoring formula (``alpha = 0.9``, ``beta = 3``, ``gamma = 0.5``, as in NLTK's ``meteor_score``) with the
  *exact-match module only*, averaged per sentence. It is not the jar's number and not a bound on it: on the 36 caption
  pairs of ``tests/earthgpt/caption_pairs.py`` the jar (through ``pycocoevalcap``, Java 17) gives 0.352 and ours
  0.556. Compare our METEOR between our own runs only, never with published METEOR figures.

Tokenisation replaces coco's PTB tokenizer (Java) with its effect on plain English captions: lower-case, punctuation
removed, split on whitespace.

BLEU-1..4, ROUGE-L and CIDEr-D are cross-checked against the COCO caption evaluation code itself (``pycocoevalcap``,
a test-only dependency, ``tests/earthgpt/test_metrics.py``): identical to 1e-9 on 36 remote-sensing and toy-world
caption pairs with one to three references each, and our tokenisation equals the PTB tokenizer's on all 91 captions
(that check runs where Java is installed). They are implemented here rather than imported because ``pycocoevalcap``
scores through Java subprocesses for tokenising and METEOR and is not needed at run time.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where needed, so that text metrics and data streaming do not load torch
    import torch

IGNORE_INDEX = -100
"""Label value excluded from the loss (prompt, image and padding positions)."""

Box = Sequence[float]

_PUNCT = re.compile(r"[^\w\s]")


# --------------------------------------------------------------------------------------------------------------------
# Text normalisation


def tokenize_caption(text: str) -> list[str]:
    """Lower-cases, drops punctuation and splits on whitespace (the PTB tokenizer's effect on captions)."""
    return _PUNCT.sub(" ", text.lower()).split()


def normalize_label(text: str) -> str:
    """Normalises a class label or short answer for exact-match accuracy ("Dense_Residential." -> "dense residential")."""
    return " ".join(tokenize_caption(text.replace("_", " ")))


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _all_ngrams(tokens: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_n + 1):
        counts.update(_ngrams(tokens, n))
    return counts


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings")


# --------------------------------------------------------------------------------------------------------------------
# Captioning


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..``max_n`` as computed by coco-caption.

    Args:
        candidates: One generated caption per image.
        references: For each image, its reference captions.
        max_n: Highest n-gram order.

    Returns:
        ``{"BLEU-1": ..., ..., "BLEU-max_n": ...}`` in [0, 1].
    """
    _check_pairs(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * max_n
    guess = [0] * max_n
    test_len = 0
    ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        cand_tok = tokenize_caption(cand)
        refs_tok = [tokenize_caption(r) for r in refs]
        test_len += len(cand_tok)
        # closest reference length, ties to the shorter one (coco-caption's "closest" option)
        ref_len += min((abs(len(r) - len(cand_tok)), len(r)) for r in refs_tok)[1]
        for n in range(1, max_n + 1):
            cand_counts = _ngrams(cand_tok, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in refs_tok:
                max_ref |= _ngrams(r, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in cand_counts.items())
            guess[n - 1] += max(len(cand_tok) - n + 1, 0)
    ratio = (test_len + tiny) / (ref_len + small)
    brevity = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0
    out: dict[str, float] = {}
    product = 1.0
    for n in range(1, max_n + 1):
        product *= (correct[n - 1] + tiny) / (guess[n - 1] + small)
        out[f"BLEU-{n}"] = float(product ** (1.0 / n) * brevity)
    return out


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """ROUGE-L F-measure as computed by coco-caption (max LCS precision and recall over references).

    Args:
        candidates: One generated caption per image.
        references: For each image, its reference captions.
        beta: Recall weight of the F-measure.

    Returns:
        Mean ROUGE-L over images, in [0, 1].
    """
    _check_pairs(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        cand_tok = tokenize_caption(cand)
        precs, recs = [], []
        for ref in refs:
            ref_tok = tokenize_caption(ref)
            lcs = _lcs_length(cand_tok, ref_tok)
            precs.append(lcs / len(cand_tok) if cand_tok else 0.0)
            recs.append(lcs / len(ref_tok) if ref_tok else 0.0)
        p, r = max(precs), max(recs)
        scores.append(((1 + beta**2) * p * r) / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D as computed by coco-caption (document frequencies from the given references).

    Args:
        candidates: One generated caption per image.
        references: For each image, its reference captions.
        max_n: Highest n-gram order.
        sigma: Width of the Gaussian length penalty.

    Returns:
        Mean CIDEr-D over images (coco scale: x10, so a perfect score on a varied corpus is well above 1).
    """
    _check_pairs(candidates, references)
    cand_counts = [_all_ngrams(tokenize_caption(c), max_n) for c in candidates]
    ref_counts = [[_all_ngrams(tokenize_caption(r), max_n) for r in refs] for refs in references]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({g for r in refs for g in r})
    log_n_images = math.log(float(len(candidates))) if candidates else 0.0

    def to_vec(
        counts: Counter[tuple[str, ...]],
    ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
        norm = [0.0] * max_n
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = float(tf) * (log_n_images - math.log(max(1.0, doc_freq[gram])))
            norm[n] += vec[n][gram] ** 2
            # coco-caption counts bigrams here (index 1): kept so that figures match published ones
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, refs in zip(cand_counts, ref_counts, strict=True):
        vec, norm, length = to_vec(cand)
        total = np.zeros(max_n)
        for ref in refs:
            vec_r, norm_r, length_r = to_vec(ref)
            delta = float(length - length_r)
            for n in range(max_n):
                val = sum(min(v, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, v in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    val /= norm[n] * norm_r[n]
                total[n] += val * math.exp(-(delta**2) / (2 * sigma**2))
        scores.append(float(np.mean(total)) / len(refs) * 10.0)
    return float(np.mean(scores)) if scores else 0.0


def _align_exact(hyp: Sequence[str], ref: Sequence[str]) -> list[tuple[int, int]]:
    """Exact-match word alignment, preferring to extend the current chunk (fewer chunks, as METEOR's aligner)."""
    used: set[int] = set()
    pairs: list[tuple[int, int]] = []
    last = -2
    for i, word in enumerate(hyp):
        positions = [j for j, r in enumerate(ref) if r == word and j not in used]
        if not positions:
            continue
        j = last + 1 if last + 1 in positions else positions[0]
        used.add(j)
        pairs.append((i, j))
        last = j
    return pairs


def _meteor_sentence(
    hyp: Sequence[str], ref: Sequence[str], alpha: float, beta: float, gamma: float
) -> float:
    pairs = _align_exact(hyp, ref)
    matches = len(pairs)
    if matches == 0:
        return 0.0
    precision = matches / len(hyp)
    recall = matches / len(ref)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    chunks = 1
    for (i0, j0), (i1, j1) in zip(pairs, pairs[1:], strict=False):
        if not (i1 == i0 + 1 and j1 == j0 + 1):
            chunks += 1
    penalty = gamma * (chunks / matches) ** beta
    return f_mean * (1 - penalty)


def meteor(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
) -> float:
    """METEOR with exact matching only (see the module docstring), max over references, mean over images.

    Args:
        candidates: One generated caption per image.
        references: For each image, its reference captions.
        alpha: Precision/recall weight of the harmonic mean.
        beta: Exponent of the fragmentation penalty.
        gamma: Weight of the fragmentation penalty.

    Returns:
        Mean METEOR in [0, 1].
    """
    _check_pairs(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        hyp = tokenize_caption(cand)
        scores.append(max(_meteor_sentence(hyp, tokenize_caption(r), alpha, beta, gamma) for r in refs))
    return float(np.mean(scores)) if scores else 0.0


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """All captioning metrics in one dict: BLEU-1..4, METEOR, ROUGE-L, CIDEr."""
    out = bleu(candidates, references)
    out["METEOR"] = meteor(candidates, references)
    out["ROUGE-L"] = rouge_l(candidates, references)
    out["CIDEr"] = cider_d(candidates, references)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Classification, VQA, counting


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Exact-match accuracy after :func:`normalize_label` (scene classification, VQA)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not targets:
        return 0.0
    return float(
        np.mean([normalize_label(p) == normalize_label(t) for p, t in zip(predictions, targets, strict=True)])
    )


def counting_accuracy(predicted: Sequence[int | None], target: Sequence[int]) -> float:
    """Fraction of images whose predicted object count equals the true count (``None``: unparsable answer)."""
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predicted counts but {len(target)} targets")
    if not target:
        return 0.0
    return float(
        np.mean([p is not None and int(p) == int(t) for p, t in zip(predicted, target, strict=True)])
    )


# --------------------------------------------------------------------------------------------------------------------
# Boxes


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (continuous coordinates; empty boxes give 0)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_accuracy(
    predicted: Sequence[Box | None], target: Sequence[Box], threshold: float = 0.5
) -> dict[str, float]:
    """Visual grounding (REC): Acc@``threshold`` and mean IoU, one predicted box per referring expression.

    Args:
        predicted: One box per expression, ``None`` where the answer held no parsable box (counts as a miss).
        target: The ground-truth box per expression.
        threshold: IoU at which a prediction counts as correct.

    Returns:
        ``{"Acc@0.5": ..., "mIoU": ...}`` (the key follows ``threshold``).
    """
    if len(predicted) != len(target):
        raise ValueError(f"{len(predicted)} predictions but {len(target)} targets")
    ious = [box_iou(p, t) if p is not None else 0.0 for p, t in zip(predicted, target, strict=True)]
    if not ious:
        return {f"Acc@{threshold:g}": 0.0, "mIoU": 0.0}
    return {
        f"Acc@{threshold:g}": float(np.mean([i >= threshold for i in ious])),
        "mIoU": float(np.mean(ious)),
    }


@dataclass(frozen=True)
class Detection:
    """One predicted or ground-truth object in one image.

    Attributes:
        label: Class name (compared after :func:`normalize_label`).
        box: ``[x1, y1, x2, y2]`` in pixels of the original image.
        score: Confidence for ranking in mAP; generated answers carry none, so all boxes tie at 1.0 by default.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float = 1.0


def _match_image(preds: Sequence[Detection], gts: Sequence[Detection], threshold: float) -> list[bool]:
    """Greedy matching in descending score: each prediction takes the unmatched same-class box of highest IoU."""
    order = sorted(range(len(preds)), key=lambda i: -preds[i].score)
    taken = [False] * len(gts)
    hits = [False] * len(preds)
    for i in order:
        p = preds[i]
        best, best_iou = -1, threshold
        for j, g in enumerate(gts):
            if taken[j] or normalize_label(g.label) != normalize_label(p.label):
                continue
            iou = box_iou(p.box, g.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            taken[best] = True
            hits[i] = True
    return hits


def _average_precision(scores: Sequence[float], hits: Sequence[bool], n_gt: int) -> float:
    """All-point interpolated AP (VOC 2010+); predictions with equal scores form one operating point."""
    if n_gt == 0:
        return float("nan")
    if not scores:
        return 0.0
    s = np.asarray(scores, dtype=float)
    h = np.asarray(hits, dtype=float)
    order = np.argsort(-s, kind="stable")
    s, h = s[order], h[order]
    tp = np.cumsum(h)
    fp = np.cumsum(1.0 - h)
    # keep only the last index of each run of tied scores: ties are one threshold, their order must not matter
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    recall = tp[last_of_tie] / n_gt
    precision = tp[last_of_tie] / (tp[last_of_tie] + fp[last_of_tie])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def detection_metrics(
    predictions: Sequence[Sequence[Detection]], targets: Sequence[Sequence[Detection]], threshold: float = 0.5
) -> dict[str, float]:
    """Object detection: micro precision / recall / F1 at IoU ``threshold`` and mAP at the same IoU.

    A prediction is a true positive when it overlaps an unmatched ground-truth box of the same class with IoU at least
    ``threshold`` (each ground-truth box matches once). mAP averages per-class AP over classes present in the targets.

    Args:
        predictions: Per image, the predicted objects.
        targets: Per image, the ground-truth objects.
        threshold: IoU threshold.

    Returns:
        ``{"precision", "recall", "F1", "mAP", "TP", "FP", "FN"}`` (suffix-free keys; the threshold is the caller's).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction lists but {len(targets)} target lists")
    tp = fp = n_gt = 0
    per_class_scores: dict[str, list[float]] = defaultdict(list)
    per_class_hits: dict[str, list[bool]] = defaultdict(list)
    per_class_gt: Counter[str] = Counter()
    for preds, gts in zip(predictions, targets, strict=True):
        hits = _match_image(preds, gts, threshold)
        tp += sum(hits)
        fp += len(hits) - sum(hits)
        n_gt += len(gts)
        for g in gts:
            per_class_gt[normalize_label(g.label)] += 1
        for p, hit in zip(preds, hits, strict=True):
            per_class_scores[normalize_label(p.label)].append(p.score)
            per_class_hits[normalize_label(p.label)].append(hit)
    fn = n_gt - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    aps = [
        _average_precision(per_class_scores.get(c, []), per_class_hits.get(c, []), n)
        for c, n in per_class_gt.items()
    ]
    return {
        "precision": float(precision),
        "recall": float(recall),
        "F1": float(f1),
        "mAP": float(np.mean(aps)) if aps else 0.0,
        "TP": float(tp),
        "FP": float(fp),
        "FN": float(fn),
    }


# --------------------------------------------------------------------------------------------------------------------
# Loss and throughput (shared by the training job and the evaluation command)


def answer_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over answer positions, and how many positions were counted.

    Positions whose *label* is :data:`IGNORE_INDEX` are excluded; logits at position ``t`` predict label ``t + 1``
    (the causal-LM shift). Summing (rather than averaging per batch) lets the caller average over a whole eval set.

    Args:
        logits: ``(batch, seq, vocab)``.
        labels: ``(batch, seq)`` with :data:`IGNORE_INDEX` outside answers.

    Returns:
        ``(sum of NLL as a 0-d tensor, number of answer tokens)``.
    """
    import torch

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    count = int(mask.sum())
    if count == 0:
        return shift_logits.new_zeros(()), 0
    nll = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask], reduction="sum")
    return nll, count


def count_answer_tokens(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss (answer tokens, after the causal shift)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class ThroughputMeter:
    """Samples/s and tokens/s over a window of steps (training logs, evaluation and inference reports).

    Attributes:
        samples: Samples counted since the last :meth:`reset`.
        tokens: Tokens counted since the last :meth:`reset`.
    """

    samples: int = 0
    tokens: int = 0
    _start: float = field(default_factory=time.perf_counter)

    def update(self, samples: int, tokens: int) -> None:
        """Adds one step's work."""
        self.samples += int(samples)
        self.tokens += int(tokens)

    def rates(self) -> dict[str, float]:
        """``{"samples_per_s", "tokens_per_s", "seconds"}`` since the last reset."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        return {
            "samples_per_s": self.samples / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "seconds": elapsed,
        }

    def reset(self) -> None:
        """Starts a new window."""
        self.samples = 0
        self.tokens = 0
        self._start = time.perf_counter()


def mean_or_nan(values: Iterable[float]) -> float:
    """Mean of ``values``, ``nan`` when there are none (a metric with no examples is undefined, not zero)."""
    vals = list(values)
    return float(np.mean(vals)) if vals else float("nan")


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Renders ``{task: {metric: value}}`` as an aligned plain-text table (one row per task and metric)."""
    lines = [f"{'task':<16} {'metric':<16} {'value':>10}", "-" * 44]
    for task, metrics in rows.items():
        for name, value in metrics.items():
            text = (
                f"{value:10.4f}" if isinstance(value, float) and not math.isnan(value) else f"{value!s:>10}"
            )
            lines.append(f"{task:<16} {name:<16} {text}")
    return "\n".join(lines)
