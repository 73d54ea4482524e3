"""The toy particle model of self-attention (Geshkovski et al.; Koubbi, Boussard & Hernandez on LoRA).

``n`` tokens ``x_1 .. x_n`` on the unit sphere ``S^{d-1}`` move with the layers read as time ``t``:

    dx_i/dt = P_{x_i}( sum_j softmax_j(beta <Q x_i, K x_j>) V x_j ),   P_x(v) = v - <x, v> x

(``P_x`` projects on the tangent space at ``x``). The equation is integrated by explicit Euler steps
of size ``dt`` followed by a renormalisation ``x_i <- x_i / ||x_i||`` (the points stay on the sphere).
The *perturbed* model changes only the value matrix, as a LoRA on V does:

    V = V0 + eps * B A / ||B A||_2,    B (d, r), A (r, d) Gaussian (seeded),

so ``strength`` ``eps`` is the operator norm of the perturbation (``V0 = I`` has norm 1) and ``rank`` is
``r``. Both trajectories start from the same points (uniform on the sphere, seeded). ``Q``, ``K``, ``V0``
are the identity by default or Gaussian ``N(0, 1/d)`` matrices (``qk="random"``, ``v0="random"``).

Measured at every step:

* ``clusters_base`` / ``clusters_perturbed``: agglomerative clustering of the points on the cosine
  distance, average linkage, cut at ``threshold`` (:func:`geometry.analysis.tokens.cluster_count`, the real-model
  view's measure);
* ``distance``: the mean geodesic distance ``mean_i arccos <x_i(t), y_i(t)>`` (radians) between a token of
  the base trajectory and the same token of the perturbed one;
* the **separation time** ``T_sep = min{ t : distance(t) > delta }`` (``delta`` = ``separation``, radians;
  NaN when the trajectories never get that far apart within the simulated time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from geometry.analysis.tokens import cluster_count
from geometry.errors import AtlasError

#: Default clustering cut for the particles (cosine distance; 0.02 is about 11 degrees).
DEFAULT_THRESHOLD = 0.02
#: Default separation threshold delta (radians of mean geodesic distance).
DEFAULT_SEPARATION = 0.1


@dataclass
class ParticleRun:
    """Both trajectories (``(steps + 1, n, d)``, step 0 the initial points), the matrices used, the
    per-step table and the summary numbers (see the module docstring)."""

    times: np.ndarray
    base: np.ndarray
    perturbed: np.ndarray
    Q: np.ndarray
    K: np.ndarray
    V0: np.ndarray
    delta: np.ndarray
    table: pd.DataFrame
    separation_time: float
    threshold: float
    separation: float
    params: dict = field(default_factory=dict)

    @property
    def V(self) -> np.ndarray:
        return self.V0 + self.delta

    @property
    def final_clusters(self) -> tuple[int, int]:
        """Cluster counts (base, perturbed) at the last step."""
        last = self.table.iloc[-1]
        return int(last["clusters_base"]), int(last["clusters_perturbed"])

    def summary(self) -> dict:
        base, pert = self.final_clusters
        return {**self.params, "separation_time": self.separation_time, "final_clusters_base": base,
                "final_clusters_perturbed": pert, "final_distance": float(self.table["distance"].iloc[-1])}


def sphere_points(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform on ``S^{d-1}`` (normalised Gaussians)."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lora_perturbation(d: int, rank: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``eps * B A / ||B A||_2`` with Gaussian ``B (d, r)``, ``A (r, d)``: operator norm exactly ``eps``."""
    B, A = rng.standard_normal((d, rank)), rng.standard_normal((rank, d))
    ba = B @ A
    norm = np.linalg.norm(ba, 2)
    return float(strength) * ba / norm if norm > 0 else np.zeros((d, d))


def velocity(x: np.ndarray, Q: np.ndarray, K: np.ndarray, V: np.ndarray, beta: float) -> np.ndarray:
    """``P_{x_i}(sum_j softmax_j(beta <Q x_i, K x_j>) V x_j)`` for every row ``x_i`` of ``x (n, d)``."""
    logits = beta * (x @ Q.T) @ (x @ K.T).T
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    v = w @ (x @ V.T)
    return v - np.sum(v * x, axis=1, keepdims=True) * x


def trajectory(x0: np.ndarray, Q: np.ndarray, K: np.ndarray, V: np.ndarray, beta: float, steps: int,
               dt: float) -> np.ndarray:
    """Euler steps with renormalisation from ``x0``: ``(steps + 1, n, d)``."""
    out = np.empty((steps + 1, *x0.shape))
    x = x0.copy()
    out[0] = x
    for s in range(1, steps + 1):
        x = x + dt * velocity(x, Q, K, V, beta)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s] = x
    return out


def _matrix(kind: str, d: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if kind == "identity":
        return np.eye(d)
    if kind == "random":
        return rng.standard_normal((d, d)) / math.sqrt(d)
    raise AtlasError(f"{what} must be 'identity' or 'random', got {kind!r}")


def _check(n: int, d: int, rank: int, steps: int, dt: float, beta: float, strength: float) -> None:
    problems = []
    if not isinstance(n, (int, np.integer)) or n < 1:
        problems.append(f"n (tokens) must be an integer >= 1, got {n!r}")
    if not isinstance(d, (int, np.integer)) or d < 2:
        problems.append(f"d (dimension) must be an integer >= 2, got {d!r}")
    if not isinstance(rank, (int, np.integer)) or rank < 1 or (isinstance(d, int) and rank > d):
        problems.append(f"rank must be an integer in [1, d = {d}], got {rank!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        problems.append(f"steps must be an integer >= 1, got {steps!r}")
    if not np.isfinite(dt) or dt <= 0:
        problems.append(f"dt must be > 0, got {dt!r}")
    if not np.isfinite(beta) or beta < 0:
        problems.append(f"beta must be >= 0, got {beta!r}")
    if not np.isfinite(strength):
        problems.append(f"strength must be a finite number, got {strength!r}")
    if problems:
        raise AtlasError("; ".join(problems))


def geodesic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Geodesic distance ``arccos <x_i, y_i>`` per row of unit vectors (radians), computed as
    ``2 arcsin(||x_i - y_i|| / 2)`` (exact 0 for equal points, where arccos loses half the digits)."""
    chord = np.linalg.norm(np.asarray(x) - np.asarray(y), axis=-1)
    return 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))


def simulate(n: int = 32, d: int = 3, *, beta: float = 4.0, rank: int = 1, strength: float = 0.5, seed: int = 0,
             steps: int = 200, dt: float = 0.1, qk: str = "identity", v0: str = "identity",
             threshold: float = DEFAULT_THRESHOLD, separation: float = DEFAULT_SEPARATION, record_every: int | None = None,
             x0: np.ndarray | None = None, V0: np.ndarray | None = None, delta: np.ndarray | None = None) -> ParticleRun:
    """Simulate the base and LoRA-perturbed particle dynamics from the same points (module docstring).

    ``seed`` draws, in this order and from one generator, the initial points, ``Q`` / ``K`` / ``V0`` when
    random, and the LoRA factors. ``x0`` (``(n, d)``, renormalised), ``V0`` and ``delta`` (the perturbation
    ``V - V0`` itself) override the drawn ones.

    ``record_every``: the table (cluster counts, distance) has a row every this many steps, plus the last
    step (default: every step up to 400 steps, then about 400 rows); the separation time is read on every
    step whatever this is. The trajectories always hold every step.
    """
    if x0 is not None:
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim != 2:
            raise AtlasError(f"x0 must be an (n, d) array, got shape {x0.shape}")
        n, d = x0.shape
    _check(n, d, rank, steps, float(dt), float(beta), float(strength))
    rng = np.random.default_rng(seed)
    points = sphere_points(n, d, rng)
    if x0 is not None:
        norms = np.linalg.norm(x0, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise AtlasError("x0 has a zero row: every token must be a point of the sphere")
        points = x0 / norms
    Q = _matrix(qk, d, rng, "qk")
    K = Q.copy() if qk == "identity" else _matrix(qk, d, rng, "qk")
    base_v = _matrix(v0, d, rng, "v0") if V0 is None else np.asarray(V0, dtype=np.float64)
    pert = lora_perturbation(d, rank, strength, rng) if delta is None else np.asarray(delta, dtype=np.float64)
    if base_v.shape != (d, d) or pert.shape != (d, d):
        raise AtlasError(f"V0 and delta must be ({d}, {d}) matrices, got {base_v.shape} and {pert.shape}")
    base = trajectory(points, Q, K, base_v, float(beta), int(steps), float(dt))
    perturbed = trajectory(points, Q, K, base_v + pert, float(beta), int(steps), float(dt))
    times = np.arange(steps + 1) * float(dt)
    dist = geodesic(base, perturbed).mean(axis=1)
    every = max(1, int(record_every) if record_every else math.ceil(steps / 400))
    rows = np.unique(np.r_[np.arange(0, steps + 1, every), steps])
    table = pd.DataFrame({
        "step": rows, "time": times[rows],
        "clusters_base": [int(cluster_count(base[s], threshold)) for s in rows],
        "clusters_perturbed": [int(cluster_count(perturbed[s], threshold)) for s in rows],
        "distance": dist[rows],
    })
    above = np.flatnonzero(dist > separation)
    sep = float(times[above[0]]) if len(above) else float("nan")
    params = dict(n=int(n), d=int(d), beta=float(beta), rank=int(rank), strength=float(strength), seed=int(seed),
                  steps=int(steps), dt=float(dt), qk=qk, v0=v0, threshold=float(threshold),
                  separation=float(separation), record_every=int(every))
    return ParticleRun(times, base, perturbed, Q, K, base_v, pert, table, sep, float(threshold), float(separation),
                       params)
