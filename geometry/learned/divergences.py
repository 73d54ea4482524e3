"""The objectives of the learned merges, on log-probabilities along the last axis.

For two distributions ``p`` (the reference) and ``q`` over the same classes (or vocabulary):

* forward Kullback-Leibler, the fine-tuned model as reference (DivMerge's ``KL``)::

      KL(p || q) = sum_i p_i (log p_i - log q_i)

* Jensen-Shannon (DivMerge's default; symmetric, ``0 <= JS <= log 2``, zero iff ``p = q``)::

      JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),    m = (p + q) / 2

  computed with ``log m = logaddexp(log p, log q) - log 2`` (no underflow of ``m``);

* Shannon entropy (AdaMerging's objective, on the merged model's predictions ``q``)::

      H(q) = - sum_i q_i log q_i

Terms with ``p_i = 0`` contribute 0 (``0 log 0 = 0``); log-probabilities of ``-inf`` are accepted and
give finite values and gradients. References: DivMerge (Touayouch et al., arXiv 2509.02108v3,
section 3.2); AdaMerging (Yang et al., ICLR 2024, eq. 5).
"""

from __future__ import annotations

import math

import torch

from geometry.errors import AtlasError

#: Divergence names accepted by :class:`geometry.learned.DivMerge` (``js`` is the paper's default).
DIVERGENCES = ("js", "kl")
LOG2 = math.log(2.0)


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``-inf`` replaced by a large negative number, so that ``0 * log 0`` is 0 (also in grads)."""
    return logp.clamp(min=torch.finfo(logp.dtype).min / 4)


def _plogratio(logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """``sum_i p_i (log p_i - log r_i)`` over the last axis, ``p_i = 0`` terms being 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logr), torch.zeros_like(p)).sum(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row (last axis summed), ``p`` the reference."""
    logp, logq = _finite(logp), _finite(logq)
    return _plogratio(logp, logq)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2``, ``m = (p + q) / 2``, per row."""
    logp, logq = _finite(logp), _finite(logq)
    logm = torch.logaddexp(logp, logq) - LOG2
    return 0.5 * _plogratio(logp, logm) + 0.5 * _plogratio(logq, logm)


def entropy(logq: torch.Tensor) -> torch.Tensor:
    """``H(q) = -sum_i q_i log q_i`` per row."""
    logq = _finite(logq)
    q = logq.exp()
    return -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)


def divergence(name: str):
    """The function ``(logp, logq) -> per-row divergence`` called ``name`` (``js`` or ``kl``)."""

    table = {"js": js_divergence, "kl": kl_divergence}
    if name not in table:
        raise AtlasError(f"unknown divergence {name!r}: choose js (Jensen-Shannon, the default) or kl "
                         "(forward KL(p_finetuned || p_merged))")
    return table[name]
