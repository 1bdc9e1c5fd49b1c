"""Batched, masked, differentiable Sinkhorn (`sinkhorn_otmel.sinkhorn`) against POT and against itself."""

import numpy as np
import ot
import pytest
import torch

import sinkhorn_otmel
from sinkhorn_otmel import sinkhorn, solver_form


# Costs in [0, 1]: epsilon 0.1 gives a spread / epsilon ratio <= 10 (kernel form), 0.025 one of about 40 (log form).
BRANCH_EPSILON = {"kernel": 0.1, "log": 0.025}


@pytest.fixture
def branch_calls(monkeypatch):
    """Counts the calls of each solver branch, to check that a test exercises the branch it means to."""
    calls = {"kernel": 0, "log": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    # White-box: the solver module's own two forms.
    monkeypatch.setattr(sinkhorn_otmel, "_sinkhorn_kernel", spy("kernel", sinkhorn_otmel._sinkhorn_kernel))
    monkeypatch.setattr(sinkhorn_otmel, "_sinkhorn_log", spy("log", sinkhorn_otmel._sinkhorn_log))
    return calls


def pot_plan(cost, epsilon, row_mask=None, col_mask=None):
    """POT's log-domain Sinkhorn, float64, on the unmasked sub-problem, embedded in a zero plan."""
    cost = cost.detach().double().numpy()
    rows = np.arange(cost.shape[0]) if row_mask is None else np.flatnonzero(np.asarray(row_mask))
    cols = np.arange(cost.shape[1]) if col_mask is None else np.flatnonzero(np.asarray(col_mask))
    a = np.full(len(rows), 1.0 / len(rows))
    b = np.full(len(cols), 1.0 / len(cols))
    sub = ot.sinkhorn(a, b, cost[np.ix_(rows, cols)], epsilon, method="sinkhorn_log", numItermax=200000, stopThr=1e-11)
    plan = np.zeros_like(cost)
    plan[np.ix_(rows, cols)] = sub
    return torch.from_numpy(plan)


def random_masks(batch, n, m, generator, dtype=torch.float64):
    row_mask = (torch.rand(batch, n, generator=generator) > 0.3).to(dtype)
    col_mask = (torch.rand(batch, m, generator=generator) > 0.3).to(dtype)
    row_mask[:, 0] = 1
    col_mask[:, 0] = 1
    return row_mask, col_mask


def assert_plans_close(actual, expected, rel=1e-5):
    scale = expected.abs().max().item()
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= rel * scale, f"plans differ by {error:.3g} (largest entry {scale:.3g})"


@pytest.mark.parametrize("branch", ["kernel", "log"])
@pytest.mark.parametrize("shape", [(4, 8, 11), (3, 12, 7), (2, 20, 24)])  # n * m below and above 400 (see below)
def test_plan_matches_pot(branch, shape, branch_calls):
    # (2, 20, 24): n * m >= 400 takes the other orientation of the batched matrix-vector products.
    gen = torch.Generator().manual_seed(sum(shape))
    epsilon = BRANCH_EPSILON[branch]
    cost = torch.rand(*shape, generator=gen, dtype=torch.float64)
    plan = sinkhorn(cost, epsilon, max_iter=50000, tol=1e-12)
    assert branch_calls[branch] == 1 and sum(branch_calls.values()) == 1
    for i in range(shape[0]):
        assert_plans_close(plan[i], pot_plan(cost[i], epsilon))


@pytest.mark.parametrize("branch", ["kernel", "log"])
def test_masked_plan_matches_pot(branch, branch_calls):
    gen = torch.Generator().manual_seed(1)
    epsilon = BRANCH_EPSILON[branch]
    cost = torch.rand(5, 9, 13, generator=gen, dtype=torch.float64)
    row_mask, col_mask = random_masks(5, 9, 13, gen)
    plan = sinkhorn(cost, epsilon, max_iter=50000, tol=1e-9, row_mask=row_mask, col_mask=col_mask)
    assert branch_calls[branch] == 1
    for i in range(5):
        assert_plans_close(plan[i], pot_plan(cost[i], epsilon, row_mask[i], col_mask[i]))


@pytest.mark.parametrize("branch", ["kernel", "log"])
@pytest.mark.parametrize("masked", [False, True])
def test_marginals_within_tolerance(branch, masked, branch_calls):
    gen = torch.Generator().manual_seed(2)
    epsilon, tol = BRANCH_EPSILON[branch], 1e-5
    cost = torch.rand(64, 20, 30, generator=gen)
    row_mask, col_mask = (
        random_masks(64, 20, 30, gen, torch.float32) if masked else (torch.ones(64, 20), torch.ones(64, 30))
    )
    plan = sinkhorn(cost, epsilon, max_iter=5000, tol=tol, row_mask=row_mask, col_mask=col_mask).double()
    assert branch_calls[branch] == 1
    a = row_mask.double() / row_mask.double().sum(-1, keepdim=True)
    b = col_mask.double() / col_mask.double().sum(-1, keepdim=True)
    row_error = (plan.sum(-1) - a).norm(dim=-1)
    col_error = (plan.sum(-2) - b).norm(dim=-1)
    assert row_error.max() <= tol * 1.01, row_error.max()
    assert col_error.max() <= 1e-5, col_error.max()  # exact after each iteration, up to float32 rounding
    assert torch.allclose(plan.sum((-2, -1)), torch.ones(64, dtype=torch.float64), atol=1e-5)
    assert (plan >= 0).all()


@pytest.mark.parametrize("branch", ["kernel", "log"])
@pytest.mark.parametrize("padding", ["random", "garbage"])
@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_masked_entries_are_zero_and_subproblem_is_unaffected(branch, padding, tol, branch_calls):
    gen = torch.Generator().manual_seed(3)
    epsilon = BRANCH_EPSILON[branch]
    n, m, rows, cols = 9, 12, 6, 8
    small = torch.rand(4, rows, cols, generator=gen, dtype=torch.float64)
    big = torch.rand(4, n, m, generator=gen, dtype=torch.float64)
    if padding == "garbage":  # padding may hold anything; masks, not values, decide
        big = torch.full((4, n, m), 1e4, dtype=torch.float64)
        big[1] = float("inf")
        big[2, :, cols:] = -1e4
    big[:, :rows, :cols] = small
    row_mask = torch.zeros(4, n, dtype=torch.float64)
    col_mask = torch.zeros(4, m, dtype=torch.float64)
    row_mask[:, :rows], col_mask[:, :cols] = 1, 1
    # Shuffle rows and columns so that padding is interleaved, not only trailing.
    row_perm, col_perm = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen)
    big, row_mask, col_mask = big[:, row_perm][:, :, col_perm], row_mask[:, row_perm], col_mask[:, col_perm]

    alone = sinkhorn(small, epsilon, max_iter=200, tol=tol)
    padded = sinkhorn(big, epsilon, max_iter=200, tol=tol, row_mask=row_mask, col_mask=col_mask)
    assert branch_calls[branch] == 2 and sum(branch_calls.values()) == 2
    assert torch.isfinite(padded).all()
    pad = ~(row_mask.bool().unsqueeze(-1) & col_mask.bool().unsqueeze(-2))
    assert (padded[pad] == 0).all()
    inverse_rows, inverse_cols = torch.argsort(row_perm), torch.argsort(col_perm)
    recovered = padded[:, inverse_rows][:, :, inverse_cols][:, :rows, :cols]
    torch.testing.assert_close(recovered, alone, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("branch", ["kernel", "log"])
def test_masked_entries_get_no_gradient_and_padding_values_do_not_matter(branch):
    gen = torch.Generator().manual_seed(4)
    epsilon = BRANCH_EPSILON[branch]
    cost = torch.rand(3, 7, 8, generator=gen, dtype=torch.float64)
    row_mask, col_mask = random_masks(3, 7, 8, gen)
    weights = torch.randn(3, 7, 8, generator=gen, dtype=torch.float64)
    grads = []
    for fill in (None, 5.0):
        c = cost.clone()
        if fill is not None:
            c = c.masked_fill(~(row_mask.bool().unsqueeze(-1) & col_mask.bool().unsqueeze(-2)), fill)
        c.requires_grad_()
        (sinkhorn(c, epsilon, 30, 0.0, row_mask, col_mask) * weights).sum().backward()
        grads.append(c.grad)
    pad = ~(row_mask.bool().unsqueeze(-1) & col_mask.bool().unsqueeze(-2))
    assert (grads[0][pad] == 0).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("branch", ["kernel", "log"])
def test_early_stopping_is_per_problem(branch, branch_calls):
    """With tol > 0, a problem's plan and gradient are those it gets alone: the rest of the batch changes nothing."""
    gen = torch.Generator().manual_seed(5)
    epsilon = BRANCH_EPSILON[branch]
    # Different cost scales converge at different speeds, so the problems stop at different iterations.
    scales = torch.tensor([0.05, 0.3, 0.6, 1.0], dtype=torch.float64)
    cost = torch.rand(4, 8, 10, generator=gen, dtype=torch.float64) * scales[:, None, None]
    cost[:, 0, 0] = 0.0
    cost[:, -1, -1] = scales
    row_mask, col_mask = random_masks(4, 8, 10, gen)
    weights = torch.randn(4, 8, 10, generator=gen, dtype=torch.float64)
    batch_cost = cost.clone().requires_grad_()
    plan = sinkhorn(batch_cost, epsilon, 500, 1e-6, row_mask, col_mask)
    (plan * weights).sum().backward()
    assert branch_calls[branch] == 1
    for i in range(4):
        c = cost[i : i + 1].clone().requires_grad_()
        alone = sinkhorn(c, epsilon, 500, 1e-6, row_mask[i : i + 1], col_mask[i : i + 1])
        (alone * weights[i : i + 1]).sum().backward()
        torch.testing.assert_close(plan[i : i + 1], alone, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(batch_cost.grad[i : i + 1], c.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("epsilon", [1e-3, 0.1])
def test_finite_values_and_gradients_small_epsilon_and_bfloat16(dtype, epsilon):
    gen = torch.Generator().manual_seed(6)
    cost = torch.rand(8, 12, 15, generator=gen).to(dtype).requires_grad_()
    row_mask, col_mask = random_masks(8, 12, 15, gen, torch.float32)
    plan = sinkhorn(cost, epsilon, 50, 1e-6, row_mask, col_mask)
    assert plan.dtype == dtype
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.float().sum((-2, -1)), torch.ones(8), atol=2e-2)
    weights = torch.randn(8, 12, 15, generator=gen).to(dtype)
    (plan * weights).sum().backward()
    assert cost.grad.dtype == dtype
    assert torch.isfinite(cost.grad).all()
    assert cost.grad.abs().sum() > 0


@pytest.mark.parametrize("ratio", [29.9, 30.0])
def test_kernel_branch_at_its_limit_is_accurate_in_float32(ratio, branch_calls):
    """The hardest problems the kernel form accepts: rows whose every cost is the largest, next to rows holding 0."""
    gen = torch.Generator().manual_seed(7)
    epsilon = 1.0 / ratio
    cost = torch.rand(6, 10, 12, generator=gen)
    cost[:, 0, 0] = 0.0
    cost[:, 1::3] = 1.0  # each problem's spread is exactly 1
    cost[:, :, 2] = 1.0
    weights = torch.randn(6, 10, 12, generator=gen)

    def solve(c):
        c = c.clone().requires_grad_()
        plan = sinkhorn(c, epsilon, 300, 0.0)
        (plan * weights.to(c.dtype)).sum().backward()
        return plan, c.grad

    plan32, grad32 = solve(cost)
    plan64, grad64 = solve(cost.double())
    assert branch_calls["kernel"] == 2 and branch_calls["log"] == 0
    assert torch.isfinite(plan32).all() and torch.isfinite(grad32).all()
    assert_plans_close(plan32, plan64, rel=1e-4)
    assert (grad32.double() - grad64).abs().max() <= 1e-3 * grad64.abs().max()
    # And the float64 solution is POT's (300 iterations is converged here).
    for i in range(6):
        assert_plans_close(plan64[i].detach(), pot_plan(cost[i], epsilon), rel=1e-4)


@pytest.mark.parametrize(
    "branch,shape",
    [("kernel", (3, 4, 5)), ("kernel", (1, 20, 21)), ("log", (3, 4, 5))],  # 20 x 21 >= 400: other product orientation
)
def test_gradcheck_float64(branch, shape, branch_calls):
    gen = torch.Generator().manual_seed(8)
    epsilon = {"kernel": 0.3, "log": 0.02}[branch]
    cost = torch.rand(*shape, generator=gen, dtype=torch.float64)
    cost[..., 0, 0], cost[..., -1, -1] = 0.0, 1.0  # spread 1: log form for epsilon 0.02
    cost.requires_grad_()
    row_mask = torch.ones(shape[:-1], dtype=torch.float64)
    col_mask = torch.ones(shape[0], shape[-1], dtype=torch.float64)
    if shape[0] > 1:
        row_mask[1, 2] = 0
        col_mask[-1, 1] = 0
    # tol=0: a fixed number of iterations, so the function is smooth and finite differences are meaningful.
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, epsilon, 8, 0.0, row_mask, col_mask), (cost,))
    assert branch_calls[branch] > 0 and branch_calls[{"kernel": "log", "log": "kernel"}[branch]] == 0


def test_kernel_and_log_forms_agree():
    gen = torch.Generator().manual_seed(9)
    cost = torch.rand(4, 6, 9, generator=gen, dtype=torch.float64)
    row_mask, col_mask = random_masks(4, 6, 9, gen)
    assert solver_form(cost, 0.1, row_mask, col_mask) == "kernel"
    assert solver_form(cost, 0.025, row_mask, col_mask) == "log"
    for tol in (0.0, 1e-5):
        kernel = sinkhorn(cost, 0.1, 25, tol, row_mask, col_mask, form="kernel")
        log = sinkhorn(cost, 0.1, 25, tol, row_mask, col_mask, form="log")
        torch.testing.assert_close(kernel, log, rtol=1e-9, atol=1e-14)
    with pytest.raises(ValueError, match="form"):
        sinkhorn(cost, 0.1, 25, form="fast")


@pytest.mark.parametrize("branch", ["kernel", "log"])
def test_batched_over_several_leading_dims(branch):
    gen = torch.Generator().manual_seed(10)
    epsilon = BRANCH_EPSILON[branch]
    cost = torch.rand(2, 3, 4, 6, 7, generator=gen, dtype=torch.float64)
    row_mask = (torch.rand(2, 3, 4, 6, generator=gen) > 0.3).double()
    row_mask[..., 0] = 1
    col_mask = (torch.rand(2, 1, 1, 7, generator=gen) > 0.3).double()  # broadcast over the middle dims
    col_mask[..., 0] = 1
    plan = sinkhorn(cost, epsilon, 40, 1e-8, row_mask, col_mask)
    assert plan.shape == cost.shape
    for i in range(2):
        for j in range(3):
            for k in range(4):
                alone = sinkhorn(cost[i, j, k], epsilon, 40, 1e-8, row_mask[i, j, k], col_mask[i, 0, 0])
                torch.testing.assert_close(plan[i, j, k], alone, rtol=1e-10, atol=1e-14)


def test_check_every_and_max_iter():
    gen = torch.Generator().manual_seed(11)
    cost = torch.rand(16, 10, 10, generator=gen, dtype=torch.float64)
    plan = sinkhorn(cost, 0.1, 1000, 1e-7, check_every=7)
    assert ((plan.sum(-1) - 0.1).norm(dim=-1) <= 1e-7).all()
    one = sinkhorn(cost, 0.1, 1, 0.0)  # a single iteration: column marginals exact, rows not yet
    assert torch.allclose(one.sum(-2), torch.full((16, 10), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn(cost, 0.1, 0)


@pytest.mark.parametrize("shape", [(11, 6, 9), (7, 21, 22)])  # both product orientations
def test_chunks_give_the_same_plan_and_gradient(shape, monkeypatch):
    """Large batches run chunk by chunk (cache-sized); splitting must change nothing, early stopping included."""
    gen = torch.Generator().manual_seed(12)
    scales = torch.linspace(0.1, 1.0, shape[0], dtype=torch.float64)[:, None, None]
    cost = torch.rand(*shape, generator=gen, dtype=torch.float64) * scales
    row_mask, col_mask = random_masks(*shape, gen)
    weights = torch.randn(*shape, generator=gen, dtype=torch.float64)

    def solve():
        c = cost.clone().requires_grad_()
        plan = sinkhorn(c, 0.1, 200, 1e-7, row_mask, col_mask)
        (plan * weights).sum().backward()
        with torch.no_grad():
            inference = sinkhorn(cost, 0.1, 200, 1e-7, row_mask, col_mask)
        return plan.detach(), c.grad, inference

    whole = solve()
    monkeypatch.setattr(sinkhorn_otmel, "CHUNK_ENTRIES", 3 * shape[1] * shape[2])  # chunks of 3 problems
    assert len(sinkhorn_otmel.chunk_slices(*shape)) == (shape[0] + 2) // 3
    chunked = solve()
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(whole[0], whole[2], rtol=1e-12, atol=1e-15)
