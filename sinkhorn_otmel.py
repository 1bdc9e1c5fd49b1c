"""Entropic optimal transport for OT-MEL: a batched, masked, differentiable Sinkhorn solver.

Only solvers live here (no model code). The public surface:

- [`sinkhorn`]: plans of any batch of problems between uniform marginals over their unmasked rows and columns.
- [`solver_form`]: which of the two forms (`"kernel"` or `"log"`) `sinkhorn(form="auto")` runs for given problems.
- `CHUNK_ENTRIES`: kernel entries per chunk of the kernel form (a cache-size setting; changing it changes no plan).
- [`SinkhornKernelFunction`]: the kernel form's autograd function (for profiling its backward pass).

The updates are those of POT's `sinkhorn_log` (row potential first); the kernel form runs the same updates on
scalings, which is several times cheaper when it is numerically safe (see `KERNEL_DOMAIN_MAX_RATIO`).
"""

import torch


# Up to this ratio of a problem's cost spread to epsilon, the kernel exp(-(C - min C) / epsilon) stays above
# e^-30 ~ 1e-13, so the scalings, and their squares met in the backward pass, stay far inside float32's range: the
# solver runs in the kernel form (matrix-vector products, cheap). Above it, it works on log potentials (logsumexp
# updates), which cannot overflow at any epsilon.
KERNEL_DOMAIN_MAX_RATIO = 30.0


def _marginal_error(plan_rows: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    # L2 norm of the row-marginal violation of each problem, shape (...).
    return torch.linalg.vector_norm(plan_rows - a, dim=-1)


def _still_running(error: torch.Tensor, tol: float, running: torch.Tensor | None) -> torch.Tensor | None | bool:
    """Problems that keep iterating after a convergence check: None if all, False if none, else a bool mask."""
    running = error >= tol if running is None else running & (error >= tol)
    count = int(running.sum())  # the only synchronisation of an iteration
    if count == 0:
        return False
    return None if count == running.numel() else running


def sinkhorn(
    cost: torch.Tensor,
    epsilon: float,
    max_iter: int,
    tol: float = 1e-6,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    check_every: int = 1,
    form: str = "auto",
) -> torch.Tensor:
    r"""Entropic optimal transport between uniform marginals, batched over any leading dimensions.

    Solves min_P <C, P> - epsilon * H(P) subject to P 1 = mu, P^T 1 = nu, with mu uniform over the unmasked rows and
    nu uniform over the unmasked columns (masked rows and columns receive exactly zero mass). The plan is
    differentiable with respect to `cost`, with the exact gradient of the iterations run. The updates are those of the
    log-domain Sinkhorn (POT's `sinkhorn_log`, row potential first); when every problem's cost spread is at most 30
    epsilon, the same updates run in the kernel form (batched matrix-vector products on cache-sized chunks of the
    batch, and a hand-written backward pass that keeps only the scaling vectors of each iteration), which gives the
    same plan at a fraction of the cost. Half-precision inputs are solved in float32 and the plan is returned in the
    input dtype.

    Each problem stops at the first check where its own marginal error is below `tol`, so its plan does not depend on
    the other problems of the batch, nor on padding (up to rounding).

    Args:
        cost (`torch.Tensor` of shape `(..., n, m)`): transport costs.
        epsilon (`float`): entropic regularisation (> 0).
        max_iter (`int`): maximum number of iterations (each updates both potentials), at least 1.
        tol (`float`): a problem stops once the L2 norm of its row-marginal error is below `tol` (its column marginals
            are exact after each iteration); checked every `check_every` iterations, at no extra matrix product. 0 runs
            exactly `max_iter` iterations.
        row_mask (`torch.Tensor` of shape `(..., n)`, *optional*): 1 for real rows, 0 for padding.
        col_mask (`torch.Tensor` of shape `(..., m)`, *optional*): 1 for real columns, 0 for padding.
        check_every (`int`): iterations between two convergence checks.
        form (`str`): `"auto"` (the kernel form when every problem's cost spread is at most `KERNEL_DOMAIN_MAX_RATIO`
            epsilon, else the log form; see [`solver_form`]), `"kernel"` or `"log"` to force one (forcing the kernel
            form on a wide cost range can underflow).

    Returns:
        `torch.Tensor` of shape `(..., n, m)`: the transport plan; its entries sum to 1 over each problem.
    """
    if max_iter < 1:
        raise ValueError(f"sinkhorn needs max_iter >= 1, got {max_iter}")
    out_dtype = cost.dtype
    work_dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    cost = cost.to(work_dtype)
    n, m = cost.shape[-2:]
    batch_shape = cost.shape[:-2]
    if row_mask is None:
        row_mask = cost.new_ones(*batch_shape, n)
    if col_mask is None:
        col_mask = cost.new_ones(*batch_shape, m)
    row_mask = row_mask.to(work_dtype).expand(*batch_shape, n)
    col_mask = col_mask.to(work_dtype).expand(*batch_shape, m)
    a = row_mask / row_mask.sum(-1, keepdim=True).clamp_min(1)
    b = col_mask / col_mask.sum(-1, keepdim=True).clamp_min(1)
    if cost.numel() == 0:
        return cost.new_zeros(cost.shape, dtype=out_dtype)

    if form not in ("auto", "kernel", "log"):
        raise ValueError(f"sinkhorn form must be 'auto', 'kernel' or 'log', got {form!r}")
    shift, valid = _kernel_shift(cost, epsilon, row_mask, col_mask, force=form == "kernel")
    if form == "log" or shift is None:
        plan = _sinkhorn_log(cost, epsilon, max_iter, tol, a, b, _valid_pairs(row_mask, col_mask), check_every)
    else:
        # Without zeroed kernel entries, and with a real row and column in every problem, K v and K^T u stay > 0.
        safe = valid is None and bool((a.amax(-1) > 0).all()) and bool((b.amax(-1) > 0).all())
        plan = _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, shift, valid, check_every, safe)
    return plan.to(out_dtype)


def _valid_pairs(row_mask: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    return row_mask.unsqueeze(-1).bool() & col_mask.unsqueeze(-2).bool()


@torch.no_grad()
def _kernel_shift(cost, epsilon, row_mask, col_mask, force=False):
    """`(shift, valid)` for the kernel form, or `(None, None)` when it is not safe (and not forced).

    shift `(...)`: each problem's smallest valid cost; valid: the valid-pair mask when the kernel must be zeroed
    outside it (padding costs out of range), else None.
    """
    # Cost range of each problem over all its entries: it bounds the range over the valid ones.
    flat = cost.flatten(-2)
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)  # (aminmax(dim) is several times slower on CPU)
    if bool((high - low).max() <= KERNEL_DOMAIN_MAX_RATIO * epsilon):
        return low, None
    # Padding may hold any value (even inf): range over the valid entries, and a kernel zeroed elsewhere.
    valid = _valid_pairs(row_mask, col_mask)
    low = torch.where(valid, cost, float("inf")).amin(dim=(-2, -1))
    high = torch.where(valid, cost, float("-inf")).amax(dim=(-2, -1))
    empty = torch.isinf(low)
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    if force or bool((high - low).max() <= KERNEL_DOMAIN_MAX_RATIO * epsilon):
        return low, valid
    return None, None


def solver_form(cost: torch.Tensor, epsilon: float, row_mask=None, col_mask=None) -> str:
    """`"kernel"` or `"log"`: the form [`sinkhorn`] runs with `form="auto"` for these problems (masks as there)."""
    n, m = cost.shape[-2:]
    batch_shape = cost.shape[:-2]
    row_mask = cost.new_ones(*batch_shape, n) if row_mask is None else row_mask.to(cost.dtype).expand(*batch_shape, n)
    col_mask = cost.new_ones(*batch_shape, m) if col_mask is None else col_mask.to(cost.dtype).expand(*batch_shape, m)
    return "log" if _kernel_shift(cost, epsilon, row_mask, col_mask)[0] is None else "kernel"


# The kernel form runs on chunks of at most this many kernel entries (8 MB in float32): all the iterations of a
# chunk read its kernel from cache instead of memory, about twice as fast on large batches.
CHUNK_ENTRIES = 2**21


def chunk_slices(batch: int, n: int, m: int) -> list[slice]:
    size = max(1, CHUNK_ENTRIES // max(1, n * m))
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def _transpose_if_needed(kernel):
    # PyTorch's CPU `bmm` runs a plain loop when n * m < 400 and BLAS above. A row vector times a transposed view of
    # a contiguous matrix is fast either way; a row vector times the matrix itself is fast only with BLAS, so small
    # kernels keep a contiguous copy of their transpose for K^T u.
    return kernel.transpose(-1, -2).contiguous() if kernel.shape[-2] * kernel.shape[-1] < 400 else None


def _batched_products(kernel, kernel_t):
    """`(K v, K^T u)` as functions of row vectors `(B, 1, m)` and `(B, 1, n)`, for flat `(B, n, m)` kernels.

    Each is a row vector times a matrix, in the orientation that is fast for batched products of small matrices
    (several times faster than a matrix times a column). `kernel_t` is the contiguous transpose, or None if not needed.
    """
    kernel_mt = kernel.transpose(-1, -2)
    transposed = kernel if kernel_t is None else kernel_t.transpose(-1, -2)
    return lambda v: torch.bmm(v, kernel_mt), lambda u: torch.bmm(u, transposed)


def _kernel_iterations(kernel, kernel_t, a, b, max_iter, tol, check_every, safe, record=False):
    """Sinkhorn scalings of flat `(B, n, m)` kernels, without autograd: returns `(u, v, history)`, `(B, n)`, `(B, m)`.

    u_t = a / (K v_{t-1}), v_t = b / (K^T u_t), v_0 = b. The row marginal of the current plan, u * (K v), needs the
    K v that the next update computes anyway, so a convergence check costs no extra product. A problem whose error is
    below `tol` keeps its scalings from then on. `safe`: K v and K^T u cannot vanish (no zeroed kernel entries, no
    problem without rows or columns), so no division needs a guard. With `record`, history holds every u_t `(T, B, n)`,
    v_t `(T, B, m)` and whether each problem was updated at iteration t `(T, B)`; else it is None.
    """
    tiny = torch.finfo(kernel.dtype).tiny
    kv, ktu = _batched_products(kernel, kernel_t)
    a, b = a.unsqueeze(-2), b.unsqueeze(-2)  # row vectors throughout: no reshaping inside the loop
    u, v = None, b
    running = None  # None: every problem is still iterating; else (B, 1, 1) bool
    us, vs, updated = [], [], []
    for it in range(max_iter):
        r = kv(v)
        if it > 0 and tol > 0 and it % check_every == 0:
            error = torch.linalg.vector_norm(torch.addcmul(a, u, r, value=-1.0), dim=-1, keepdim=True)
            running = _still_running(error, tol, running)
            if running is False:
                break
        u_new = a / (r if safe else r.clamp_min_(tiny))
        s = ktu(u_new)
        v_new = b / (s if safe else s.clamp_min_(tiny))
        if running is not None:
            u_new = torch.where(running, u_new, u)
            v_new = torch.where(running, v_new, v)
        u, v = u_new, v_new
        if record:
            us.append(u)
            vs.append(v)
            updated.append(torch.ones_like(a[:, 0, 0], dtype=torch.bool) if running is None else running[:, 0, 0])
    history = (torch.stack(us)[:, :, 0], torch.stack(vs)[:, :, 0], torch.stack(updated)) if record else None
    return u.squeeze(-2), v.squeeze(-2), history


def _kernel_from_cost(cost, shift, epsilon, valid, out=None):
    # exp(-(C - shift) / epsilon) in two passes; shift is each problem's smallest cost, so the largest entry is 1.
    kernel = torch.sub(shift.unsqueeze(-1) / epsilon, cost, alpha=1.0 / epsilon, out=out).exp_()
    if valid is not None:
        kernel.masked_fill_(~valid, 0.0)
    return kernel


def _kernel_backward(grad_plan, kernel, kernel_t, plan, a, b, history, epsilon, out):
    """Gradient with respect to the cost of one chunk of `SinkhornKernelFunction`, written into `out`."""
    us, vs, updated = history
    kv, ktu = _batched_products(kernel, kernel_t)
    n_iter = us.shape[0]
    # u_t = a / r_t with r_t = K v_{t-1}; v_t = b / s_t with s_t = K^T u_t. du/dr = -u^2 / a, dv/ds = -v^2 / b
    # (0 on padding, where u and v are 0).
    du_dr = us.square().div_(torch.where(a > 0, a, 1.0))
    dv_ds = vs.square().div_(torch.where(b > 0, b, 1.0))
    # With Q = gP * P: dL/du_T = (Q 1) / u_T and dL/dv_T = (Q^T 1) / v_T.
    weighted = torch.mul(grad_plan, plan, out=out)
    u, v = us[-1], vs[-1]
    grad_u = torch.where(u > 0, weighted.sum(-1) / torch.where(u > 0, u, 1.0), 0.0)
    grad_v = torch.where(v > 0, weighted.sum(-2) / torch.where(v > 0, v, 1.0), 0.0)
    # A problem's last update (t_last) receives dL/du_T, dL/dv_T; after it, its scalings were only copied.
    last = updated & ~torch.cat([updated[1:], torch.zeros_like(updated[:1])])
    last = last.to(grad_u.dtype).unsqueeze(-1)
    # Backward through the iterations with x_t = dL/ds_t and y_t = -dL/dr_t (signs chosen so that a step negates
    # nothing): x_t = (K^T y_{t+1} - [t = t_last] dL/dv_T) dv_ds_t, y_t = (K x_t + [t = t_last] dL/du_T) du_dr_t.
    # Both are 0 for a problem after its last update.
    xs, ys = torch.empty_like(vs), torch.empty_like(us)
    y = None
    for t in range(n_iter - 1, -1, -1):
        start_v = grad_v * last[t]
        x = start_v.neg_() if y is None else ktu(y.unsqueeze(-2)).squeeze(-2).sub_(start_v)
        x = torch.mul(x, dv_ds[t], out=xs[t])
        y = torch.mul(kv(x.unsqueeze(-2)).squeeze(-2).addcmul_(grad_u, last[t]), du_dr[t], out=ys[t])
    # dL/dK = gP * u_T v_T^T + sum_t (u_t (dL/ds_t)^T + (dL/dr_t) v_{t-1}^T)
    #       = gP * u_T v_T^T + sum_t (u_t x_t^T - y_t v_{t-1}^T),   and dL/dC = -K * dL/dK / epsilon.
    v_prev = torch.cat([b.unsqueeze(0), vs[:-1]], dim=0)
    rank_one = torch.bmm(us.permute(1, 2, 0), xs.transpose(0, 1))
    rank_one.baddbmm_(ys.permute(1, 2, 0), v_prev.transpose(0, 1), alpha=-1.0)
    return weighted.addcmul_(rank_one, kernel).mul_(-1.0 / epsilon)


class SinkhornKernelFunction(torch.autograd.Function):
    """Kernel-form Sinkhorn of flat `(B, n, m)` problems, with the exact gradient of the iterations run.

    Backward pass through u_t = a / (K v_{t-1}), v_t = b / (K^T u_t), P = diag(u_T) K diag(v_T): the gradient with
    respect to K is gP * u_T v_T^T plus two rank-one terms per iteration, summed by two batched matrix products over
    the saved scaling vectors, instead of one full-size tensor per iteration as autograd would build. Both passes run
    chunk by chunk (`_chunks`).
    """

    @staticmethod
    def forward(ctx, cost, shift, a, b, valid, epsilon, max_iter, tol, check_every, safe):
        kernel, plan = cost.new_empty(cost.shape), cost.new_empty(cost.shape)  # contiguous
        ctx.chunks = []
        for chunk in chunk_slices(*cost.shape):
            k = _kernel_from_cost(
                cost[chunk], shift[chunk], epsilon, None if valid is None else valid[chunk], out=kernel[chunk]
            )
            k_t = _transpose_if_needed(k)
            u, v, history = _kernel_iterations(k, k_t, a[chunk], b[chunk], max_iter, tol, check_every, safe, True)
            torch.mul(k, u.unsqueeze(-1), out=plan[chunk]).mul_(v.unsqueeze(-2))
            ctx.chunks.append((chunk, k_t, history))
        ctx.epsilon = epsilon
        ctx.save_for_backward(kernel, plan, a, b)
        return plan

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_plan):
        kernel, plan, a, b = ctx.saved_tensors
        grad_cost = kernel.new_empty(kernel.shape)
        for chunk, k_t, history in ctx.chunks:
            _kernel_backward(
                grad_plan[chunk],
                kernel[chunk],
                k_t,
                plan[chunk],
                a[chunk],
                b[chunk],
                history,
                ctx.epsilon,
                out=grad_cost[chunk],
            )
        return grad_cost, None, None, None, None, None, None, None, None, None


def _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, shift, valid, check_every, safe=False):
    n, m = cost.shape[-2:]
    cost3, shift2 = cost.reshape(-1, n, m), shift.reshape(-1, 1)
    a2, b2 = a.reshape(-1, n), b.reshape(-1, m)
    valid3 = valid.reshape(-1, n, m) if valid is not None else None
    if torch.is_grad_enabled() and cost.requires_grad:
        plan = SinkhornKernelFunction.apply(cost3, shift2, a2, b2, valid3, epsilon, max_iter, tol, check_every, safe)
        return plan.reshape(cost.shape)
    with torch.no_grad():
        plan = cost3.new_empty(cost3.shape)  # contiguous
        for chunk in chunk_slices(*cost3.shape):
            k = _kernel_from_cost(
                cost3[chunk], shift2[chunk], epsilon, None if valid3 is None else valid3[chunk], out=plan[chunk]
            )
            u, v, _ = _kernel_iterations(
                k, _transpose_if_needed(k), a2[chunk], b2[chunk], max_iter, tol, check_every, safe
            )
            k.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2))
        return plan.reshape(cost.shape)


def _sinkhorn_log(cost, epsilon, max_iter, tol, a, b, valid, check_every):
    # A finite stand-in for -inf: exp() still gives exactly 0, and logsumexp of a fully masked row keeps a finite
    # gradient (an all -inf slice back-propagates NaN).
    log_kernel = (-cost / epsilon).masked_fill(~valid, torch.finfo(cost.dtype).min / 4)
    # log(0) for padding gives -inf potentials; they are replaced by 0 so that no NaN reaches the gradient.
    log_a = torch.where(a > 0, a.clamp_min(1e-38).log(), torch.zeros_like(a))
    log_b = torch.where(b > 0, b.clamp_min(1e-38).log(), torch.zeros_like(b))
    row_has = valid.any(-1)
    col_has = valid.any(-2)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    running = None  # None: every problem is still iterating

    def lse(x, dim, has):
        out = torch.logsumexp(x, dim=dim)
        return torch.where(has, out, torch.zeros_like(out))

    for it in range(max_iter):
        row_lse = lse(log_kernel + g.unsqueeze(-2), -1, row_has)
        if it > 0 and tol > 0 and it % check_every == 0:
            # The row marginal of the current plan, exp(f + lse), reuses the logsumexp of the next update.
            with torch.no_grad():
                running = _still_running(_marginal_error(torch.exp(row_lse + f) * row_has, a), tol, running)
            if running is False:
                break
        f_new = torch.where(row_has, log_a - row_lse, f)
        g_new = torch.where(col_has, log_b - lse(log_kernel + f_new.unsqueeze(-1), -2, col_has), g)
        if running is None:
            f, g = f_new, g_new
        else:
            f = torch.where(running.unsqueeze(-1), f_new, f)
            g = torch.where(running.unsqueeze(-1), g_new, g)
    return torch.exp(log_kernel + f.unsqueeze(-1) + g.unsqueeze(-2))


__all__ = [
    "CHUNK_ENTRIES",
    "KERNEL_DOMAIN_MAX_RATIO",
    "SinkhornKernelFunction",
    "chunk_slices",
    "sinkhorn",
    "solver_form",
]
