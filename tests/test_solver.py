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


class RowwiseMap:
    """f(z) = z W^T + b with `select_rows`, recording the batch size of every evaluation."""

    def __init__(self, weight, bias, calls=None):
        self.weight, self.bias, self.calls = weight, bias, [] if calls is None else calls

    def __call__(self, z):
        self.calls.append(z.shape[0])
        return z @ self.weight.T + self.bias, (self.bias.sum(-1) + 0 * z.sum(-1),)

    def select_rows(self, index):
        return type(self)(self.weight, self.bias.index_select(0, index), self.calls)


@pytest.mark.parametrize("solver", ["picard", "anderson"])
@pytest.mark.parametrize("interval", [1, 3])
def test_rows_that_stopped_are_set_aside_and_cost_nothing_more(solver, interval):
    # Row r's bias is scaled by 10^-r: the rows need different numbers of iterations from zero.
    weight = contraction(5, 0.8)
    bias = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = bias * torch.tensor([1.0, 1e-3, 1e3, 1e-6], dtype=torch.float64)[:, None]
    results = {}
    for skip in (False, True):
        fn = RowwiseMap(weight, bias)
        with torch.no_grad():
            results[skip] = solve_fixed_point(fn, torch.zeros(4, 5, dtype=torch.float64), settings(
                solver=solver, tolerance=1e-6, convergence_check_interval=interval, skip_converged_rows=skip))
        results[skip].calls = fn.calls
    shared, alone = results[False], results[True]
    assert len(set(alone.stats.iterations.tolist())) > 1
    torch.testing.assert_close(alone.z, shared.z, atol=1e-12, rtol=0)
    torch.testing.assert_close(alone.aux[0], bias.sum(-1))  # the rows' aux back in their places
    assert torch.equal(alone.stats.iterations, shared.stats.iterations)
    assert torch.equal(alone.stats.converged, shared.stats.converged)
    # The whole batch pays its slowest row's iterations for every row; set aside, each row pays its own (rounded up
    # to the next convergence test), and the function saw only the rows still iterating.
    slowest = int(shared.stats.iterations.max())
    rounded_up = -(-slowest // interval) * interval
    assert shared.stats.evaluations.tolist() == [min(rounded_up, 200)] * 4
    expected = (-(-alone.stats.iterations // interval) * interval).clamp(max=200)
    assert torch.equal(alone.stats.evaluations, expected)
    assert sum(alone.calls) == int(alone.stats.evaluations.sum()) < sum(shared.calls)
    assert min(alone.calls) < 4


def test_divergence_after_rows_were_set_aside_names_the_batch_row():
    class Diverging(RowwiseMap):
        def __call__(self, z):
            out, aux = super().__call__(z)
            late = len(self.calls) > 5
            return torch.where((self.bias[:, :1] > 10) & late, out * float("nan"), out), aux

    bias = torch.tensor([[0.0] * 3, [1.0] * 3, [0.0] * 3, [100.0] * 3], dtype=torch.float64)
    fn = Diverging(contraction(3, 0.5), bias)
    with torch.no_grad(), pytest.raises(SolverDivergenceError, match=r"sample\(s\) \[3\]"):
        solve_fixed_point(fn, torch.zeros(4, 3, dtype=torch.float64), settings(tolerance=1e-6))
    assert min(fn.calls) < 4  # rows 0 and 2 (at their fixed point at once) were set aside before row 3 diverged


def test_rows_are_never_set_aside_under_a_tape():
    weight, bias = contraction(3, 0.5), torch.tensor([[0.0] * 3, [1.0] * 3], dtype=torch.float64)
    fn = RowwiseMap(weight, bias.requires_grad_())
    solved = solve_fixed_point(fn, torch.zeros(2, 3, dtype=torch.float64), settings(backward="unrolled"))
    assert set(fn.calls) == {2}
    solved.z.sum().backward()
    assert bias.grad is not None
