"""Student t-tests between per-module metric samples of two projections (the paper's Table 5).

The spectral-inclusion paper compares, e.g., the REC values of ``SUM -> NER`` over all LoRA
modules (one value per query / value projection of each layer) with those of
``SUM -> 10% SENT``, with a two-sided test (``H1: mean(a) != mean(b)``) and a one-sided test
(``H1: mean(a) > mean(b)`` for REC, where higher means more overlap; ``H1: mean(a) < mean(b)``
for L1, where lower means more overlap). :func:`ttest` returns all three p-values at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geometry.errors import InvalidArgumentError

__all__ = ["ttest", "compare_projections"]


def ttest(a: Any, b: Any, paired: bool = False, equal_var: bool = True) -> dict[str, float]:
    """Student t-test of ``mean(a)`` against ``mean(b)``.

    ``a`` and ``b`` are samples of one metric (one value per module), e.g. the ``rec`` column of
    two :func:`geometry.analysis.inclusion.inclusion` frames. NaN values (degenerate modules) are dropped.

    * ``paired=False`` (default): independent two-sample Student test (``scipy.stats.ttest_ind``;
      ``equal_var=False`` gives Welch's test instead).
    * ``paired=True``: paired test on matched modules (``scipy.stats.ttest_rel``); ``a`` and ``b``
      must have the same length and a pair is dropped when either value is NaN.

    Returns ``t``, ``p_two_sided`` (``H1: mean a != mean b``), ``p_greater`` (``H1: mean a > mean b``),
    ``p_less`` (``H1: mean a < mean b``), ``mean_a``, ``mean_b``, ``n_a``, ``n_b``.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if paired:
        if x.shape != y.shape:
            raise InvalidArgumentError(f"a paired t-test needs samples of equal length, got {x.size} and {y.size}")
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
    else:
        x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if x.size < 2 or y.size < 2:
        raise InvalidArgumentError(f"a t-test needs at least 2 values per sample, got {x.size} and {y.size}")

    from scipy import stats as _stats  # about 0.5 s to import: only when a test is asked for

    def run(alternative: str):
        if paired:
            return _stats.ttest_rel(x, y, alternative=alternative)
        return _stats.ttest_ind(x, y, equal_var=equal_var, alternative=alternative)

    two = run("two-sided")
    return {
        "t": float(two.statistic),
        "p_two_sided": float(two.pvalue),
        "p_greater": float(run("greater").pvalue),
        "p_less": float(run("less").pvalue),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
        "n_a": int(x.size),
        "n_b": int(y.size),
    }


def compare_projections(frame_a, frame_b, metric: str = "rec", paired: bool = False, **kwargs) -> dict[str, float]:
    """:func:`ttest` of one metric column between two :func:`geometry.analysis.inclusion.inclusion` frames.

    E.g. ``compare_projections(inclusion(sum_, ner), inclusion(sum_, sent), "rec")`` is the paper's
    ``REC(SUM -> NER)`` vs ``REC(SUM -> 10% SENT)``: ``p_greater`` is its one-sided test for REC
    (higher = more overlap), ``p_less`` the one for L1 (lower = more overlap). With ``paired=True``
    the modules are matched on ``(stack, layer, kind)`` (those in both frames only).
    """
    for name, frame in (("first", frame_a), ("second", frame_b)):
        if metric not in frame.columns:
            raise InvalidArgumentError(f"the {name} frame has no column {metric!r} (columns: {', '.join(map(str, frame.columns))})")
    if not paired:
        return ttest(frame_a[metric].to_numpy(float), frame_b[metric].to_numpy(float), **kwargs)
    keys = ["stack", "layer", "kind"]
    merged = frame_a[keys + [metric]].merge(frame_b[keys + [metric]], on=keys, suffixes=("_a", "_b"))
    return ttest(merged[f"{metric}_a"].to_numpy(float), merged[f"{metric}_b"].to_numpy(float), paired=True, **kwargs)
