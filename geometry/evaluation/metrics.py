"""Scores of model outputs: accuracy and macro F1 of class predictions, ROUGE-1 and ROUGE-L F1 of generations.

* Accuracy: ``mean(pred == label)``.
* Macro F1: per class ``c`` (the union of the classes in labels and predictions, as scikit-learn),
  ``F1_c = 2 TP / (2 TP + FP + FN)`` (0 when the denominator is 0), averaged over classes.
* Exact match (DivMerge scores classification cast as generation with it): ``normalize(output) ==
  normalize(reference)``, where ``normalize`` lower-cases, collapses white space and strips surrounding
  white space, quotes and final punctuation (``"Positive."`` matches ``positive``; ``"It is positive"`` does not).
* ROUGE-L F1 (Lin, 2004): with ``LCS`` the longest common subsequence of the candidate and reference
  tokens, ``P = LCS / |cand|``, ``R = LCS / |ref|``, ``F = 2 P R / (P + R)``. Tokens are the
  lower-cased alphanumeric runs (the reference scorer's tokenisation, no stemming).
* ROUGE-1 F1 (Lin, 2004; DivMerge scores generation with it): ``overlap = sum_w min(c_w, r_w)`` over the
  unigram counts of candidate and reference, ``P = overlap / |cand|``, ``R = overlap / |ref|``, ``F`` as above.

Both come from Google's ``rouge-score`` package (``rouge_scorer.RougeScorer``, no stemmer) when it is
installed (``requirements.txt``), and from the identical implementations below otherwise (same
tokenisation; ``tests/test_divmerge.py`` checks that the two agree).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np


def classification_scores(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro F1 (mean over the classes present in labels or predictions, as scikit-learn).

    Per class ``c``: ``F1_c = 2 TP / (2 TP + FP + FN)``.
    """
    p, y = np.asarray(preds), np.asarray(labels)
    if len(p) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    f1s = []
    for c in np.union1d(p, y):
        tp = int(np.sum((p == c) & (y == c)))
        denom = 2 * tp + int(np.sum((p == c) & (y != c))) + int(np.sum((p != c) & (y == c)))
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(p == y)), "macro_f1": float(np.mean(f1s))}


_TOKEN_RE = re.compile(r"[a-z0-9]+")


def normalize_answer(text: str) -> str:
    """Lower-cased, white space collapsed, surrounding white space / quotes / final ``.!?,;:`` stripped."""
    text = " ".join(str(text).lower().split())
    return text.strip(" \"'`").rstrip(".!?,;:").strip(" \"'`")


def exact_match(candidate: str, reference: str) -> float:
    """1.0 when the normalized candidate equals the normalized reference, else 0.0 (:func:`normalize_answer`)."""
    return float(normalize_answer(candidate) == normalize_answer(reference))


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (the tokenisation of the reference ROUGE scorer, no stemming)."""
    return _TOKEN_RE.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


@lru_cache(maxsize=1)
def _scorer():
    """``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rougeL"])``, or ``None`` without the package."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        return None
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge_scores(candidate: str, reference: str) -> dict[str, float]:
    """``{"rouge_1": F1, "rouge_l": F1}`` of ``candidate`` against ``reference`` (``rouge-score`` when installed)."""
    scorer = _scorer()
    if scorer is not None:
        s = scorer.score(reference, candidate)  # rouge-score takes (target, prediction)
        return {"rouge_1": float(s["rouge1"].fmeasure), "rouge_l": float(s["rougeL"].fmeasure)}
    return {"rouge_1": rouge_1_reference(candidate, reference), "rouge_l": rouge_l_reference(candidate, reference)}


def rouge_1(candidate: str, reference: str) -> float:
    """ROUGE-1 F1 (unigram overlap), the paper's generation metric."""
    return rouge_scores(candidate, reference)["rouge_1"]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): ``P = LCS / |cand|``, ``R = LCS / |ref|``, ``F = 2 P R / (P + R)``."""
    return rouge_scores(candidate, reference)["rouge_l"]


def rouge_1_reference(candidate: str, reference: str) -> float:
    """ROUGE-1 F1 written out (the fallback of :func:`rouge_1`)."""
    c, r = Counter(rouge_tokens(candidate)), Counter(rouge_tokens(reference))
    overlap = sum((c & r).values())
    if overlap == 0:
        return 0.0
    p, rec = overlap / sum(c.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


def rouge_l_reference(candidate: str, reference: str) -> float:
    """ROUGE-L F1 written out (the fallback of :func:`rouge_l`)."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)
