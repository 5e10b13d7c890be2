"""Batched log-domain Sinkhorn: exact-transport limit, marginals, padding, stability, devices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from ccrk.optimal_transport import cosine_cost, sinkhorn, transport_cost, uniform_marginal

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def exact_plan(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """The unregularised transport plan by linear programming (rows sum to a, columns to b)."""
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None),
                  method="highs")
    assert res.status == 0
    return res.x.reshape(n, m), float(res.fun)


@pytest.mark.parametrize("n,m", [(3, 3), (4, 4), (3, 5)])
def test_as_eps_shrinks_the_plan_approaches_the_exact_transport_plan(n, m):
    rng = np.random.default_rng(n * 10 + m)
    cost = rng.uniform(0.0, 2.0, size=(n, m))
    a = rng.uniform(0.2, 1.0, size=n)
    a /= a.sum()
    b = rng.uniform(0.2, 1.0, size=m)
    b /= b.sum()
    plan_lp, cost_lp = exact_plan(cost, a, b)
    errors = []
    for eps in (0.1, 3e-3):
        # float64 and epsilon scaling: small eps converges slowly (the 3x3 case needs ~2,000 sweeps).
        plan = sinkhorn(torch.tensor(cost)[None], torch.tensor(a)[None], torch.tensor(b)[None], eps=eps,
                        iters=4000, anneal=True, tol=1e-9)[0].numpy()
        np.testing.assert_allclose(plan.sum(1), a, atol=1e-8)
        np.testing.assert_allclose(plan.sum(0), b, atol=1e-8)
        assert (plan * cost).sum() >= cost_lp - 1e-8  # feasible, so never below the optimum
        errors.append(np.abs(plan - plan_lp).max())
    assert errors[1] < errors[0] and errors[1] < 1e-4
    assert (plan * cost).sum() == pytest.approx(cost_lp, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_marginals_match_the_given_masses(device):
    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(6, 7, 5, generator=gen) * 2
    a = torch.rand(6, 7, generator=gen) + 0.1
    b = torch.rand(6, 5, generator=gen) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    plan = sinkhorn(cost.to(device), a.to(device), b.to(device), eps=0.05, iters=200).cpu()
    assert plan.shape == (6, 7, 5) and bool((plan >= 0).all())
    torch.testing.assert_close(plan.sum(2), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), b, atol=1e-5, rtol=0)


def test_padding_gets_no_mass_and_leaves_the_real_problem_unchanged():
    gen = torch.Generator().manual_seed(1)
    cost = torch.rand(1, 3, 4, generator=gen)
    alone = sinkhorn(cost, uniform_marginal(torch.ones(1, 3, dtype=torch.bool)),
                     uniform_marginal(torch.ones(1, 4, dtype=torch.bool)), eps=0.05, iters=100)
    padded_cost = torch.rand(1, 5, 6, generator=gen) - 5.0  # cheap padding would attract mass if it counted
    padded_cost[:, :3, :4] = cost
    mask_a = torch.tensor([[True, True, True, False, False]])
    mask_b = torch.tensor([[True, True, True, True, False, False]])
    plan = sinkhorn(padded_cost, uniform_marginal(mask_a), uniform_marginal(mask_b), eps=0.05, iters=100)
    torch.testing.assert_close(plan[:, :3, :4], alone, atol=1e-6, rtol=0)
    assert float(plan[:, 3:].abs().sum() + plan[:, :, 4:].abs().sum()) == 0.0


def test_an_all_padding_problem_gives_a_zero_plan_without_nan():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    plan = sinkhorn(torch.rand(2, 3, 3), uniform_marginal(mask), uniform_marginal(mask), eps=0.01, iters=20)
    assert bool(torch.isfinite(plan).all())
    assert float(plan[1].sum()) == 0.0 and float(plan[0].sum()) == pytest.approx(1.0, abs=1e-5)


def test_large_eps_tends_to_the_independent_coupling_and_small_eps_stays_finite():
    a, b = torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[0.6, 0.4]])
    cost = torch.tensor([[[0.0, 2.0], [2.0, 0.0], [1.0, 1.5]]])
    torch.testing.assert_close(sinkhorn(cost, a, b, eps=1e3, iters=50)[0], a[0][:, None] * b[0][None, :],
                               atol=1e-3, rtol=0)
    sharp = sinkhorn(cost, a, b, eps=1e-4, iters=500)
    assert bool(torch.isfinite(sharp).all())
    assert float(transport_cost(sharp, cost)) <= float(transport_cost(sinkhorn(cost, a, b, 1e3, 50), cost))


def test_cosine_cost_is_one_minus_cosine():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[3.0, 0.0], [-1.0, 0.0], [1.0, 1.0]]])
    expected = 1 - torch.tensor([[[1.0, -1.0, 2 ** -0.5], [0.0, 0.0, 2 ** -0.5]]])
    torch.testing.assert_close(cosine_cost(x, y), expected)


def test_bad_shapes_and_settings_are_refused():
    cost, a, b = torch.rand(2, 3, 4), torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="marginals"):
        sinkhorn(cost, b, a)
    with pytest.raises(ValueError, match=r"\[B, n, m\]"):
        sinkhorn(cost[0], a[0], b[0])
    with pytest.raises(ValueError, match="eps"):
        sinkhorn(cost, a, b, eps=0.0)
