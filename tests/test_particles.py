"""The toy particle model of self-attention with a LoRA on V (geometry.analysis.particles) and its figures."""

from __future__ import annotations

import numpy as np
import pytest

from geometry.analysis.particles import geodesic, simulate, velocity
from geometry.errors import AtlasError


def test_zero_perturbation_gives_the_same_trajectory():
    run = simulate(n=24, d=3, beta=4.0, rank=2, strength=0.0, seed=3, steps=80)
    assert np.array_equal(run.base, run.perturbed)
    assert np.array_equal(run.delta, np.zeros((3, 3)))
    assert (run.table["distance"] == 0).all() and np.isnan(run.separation_time)
    assert run.table["clusters_base"].equals(run.table["clusters_perturbed"])


def test_points_stay_on_the_sphere():
    run = simulate(n=40, d=4, beta=2.0, rank=2, strength=1.0, seed=1, steps=120, dt=0.2, qk="random", v0="random")
    for traj in (run.base, run.perturbed):
        np.testing.assert_allclose(np.linalg.norm(traj, axis=2), 1.0, atol=1e-12)
    # the velocity is tangent: <x_i, P_x(v)> = 0
    v = velocity(run.base[10], run.Q, run.K, run.V, 2.0)
    np.testing.assert_allclose(np.sum(v * run.base[10], axis=1), 0.0, atol=1e-12)


def test_identity_value_and_large_beta_collapse_to_few_clusters():
    run = simulate(n=64, d=3, beta=9.0, strength=0.0, seed=0, steps=300, dt=0.1, record_every=25)
    assert run.table["step"].tolist() == list(range(0, 301, 25))
    first, last = run.table.iloc[0], run.table.iloc[-1]
    assert first["clusters_base"] > 30  # random points: mostly apart
    assert 1 <= last["clusters_base"] <= 5  # tokens gathered into a few clusters
    assert run.table["clusters_base"].is_monotonic_decreasing or last["clusters_base"] < first["clusters_base"] / 6
    # beta = 0: uniform attention, every token moves to the mean: one cluster
    assert simulate(n=32, d=3, beta=0.0, strength=0.0, steps=200, record_every=50).final_clusters == (1, 1)


def test_cluster_count_of_a_known_configuration():
    rng = np.random.default_rng(0)
    centres = np.eye(3)
    x0 = np.concatenate([c + 0.01 * rng.standard_normal((5, 3)) for c in centres])
    run = simulate(x0=x0, beta=1.0, strength=0.0, steps=1, threshold=0.02)
    assert run.table["clusters_base"].iloc[0] == 3
    same = simulate(x0=np.tile([[0.0, 0.6, 0.8]], (6, 1)), strength=0.5, steps=20)
    assert same.final_clusters == (1, 1)  # identical tokens stay together in both models


def test_separation_time_definition_and_short_term_stability():
    run = simulate(n=32, d=3, beta=4.0, rank=1, strength=0.3, seed=0, steps=200, dt=0.1, separation=0.1)
    t = run.table
    assert t["distance"].iloc[0] == 0.0
    first = t[t["distance"] > 0.1].iloc[0]
    assert run.separation_time == pytest.approx(first["time"]) and run.separation_time > 0
    assert (t.loc[t["time"] < run.separation_time, "distance"] <= 0.1).all()
    # short term: the trajectories stay close, the gap grows at most like eps * t (plus higher order)
    early = t[t["time"] <= 0.3]
    assert (early["distance"] <= 0.3 * early["time"] * 1.5 + 1e-12).all()
    np.testing.assert_allclose(np.linalg.norm(run.delta, 2), 0.3)
    assert np.linalg.matrix_rank(run.delta) == 1


def test_seed_reproducible_and_geodesic():
    a, b = simulate(seed=5, steps=30), simulate(seed=5, steps=30)
    assert np.array_equal(a.base, b.base) and np.array_equal(a.perturbed, b.perturbed)
    assert not np.array_equal(a.base[0], simulate(seed=6, steps=30).base[0])
    x = np.array([[1.0, 0.0], [1.0, 0.0]])
    y = np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(geodesic(x, y), [np.pi / 2, np.pi])


def test_bad_parameters_are_refused():
    with pytest.raises(AtlasError, match="rank"):
        simulate(d=3, rank=4)
    with pytest.raises(AtlasError, match="beta"):
        simulate(beta=-1.0)
    with pytest.raises(AtlasError, match="qk"):
        simulate(qk="orthogonal")


def test_animation_frames_for_d2_and_d3():
    from ui.figures.tokens import particle_animation, particle_curves

    run2 = simulate(n=10, d=2, steps=50)
    fig = particle_animation(run2, max_frames=11)
    assert len(fig.frames) == 11 and fig.data[0].name == "unit circle"
    np.testing.assert_allclose(np.hypot(fig.frames[-1].data[1].x, fig.frames[-1].data[1].y), 1.0)
    np.testing.assert_allclose(fig.frames[-1].data[0].x, run2.base[-1][:, 0])
    run3 = simulate(n=10, d=3, steps=20)
    fig3 = particle_animation(run3, max_frames=6)
    assert fig3.data[-1].type == "scatter3d" and len(fig3.frames) == 6
    assert particle_animation(simulate(n=5, d=4, steps=5)) is None
    curves = particle_curves(run3)
    assert curves.layout.xaxis.title.text.startswith("time")
