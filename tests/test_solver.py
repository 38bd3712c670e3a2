"""The solver on its own: per-sample convergence, statistics, divergence guard, Anderson, gradients."""

import pytest
import torch

from modeling_implicit.solver import SolverDivergenceError, SolverSettings, solve_fixed_point


def settings(**overrides) -> SolverSettings:
    values = dict(
        max_iterations=200, tolerance=1e-8, stop_mode="rel", damping=1.0, solver="picard", anderson_memory=5,
        phantom_steps=4, phantom_damping=1.0, backward="phantom",
    )
    values.update(overrides)
    return SolverSettings(**values)


def linear_map(weight: torch.Tensor, bias: torch.Tensor):
    """f(z) = z W^T + b per sample, no aux outputs."""

    def fn(z):
        return z @ weight.T + bias, None

    return fn


def contraction(dim: int, rate: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    return rate * q


def test_converges_to_the_fixed_point_per_sample():
    weight = contraction(6, 0.5)
    bias = torch.randn(3, 6, dtype=torch.float64)
    result = solve_fixed_point(linear_map(weight, bias), torch.zeros(3, 6, dtype=torch.float64), settings())
    exact = torch.linalg.solve(torch.eye(6, dtype=torch.float64) - weight, bias.T).T
    torch.testing.assert_close(result.z, exact, atol=1e-7, rtol=1e-7)
    assert result.stats.converged.all()
    assert (result.stats.residual < 1e-8).all()


def test_each_sample_stops_on_its_own_and_does_not_depend_on_batch_mates():
    # Sample 0 is already at its fixed point after one step (bias 0 and z0 = 0); sample 1 needs many.
    weight = contraction(4, 0.9)
    bias = torch.stack([torch.zeros(4), torch.ones(4)]).double()
    together = solve_fixed_point(linear_map(weight, bias), torch.zeros(2, 4, dtype=torch.float64), settings())
    assert together.stats.iterations[0] == 1 and together.stats.iterations[1] > 50
    alone = solve_fixed_point(linear_map(weight, bias[1:]), torch.zeros(1, 4, dtype=torch.float64), settings())
    assert torch.equal(together.z[1:], alone.z)
    assert together.stats.iterations[1] == alone.stats.iterations[0]


def test_aux_outputs_are_frozen_with_their_sample():
    calls = []

    def fn(z):
        calls.append(len(calls))
        return 0.5 * z + 1.0, (torch.full((z.shape[0], 1), float(len(calls))),)

    with torch.no_grad():
        result = solve_fixed_point(fn, torch.zeros(2, 3), settings(tolerance=1e-3, stop_mode="abs"))
    # The aux reported is the one of the evaluation that produced the returned z.
    assert result.aux[0][:, 0].tolist() == [float(result.stats.iterations[0])] * 2


def test_non_convergence_is_reported():
    weight = contraction(4, 0.99)
    result = solve_fixed_point(
        linear_map(weight, torch.ones(1, 4, dtype=torch.float64)), torch.zeros(1, 4, dtype=torch.float64),
        settings(max_iterations=5),
    )
    assert not result.stats.converged.any()
    assert result.stats.iterations.tolist() == [5]
    assert result.stats.residual.item() > 1e-8


def test_nan_residual_raises_naming_the_sample():
    def fn(z):
        out = z * 0.5 + 1
        out[1] = float("nan")
        return out, None

    with pytest.raises(SolverDivergenceError, match=r"sample\(s\) \[1\]"):
        solve_fixed_point(fn, torch.zeros(3, 2), settings())


def test_absolute_stop_mode():
    fn = linear_map(contraction(3, 0.5).float(), torch.full((1, 3), 100.0))
    rel = solve_fixed_point(fn, torch.zeros(1, 3), settings(tolerance=1e-3, stop_mode="rel"))
    absolute = solve_fixed_point(fn, torch.zeros(1, 3), settings(tolerance=1e-3, stop_mode="abs"))
    assert absolute.stats.iterations.item() > rel.stats.iterations.item()


def test_anderson_reaches_the_same_point_in_fewer_iterations():
    q = contraction(8, 1.0, seed=1)
    weight = q @ torch.diag(torch.linspace(0.1, 0.95, 8, dtype=torch.float64)) @ q.T
    # Seeded: both solves stop within the tolerance of the fixed point, and a draw whose largest gap lands on a tiny
    # coordinate could fail the elementwise comparison (the global generator's state depends on the test order).
    bias = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    picard = solve_fixed_point(
        linear_map(weight, bias), torch.zeros(2, 8, dtype=torch.float64), settings(max_iterations=2000)
    )
    assert picard.stats.converged.all()
    anderson = solve_fixed_point(
        linear_map(weight, bias), torch.zeros(2, 8, dtype=torch.float64), settings(solver="anderson")
    )
    torch.testing.assert_close(anderson.z, picard.z, atol=1e-6, rtol=1e-6)
    assert (anderson.stats.iterations * 5 < picard.stats.iterations).all()


def test_phantom_gradient_is_the_truncated_neumann_series():
    # For f(z) = zW^T + b: dz*/db = (I - W)^-1; k undamped phantom steps give sum_{i<k} W^i (eq. 5, lambda = 1).
    weight = contraction(3, 0.6)
    bias = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 3, dtype=torch.float64)
    for k in (1, 3, 10):
        z0 = torch.zeros(1, 3, dtype=torch.float64)
        result = solve_fixed_point(linear_map(weight, bias), z0, settings(phantom_steps=k))
        (grad,) = torch.autograd.grad((result.z * g).sum(), bias)
        series = sum(torch.linalg.matrix_power(weight, i) for i in range(k))
        torch.testing.assert_close(grad, g @ series, atol=1e-10, rtol=1e-10)


def test_unrolled_backward_differentiates_every_iteration():
    weight = contraction(3, 0.7)
    bias = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    result = solve_fixed_point(
        linear_map(weight, bias), torch.zeros(1, 3, dtype=torch.float64),
        settings(backward="unrolled", max_iterations=4, damping=0.5, tolerance=1e-30),
    )
    z = torch.zeros(1, 3, dtype=torch.float64)
    for step in range(4):
        fz = z @ weight.T + bias
        z = 0.5 * z + 0.5 * fz if step < 3 else fz
    (expected,) = torch.autograd.grad(z.sum(), bias)
    (grad,) = torch.autograd.grad(result.z.sum(), bias)
    torch.testing.assert_close(result.z, z)
    torch.testing.assert_close(grad, expected)


def test_unrolled_backward_through_anderson():
    # Anderson keeps a history of iterates; the unrolled backward must see every one as it was. Converged, the
    # gradient is the implicit-function one: d sum(z*) / db = 1^T (I - W)^-1.
    weight = contraction(3, 0.7)
    bias = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    result = solve_fixed_point(
        linear_map(weight, bias), torch.zeros(1, 3, dtype=torch.float64),
        settings(backward="unrolled", solver="anderson", damping=1.0, tolerance=1e-12, max_iterations=60),
    )
    assert bool(result.stats.converged.all())
    (grad,) = torch.autograd.grad(result.z.sum(), bias)
    expected = torch.ones(1, 3, dtype=torch.float64) @ torch.linalg.inv(torch.eye(3, dtype=torch.float64) - weight)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


def test_no_tape_without_grad():
    bias = torch.randn(1, 3, requires_grad=True)
    with torch.no_grad():
        result = solve_fixed_point(linear_map(0.5 * torch.eye(3), bias), torch.zeros(1, 3), settings())
    assert not result.z.requires_grad
