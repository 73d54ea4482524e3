"""Random LoRA factors and the Llama-3-8B projection shapes, for the benches (no test code imported).

Copied from ``tests/synthetic.py`` (``LLAMA3_8B_SHAPES``, ``random_factors``, same values and
random streams) so that ``bench/`` does not import ``tests/``.

    from bench.synthetic import LLAMA3_8B_SHAPES, random_factors
    B, A = random_factors(4096, 4096, 16, seed=0)
"""

from __future__ import annotations

import torch

#: ``kind -> (out_features, in_features)`` of one Llama-3-8B block (GQA: k / v have 8 heads of 128).
LLAMA3_8B_SHAPES: dict[str, tuple[int, int]] = {
    "q": (4096, 4096),
    "k": (1024, 4096),
    "v": (1024, 4096),
    "o": (4096, 4096),
    "gate": (14336, 4096),
    "up": (14336, 4096),
    "down": (4096, 14336),
}


def random_factors(
    m: int,
    n: int,
    r: int,
    *,
    seed: int | torch.Generator = 0,
    dtype: torch.dtype = torch.float64,
    rank_b: int | None = None,
    rank_a: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``B (m, r)``, ``A (r, n)`` with N(0, 1 / sqrt(dim)) entries (LoRA-like magnitudes).

    ``rank_b`` / ``rank_a`` below ``r`` make the factor exactly rank-deficient: the extra columns
    of B (rows of A) are copies of the first ones (exact in any dtype).
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    B = torch.randn(m, r, generator=gen, dtype=torch.float64) / m**0.5
    A = torch.randn(r, n, generator=gen, dtype=torch.float64) / n**0.5
    if rank_b is not None and rank_b < r:
        B[:, rank_b:] = B[:, torch.arange(r - rank_b) % max(rank_b, 1)] if rank_b > 0 else 0.0
    if rank_a is not None and rank_a < r:
        A[rank_a:, :] = A[torch.arange(r - rank_a) % max(rank_a, 1), :] if rank_a > 0 else 0.0
    return B.to(dtype), A.to(dtype)
