"""Metrics on singular spectra (non-negative r-vectors), batched over leading dimensions.

A *spectrum* is the vector ``S`` of singular values of a task vector ``tau = U diag(S) V^T``
(or a projected spectrum ``S2``, see :mod:`geometry.analysis.inclusion`). Every function here takes
spectra of shape ``(..., r)`` (numpy arrays, torch tensors or lists), reduces the last axis and
returns a float64 numpy value of shape ``(...)``.

From the spectral-inclusion paper (Fosse et al., TALN 2025):

* ``L_p(S1, S2) = ||S1 - S2||_p`` on the raw spectra (:func:`lp`), and the same on sum-normalised
  spectra ``S / sum(S)`` (``normalized=True``; labelled ``l1_normalized`` / ``l2_normalized``).
* ``REC(S1, S2) = sum_i min(S1_i / sum S1, S2_i / sum S2) = 1 - L1(S1/sum S1, S2/sum S2) / 2``,
  the overlap ("recouvrement") of the two spectra read as probability vectors, in ``[0, 1]``
  (:func:`rec`).
* normalised Shannon entropy ``H(u) = -(1 / log n) sum_i p_i log p_i`` with ``p = u / sum u``,
  in ``[0, 1]``: 0 when one axis carries everything, 1 when all axes are used equally
  (:func:`entropy`).

Which ``L1`` the paper's Table 4 reports (0.27 to 0.68 on Mistral-7B, r = 8): the paper defines
``L_p`` on the spectra themselves (section 4) and mentions no other normalisation than the one
inside REC. Its numbers are not the sum-normalised L1 (that would be ``2 * (1 - REC)``, e.g.
0.712 for SUM->NER instead of 0.271). The numbers are most consistent with the *raw* L1: for a
fixed source task the L1 hardly depends on the target (NER->SUM 0.660 and NER->10% SENT 0.660;
SUM->NER 0.271 and SUM->10% SENT 0.277), i.e. it is dominated by ``||S1||_1`` with a small ``S2``;
and in the appendix-A sweep (Table 6) L1 only grows from 0.660 to 0.675 at ``lambda = 1``, where
the exact minimiser of eq. 4 is ``S2 = 0`` (see :mod:`geometry.analysis.inclusion`): if the paper's Adam
iterate was near it, ``||S1||_1`` is about 0.675. Spectra normalised by their maximum or by their
Euclidean norm would give ``L1 >= 1`` for ``S2 = 0``, which those values exclude. This cannot be
fully established from the text (the paper solved the problem with Adam, whose iterates are not
exactly the minimiser, and it prints no raw singular values), so the tool shows both the raw
(``l1``, the paper's definition) and the sum-normalised (``l1_normalized``) variants, labelled.

Degenerate inputs: a spectrum summing to 0 has no distribution, so REC, the normalised L_p and
the entropy are NaN for it. A single-component spectrum (``n = 1``) has normalised entropy 0 by
convention (``log 1 = 0``; one axis is fully focused) and effective rank 1.

Adapter anatomy (Roy & Vetterli 2007; Rudelson & Vershynin 2007):

* effective rank ``exp(-sum_i p_i log p_i)``, ``p = S / sum S``, in ``[1, n]`` (:func:`effective_rank`);
* stable rank ``||tau||_F^2 / ||tau||_2^2 = sum S_i^2 / max S_i^2``, in ``[1, rank]`` (:func:`stable_rank`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geometry.errors import InvalidArgumentError

__all__ = ["as_spectrum", "lp", "rec", "entropy", "shannon_entropy", "effective_rank", "stable_rank"]


def as_spectrum(S: Any) -> np.ndarray:
    """``S`` as a float64 numpy array with at least one axis (torch tensors are moved to the CPU)."""
    if hasattr(S, "detach"):
        S = S.detach().to("cpu").double().numpy()
    arr = np.asarray(S, dtype=np.float64)
    if arr.ndim == 0:
        raise InvalidArgumentError("a spectrum needs at least one axis, got a scalar")
    return arr


def _sum_normalized(S: np.ndarray) -> np.ndarray:
    """``S / sum(S)`` along the last axis; NaN where the sum is 0."""
    total = S.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, S / np.where(total > 0, total, 1.0), np.nan)


def lp(S1: Any, S2: Any, p: float = 1.0, normalized: bool = False) -> np.ndarray:
    """``L_p(S1, S2) = (sum_i |S1_i - S2_i|^p)^(1/p)``; ``p = inf`` gives the max norm.

    ``normalized=True`` compares the sum-normalised spectra ``S / sum(S)`` instead (then
    ``L1 = 2 * (1 - REC)``); the raw variant is the paper's ``L_p``.
    """
    a, b = as_spectrum(S1), as_spectrum(S2)
    if a.shape[-1] != b.shape[-1]:
        raise InvalidArgumentError(f"spectra of different lengths: {a.shape[-1]} and {b.shape[-1]}")
    if p < 1:
        raise InvalidArgumentError(f"L_p needs p >= 1, got {p}")
    if normalized:
        a, b = _sum_normalized(a), _sum_normalized(b)
    return np.linalg.norm(a - b, ord=p, axis=-1)


def rec(S1: Any, S2: Any) -> np.ndarray:
    """REC, the overlap of two spectra: ``sum_i min(S1_i / sum S1, S2_i / sum S2)`` in ``[0, 1]``.

    Equal to ``1 - L1(S1 / sum S1, S2 / sum S2) / 2``; 1 for spectra proportional to each other,
    0 for spectra on disjoint axes; NaN if either spectrum sums to 0.
    """
    a, b = as_spectrum(S1), as_spectrum(S2)
    if a.shape[-1] != b.shape[-1]:
        raise InvalidArgumentError(f"spectra of different lengths: {a.shape[-1]} and {b.shape[-1]}")
    return np.minimum(_sum_normalized(a), _sum_normalized(b)).sum(axis=-1)


def shannon_entropy(S: Any) -> np.ndarray:
    """Shannon entropy (nats) of ``p = S / sum S``, with ``0 log 0 = 0``; NaN when ``sum S = 0``."""
    p = _sum_normalized(as_spectrum(S))
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(np.isnan(p).any(axis=-1), np.nan, terms.sum(axis=-1))


def entropy(S: Any, n: Any = None) -> np.ndarray:
    """Normalised Shannon entropy ``H(u) = -(1 / log n) sum_i p_i log p_i`` in ``[0, 1]``.

    ``n`` is the number of components (zeros included: a rank-8 spectrum using 2 axes equally
    has ``H = log 2 / log 8``); by default the length of the last axis, or give it per spectrum
    (an array broadcastable to ``S.shape[:-1]``) when zero-padded spectra of different ranks are
    stacked. ``n = 1`` gives 0; an all-zero spectrum (or ``n = 0``) gives NaN.
    """
    arr = as_spectrum(S)
    count = np.asarray(arr.shape[-1] if n is None else n, dtype=np.float64)
    h = shannon_entropy(arr)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_n = np.log(np.where(count > 1, count, 2.0))
        out = np.where(count > 1, np.clip(h / log_n, 0.0, 1.0), 0.0)
    return np.where(np.isnan(h) | (count < 1), np.nan, out)


def effective_rank(S: Any) -> np.ndarray:
    """Roy & Vetterli effective rank ``exp(-sum_i p_i log p_i)``, ``p = S / sum S``, in ``[1, n]``."""
    return np.exp(shannon_entropy(S))


def stable_rank(S: Any) -> np.ndarray:
    """Stable rank ``||tau||_F^2 / ||tau||_2^2 = sum S_i^2 / max_i S_i^2``; NaN for a zero spectrum."""
    arr = as_spectrum(S)
    top = np.max(np.abs(arr), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = arr / np.where(top > 0, top, 1.0)[..., None]
        return np.where(top > 0, (ratio**2).sum(axis=-1), np.nan)
