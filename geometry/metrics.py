"""Scores of model outputs: accuracy and macro F1 of class predictions, ROUGE-L F1 of generations.

* Accuracy: ``mean(pred == label)``.
* Macro F1: per class ``c`` (the union of the classes in labels and predictions, as scikit-learn),
  ``F1_c = 2 TP / (2 TP + FP + FN)`` (0 when the denominator is 0), averaged over classes.
* ROUGE-L F1 (Lin, 2004): with ``LCS`` the longest common subsequence of the candidate and reference
  tokens, ``P = LCS / |cand|``, ``R = LCS / |ref|``, ``F = 2 P R / (P + R)``. Tokens are the
  lower-cased alphanumeric runs (the reference scorer's tokenisation, no stemming).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin, 2004): ``P = LCS / |cand|``, ``R = LCS / |ref|``, ``F = 2 P R / (P + R)``."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)
