"""PyTorch OT-MEL: multimodal entity linking with optimal-transport correlation assignment.

Zhang et al., "Optimal Transport Guided Correlation Assignment for Multimodal Entity Linking", Findings of ACL 2024.
Equation numbers refer to the paper; `docs/method.md` of the project states each decision taken where it is ambiguous.

Shapes: B_m mentions, B_e entities, L_t text tokens, L_v visual tokens (patches plus class token), d_t / d_v CLIP
hidden sizes, P the CLIP projection size, D = `config.hidden_size` (the assignment space).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput


try:  # a package when loaded as Hub remote code, plain modules in a checkout
    from .configuration_otmel import OTMELConfig
except ImportError:
    from configuration_otmel import OTMELConfig


# ----------------------------------------------------------------------------------------------------------------
# Sinkhorn
# ----------------------------------------------------------------------------------------------------------------

# Up to this ratio of a problem's cost spread to epsilon, the kernel exp(-(C - min C) / epsilon) stays above
# e^-30 ~ 1e-13, so the scalings, and their squares met in the backward pass, stay far inside float32's range: the
# solver runs in the kernel form (matrix-vector products, cheap). Above it, it works on log potentials (logsumexp
# updates), which cannot overflow at any epsilon.
_KERNEL_DOMAIN_MAX_RATIO = 30.0


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

    def valid_pairs():
        return row_mask.unsqueeze(-1).bool() & col_mask.unsqueeze(-2).bool()

    with torch.no_grad():
        # Cost range of each problem over all its entries: it bounds the range over the valid ones.
        flat = cost.flatten(-2)
        low, high = flat.amin(dim=-1), flat.amax(dim=-1)  # (aminmax(dim) is several times slower on CPU)
        masked_kernel = False
        if not bool((high - low).max() <= _KERNEL_DOMAIN_MAX_RATIO * epsilon):
            # Padding may hold any value (even inf): range over the valid entries, and a kernel zeroed elsewhere.
            valid = valid_pairs()
            low = torch.where(valid, cost, float("inf")).amin(dim=(-2, -1))
            high = torch.where(valid, cost, float("-inf")).amax(dim=(-2, -1))
            empty = torch.isinf(low)
            low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
            masked_kernel = True
        use_kernel = bool((high - low).max() <= _KERNEL_DOMAIN_MAX_RATIO * epsilon)
    if use_kernel:
        valid = valid_pairs() if masked_kernel else None
        # Without zeroed kernel entries, and with a real row and column in every problem, K v and K^T u stay > 0.
        safe = valid is None and bool((a.amax(-1) > 0).all()) and bool((b.amax(-1) > 0).all())
        plan = _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, low, valid, check_every, safe)
    else:
        plan = _sinkhorn_log(cost, epsilon, max_iter, tol, a, b, valid_pairs(), check_every)
    return plan.to(out_dtype)


# The kernel form runs on chunks of at most this many kernel entries (8 MB in float32): all the iterations of a
# chunk read its kernel from cache instead of memory, about twice as fast on large batches.
_CHUNK_ENTRIES = 2**21


def _chunks(batch: int, n: int, m: int) -> list[slice]:
    size = max(1, _CHUNK_ENTRIES // max(1, n * m))
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
    """Gradient with respect to the cost of one chunk of `_SinkhornKernelFunction`, written into `out`."""
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


class _SinkhornKernelFunction(torch.autograd.Function):
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
        for chunk in _chunks(*cost.shape):
            k = _kernel_from_cost(cost[chunk], shift[chunk], epsilon, None if valid is None else valid[chunk],
                                  out=kernel[chunk])  # fmt: skip
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
            _kernel_backward(grad_plan[chunk], kernel[chunk], k_t, plan[chunk], a[chunk], b[chunk], history,
                             ctx.epsilon, out=grad_cost[chunk])  # fmt: skip
        return grad_cost, None, None, None, None, None, None, None, None, None


def _sinkhorn_kernel(cost, epsilon, max_iter, tol, a, b, shift, valid, check_every, safe=False):
    n, m = cost.shape[-2:]
    cost3, shift2 = cost.reshape(-1, n, m), shift.reshape(-1, 1)
    a2, b2 = a.reshape(-1, n), b.reshape(-1, m)
    valid3 = valid.reshape(-1, n, m) if valid is not None else None
    if torch.is_grad_enabled() and cost.requires_grad:
        plan = _SinkhornKernelFunction.apply(
            cost3, shift2, a2, b2, valid3, epsilon, max_iter, tol, check_every, safe
        )
        return plan.reshape(cost.shape)
    with torch.no_grad():
        plan = cost3.new_empty(cost3.shape)  # contiguous
        for chunk in _chunks(*cost3.shape):
            k = _kernel_from_cost(cost3[chunk], shift2[chunk], epsilon, None if valid3 is None else valid3[chunk],
                                  out=plan[chunk])  # fmt: skip
            u, v, _ = _kernel_iterations(k, _transpose_if_needed(k), a2[chunk], b2[chunk], max_iter, tol,
                                         check_every, safe)  # fmt: skip
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


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


# Softpool bias of padding. Finite, so that 0 times it stays 0 (not NaN, as with -inf), and finite in float16 too (the
# bias may be cast to it under autocast); far below any member (G and token states stay within a few hundred), so
# exp() gives padding a weight of exactly 0.
_SOFTPOOL_PADDING = -3e4


def pool_set(members: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools a set of vectors element-wise (Eq. 13-14).

    Args:
        members (`torch.Tensor` of shape `(..., N, D)`): the set.
        mask (`torch.Tensor` of shape `(..., N)`): 1 for members, 0 for padding (padding takes no part; a set without
            members pools to garbage).
        pooling (`str`): `"softpool"` (sum_i w_i * g_i with w = softmax over the set, per dimension), `"mean"` or
            `"max"`.

    Returns:
        `torch.Tensor` of shape `(..., D)`.
    """
    keep = mask.unsqueeze(-1).bool()
    if pooling == "mean":
        m = keep.to(members.dtype)
        return (members * m).sum(-2) / m.sum(-2).clamp_min(1)
    if pooling == "max":
        return members.masked_fill(~keep, float("-inf")).amax(-2)
    return softpool_biased(members + _softpool_bias(keep, members.dtype))


def _softpool_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, _SOFTPOOL_PADDING)


def softpool_biased(members: torch.Tensor) -> torch.Tensor:
    """Softpool `(..., N, D) -> (..., D)` of members whose padding already holds a large negative bias: the pairwise
    matching adds it inside the product that makes the members, which saves a full-size masking pass."""
    weights = torch.softmax(members, dim=-2)
    return (weights.mul_(members) if not torch.is_grad_enabled() else weights * members).sum(-2)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` with masked entries at zero probability (all-masked slices give zeros, not NaN)."""
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(out, nan=0.0)


def kd_divergence(plan: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Distillation from an OT plan to attention logits of the same projections (Eq. 28-29).

    The plan is a teacher: it is detached here. Targets are the plan normalised along each axis (see method.md).

    Args:
        plan (`torch.Tensor` of shape `(..., n, m)`): OT plan.
        logits (`torch.Tensor` of shape `(..., n, m)`): attention logits Q K^T / sqrt(D).
        mask (`torch.Tensor` of shape `(..., n, m)`, bool): valid entries.
        mode (`str`): `"kl"` (1/2 of row KL plus column KL), `"row_kl"` or `"mse"`.

    Returns:
        `torch.Tensor` of shape `(...)`: the divergence of each problem, summed over its rows (and columns).
    """
    plan = plan.detach()
    terms = []
    for dim in ((-1, -2) if mode != "row_kl" else (-1,)):
        target = plan / plan.sum(dim, keepdim=True).clamp_min(1e-30)
        has = mask.any(dim, keepdim=True)
        if mode == "mse":
            pred = masked_softmax(logits, mask, dim)
            terms.append(((pred - target) ** 2 * mask).sum((-2, -1)))
            continue
        log_pred = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)
        log_pred = torch.where(mask & has, log_pred, torch.zeros_like(log_pred))
        log_target = torch.where(target > 0, target.clamp_min(1e-30).log(), torch.zeros_like(target))
        terms.append((target * (log_target - log_pred) * mask).sum((-2, -1)))
    return sum(terms) / (2 if len(terms) == 2 else 1)


class CorrelationAssignment(nn.Module):
    """Assigns values to queries by OT (Eq. 9-12) or attention (Eq. 6-8) over shared projections.

    Q = X W_q, K = Y W_k, H = Y W_h; attention: A = softmax(Q K^T / sqrt(D)); OT: A = n * Sinkhorn((1 - cos(Q, K)) / 2)
    (the barycentric projection, rows sum to 1). Returns G = A H.
    """

    def __init__(self, query_dim: int, key_dim: int, config: OTMELConfig):
        super().__init__()
        self.config = config
        self.query = nn.Linear(query_dim, config.hidden_size, bias=False)
        self.key = nn.Linear(key_dim, config.hidden_size, bias=False)
        self.value = nn.Linear(key_dim, config.hidden_size, bias=False)

    def assign(self, q, k, q_mask, k_mask, mode, zero_padding=True):
        """Assignment between projected queries and keys: `n` query rows (in `S` sets) per key set.

        Every query set of a batch row is matched with that row's keys by one batched matrix product over the
        flattened sets (`S * n` rows), so scoring `S` candidates costs one product per mention, not `S` small ones.

        Args:
            q (`torch.Tensor` of shape `(B_q, n, D)` or `(B_q, S, n, D)`): projected queries, `B_q` 1 (shared by
                every batch row) or B.
            k (`torch.Tensor` of shape `(B, m, D)`): projected keys.
            q_mask (`(B_q, n)` or `(B_q, S, n)`), k_mask (`(B, m)`): 1 for real rows and columns.
            mode (`str`): `"ot"` or `"attention"`.
            zero_padding (`bool`): give padded query rows an all-zero attention row (as OT gives them). Without it,
                they hold a softmax over the keys that nothing downstream reads (pooling masks them), one full-size
                pass fewer.

        Returns:
            `(assignment, plan, logits)`, each `(B, n, m)` or `(B, S, n, m)`: the row-stochastic map used for G, the
            OT plan (None for attention), and the attention logits Q K^T / sqrt(D) (None for OT unless distillation
            needs them in training; in attention mode, -inf at padded keys).
        """
        sets = q.dim() == 4
        if not sets:
            q, q_mask = q.unsqueeze(1), q_mask.unsqueeze(1)
        (b, m, d), (b_q, s, n) = k.shape, q.shape[:3]
        flat = q.reshape(b_q, s * n, d)  # with B_q = 1, expanded to B only after any per-row work
        k_t = k.transpose(1, 2)
        k_keep = k_mask.bool()
        plan = logits = None
        if mode == "attention":
            # -inf on padded keys gives them exactly zero weight without a full-size mask.
            bias = torch.zeros(b, 1, m, dtype=k.dtype, device=k.device)
            bias = bias.masked_fill_(~k_keep.unsqueeze(1), float("-inf"))
            logits = torch.baddbmm(bias, flat.expand(b, -1, -1), k_t, alpha=1 / math.sqrt(d))
            assignment = torch.softmax(logits, dim=-1)
            if not bool(k_keep.any(-1).all()):
                assignment = torch.nan_to_num(assignment, nan=0.0)  # a key set without keys attends to nothing
            assignment = assignment.view(b, s, n, m)
            logits = logits.view(b, s, n, m)
            if zero_padding:
                assignment = assignment * q_mask.unsqueeze(-1).to(assignment.dtype)
        else:
            if self.training and self.config.distillation != "off":
                logits = torch.bmm(flat.expand(b, -1, -1), k_t).div_(math.sqrt(d)).view(b, s, n, m)
            # (1 - cos) / 2 as one product
            cost = torch.baddbmm(
                k.new_tensor(0.5),
                F.normalize(flat, dim=-1).expand(b, -1, -1),
                F.normalize(k, dim=-1).transpose(1, 2),
                alpha=-0.5,
            ).view(b, s, n, m)
            plan = sinkhorn(
                cost,
                self.config.ot_epsilon,
                self.config.sinkhorn_iterations,
                self.config.sinkhorn_tolerance,
                row_mask=q_mask.expand(b, s, n),
                col_mask=k_mask.unsqueeze(1).expand(b, s, m),
            )
            n_rows = q_mask.to(plan.dtype).sum(-1).clamp_min(1)
            assignment = plan * n_rows[..., None, None]
        if not sets:
            assignment, plan, logits = (x.squeeze(1) if x is not None else None for x in (assignment, plan, logits))
        return assignment, plan, logits


@dataclass
class OTMELFeatures(ModelOutput):
    """Side features of mentions or entities: everything a score needs that depends on one side only.

    Args:
        text_tokens (`torch.FloatTensor` of shape `(B, L_t, d_t)`): CLIP text last hidden state (T).
        text_mask (`torch.LongTensor` of shape `(B, L_t)`): 1 for real tokens.
        visual_tokens (`torch.FloatTensor` of shape `(B, L_v, d_v)`): CLIP vision last hidden state (V), or the learned
            "no image" token in position 0 when the item has no image.
        visual_mask (`torch.LongTensor` of shape `(B, L_v)`): 1 for real patches (only position 0 without image).
        text_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP text feature t.
        visual_global (`torch.FloatTensor` of shape `(B, P)`): normalised CLIP image feature v (or the learned one).
        fused (`torch.FloatTensor` of shape `(B, 2D)`): normalised g^t (+) g^v of Eq. 13-18 (None if fusion is off).
        text_queries / visual_queries (`(B, L, D)`): entity side of the unimodal matching (W'_q projections).
        text_keys / text_values / visual_keys / visual_values (`(B, L, D)`): mention side of the unimodal matching.
        text_global_small / visual_global_small (`(B, D)`): normalised t and v brought to size D (entity side).
        has_image (`torch.BoolTensor` of shape `(B,)`).
    """

    text_tokens: torch.FloatTensor | None = None
    text_mask: torch.LongTensor | None = None
    visual_tokens: torch.FloatTensor | None = None
    visual_mask: torch.LongTensor | None = None
    text_global: torch.FloatTensor | None = None
    visual_global: torch.FloatTensor | None = None
    fused: torch.FloatTensor | None = None
    text_queries: torch.FloatTensor | None = None
    visual_queries: torch.FloatTensor | None = None
    text_keys: torch.FloatTensor | None = None
    text_values: torch.FloatTensor | None = None
    visual_keys: torch.FloatTensor | None = None
    visual_values: torch.FloatTensor | None = None
    text_global_small: torch.FloatTensor | None = None
    visual_global_small: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None
    fusion_maps: dict | None = None


@dataclass
class OTMELScores(ModelOutput):
    """Scores of every (mention, entity) pair, each `(B_m, B_e)` (cosine scale, before the logit scale).

    Args:
        overall (S_O, Eq. 25): mean of the enabled S_F, S_T, S_V.
        fusion (S_F, Eq. 18), text (S_T, Eq. 24), visual (S_V): None when the term is disabled.
        retrieval (S_R): the mention-independent part (S_F and the global terms of S_T, S_V).
        kd_loss: distillation loss of the unimodal assignments of the pairs (scalar), when computed.
        unimodal_maps: assignment maps when requested (`text`, `visual`: `(B_m, B_e, L_e, L_m)`).
    """

    overall: torch.FloatTensor | None = None
    fusion: torch.FloatTensor | None = None
    text: torch.FloatTensor | None = None
    visual: torch.FloatTensor | None = None
    retrieval: torch.FloatTensor | None = None
    kd_loss: torch.FloatTensor | None = None
    unimodal_maps: dict | None = None


@dataclass
class OTMELOutput(ModelOutput):
    """Output of [`OTMELModel.forward`] on a batch of mentions with their gold entities.

    Args:
        loss (`torch.FloatTensor` of shape `()`): J = L_O + L_F + L_T + L_V (+ w_R L_R) (+ w_KD L_KD). L_F and L_R use
            every in-batch entity; L_O, L_T, L_V every in-batch entity or the hard candidates (`pairwise_negatives`).
        loss_o, loss_f, loss_t, loss_v, loss_r, loss_kd: each component (None when disabled).
        logits (`torch.FloatTensor` of shape `(B, B)` or `(B, 1 + k)`): logit_scale * S_O of each mention against every
            gold entity of the batch (the diagonal holds the positives) or, with `config.pairwise_negatives = k`,
            against its `candidate_indices` (column 0 the positive).
        scores ([`OTMELScores`]): the raw score matrices used for L_O, L_T, L_V (same shape as `logits`).
        candidate_indices (`torch.LongTensor` of shape `(B, 1 + k)`): with `pairwise_negatives`, the batch columns
            scored pairwise for each mention.
        mention_features, entity_features ([`OTMELFeatures`]): when `output_features=True`.
    """

    loss: torch.FloatTensor | None = None
    loss_o: torch.FloatTensor | None = None
    loss_f: torch.FloatTensor | None = None
    loss_t: torch.FloatTensor | None = None
    loss_v: torch.FloatTensor | None = None
    loss_r: torch.FloatTensor | None = None
    loss_kd: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    scores: OTMELScores | None = None
    candidate_indices: torch.LongTensor | None = None
    mention_features: OTMELFeatures | None = None
    entity_features: OTMELFeatures | None = None


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class OTMELPreTrainedModel(PreTrainedModel):
    config: OTMELConfig
    config_class = OTMELConfig
    base_model_prefix = "clip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, OTMELModel):
            init.normal_(module.null_visual_token, std=0.02)
            init.normal_(module.null_visual_global, std=0.02)
            init.constant_(module.logit_scale, math.log(self.config.logit_scale_init))


class OTMELModel(OTMELPreTrainedModel):
    r"""OT-MEL: a CLIP encoder shared by mentions and entities, with OT (or attention) correlation assignment for
    multimodal fusion (S_F) and unimodal matching (S_T, S_V), trained contrastively with in-batch negatives and,
    optionally, OT-to-attention distillation.

    Entity features do not depend on the mention: [`~OTMELModel.encode_entities`] computes them once for a whole KB,
    and [`~OTMELModel.score`] scores a batch of mentions against a batch of cached entities.
    """

    # forward has no **kwargs: the Trainer must not treat the loss as already scaled for accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: OTMELConfig):
        super().__init__(config)
        self.clip = CLIPModel._from_config(config.clip_config)
        d_t = config.clip_config.text_config.hidden_size
        d_v = config.clip_config.vision_config.hidden_size
        p = config.clip_config.projection_dim
        d = config.hidden_size
        if config.fusion_assignment != "off":
            self.text_from_visual = CorrelationAssignment(d_t, d_v, config)  # G^{v->t}
            self.visual_from_text = CorrelationAssignment(d_v, d_t, config)  # G^{t->v}
            self.text_value = nn.Linear(d_t, d, bias=False)  # T in the set {T, G^{v->t}} at size D
            self.visual_value = nn.Linear(d_v, d, bias=False)
        if config.unimodal_assignment != "off":
            self.text_matching = CorrelationAssignment(d_t, d_t, config)  # queries: entity tokens
            self.visual_matching = CorrelationAssignment(d_v, d_v, config)
            self.text_global_small = nn.Linear(p, d, bias=False)
            self.visual_global_small = nn.Linear(p, d, bias=False)
        # An item without image is represented by one learned visual token and global feature, never by a fake picture.
        self.null_visual_token = nn.Parameter(torch.empty(d_v))
        self.null_visual_global = nn.Parameter(torch.empty(p))
        # Not named `logit_scale`: CLIP has a parameter of that name, and transformers' loader maps checkpoint keys
        # between `clip.<name>` and `<name>` when the model has both, which swapped the two on every reload.
        self.otmel_logit_scale = nn.Parameter(torch.empty(()), requires_grad=config.learnable_logit_scale)
        self.post_init()

    @property
    def logit_scale(self) -> nn.Parameter:
        """Log of the inverse temperature of the InfoNCE losses (OT-MEL's own, not CLIP's `clip.logit_scale`)."""
        return self.otmel_logit_scale

    @classmethod
    def from_clip(cls, name_or_path: str, **overrides) -> "OTMELModel":
        """A new OT-MEL initialised from any CLIP checkpoint (e.g. `openai/clip-vit-base-patch32` or a local folder).

        `overrides` are OTMELConfig settings (`hidden_size=96`, `distillation="kl"`, ...). The OT-MEL heads are new.
        """
        from transformers import CLIPConfig

        clip_config = CLIPConfig.from_pretrained(name_or_path)
        config = OTMELConfig(clip_config=clip_config, **overrides)
        clip = CLIPModel.from_pretrained(name_or_path)
        model = cls(config)
        missing, unexpected = model.clip.load_state_dict(clip.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"CLIP checkpoint {name_or_path} does not match: missing {missing}, unexpected {unexpected}")
        return model

    # ---- encoders -------------------------------------------------------------------------------------------

    def _assignment_mode(self, configured: str) -> str:
        if configured == "ot" and not self.training and self.config.inference_assignment == "attention":
            return "attention"
        return configured

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        side: str = "entity",
        output_maps: bool = False,
    ) -> OTMELFeatures:
        """Encodes mentions (`side="mention"`) or entities (`side="entity"`).

        Args:
            input_ids (`(B, L_t)`), attention_mask (`(B, L_t)`): tokenised `surface [SEP] sentence` or
                `name [SEP] attributes`.
            pixel_values (`(B, 3, H, W)`, *optional*): images (rows without image are ignored).
            has_image (`(B,)`, *optional*): which rows have an image (default: all when `pixel_values` is given).
            output_maps: also return the fusion assignment maps (for pictures and tests).
        """
        if side not in ("mention", "entity"):
            raise ValueError(f"side must be 'mention' or 'entity', got {side!r}")
        clip = self.clip
        batch = input_ids.shape[0]
        text = clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_tokens = text.last_hidden_state
        text_global = F.normalize(clip.text_projection(text.pooler_output), dim=-1)
        text_mask = attention_mask

        if has_image is None:
            has_image = torch.full((batch,), pixel_values is not None, dtype=torch.bool, device=input_ids.device)
        # Without pixels no row has an image, whatever the flags say.
        has_image = has_image.bool() & (pixel_values is not None)
        d_v = self.null_visual_token.shape[0]
        n_patches = (clip.config.vision_config.image_size // clip.config.vision_config.patch_size) ** 2 + 1
        visual_tokens = self.null_visual_token.to(text_tokens.dtype).expand(batch, n_patches, d_v).clone()
        visual_mask = torch.zeros(batch, n_patches, dtype=text_mask.dtype, device=text_mask.device)
        visual_mask[:, 0] = 1
        visual_global = self.null_visual_global.to(text_tokens.dtype).expand(batch, -1).clone()
        if pixel_values is not None and bool(has_image.any()):
            # Only real pictures go through the vision tower.
            idx = has_image.nonzero(as_tuple=True)[0]
            vision = clip.vision_model(pixel_values=pixel_values[idx].to(text_tokens.dtype))
            visual_tokens = visual_tokens.index_copy(0, idx, vision.last_hidden_state)
            visual_mask = visual_mask.index_fill(0, idx, 1)
            visual_global = visual_global.index_copy(0, idx, clip.visual_projection(vision.pooler_output))
        visual_global = F.normalize(visual_global, dim=-1)

        feats = OTMELFeatures(
            text_tokens=text_tokens,
            text_mask=text_mask,
            visual_tokens=visual_tokens,
            visual_mask=visual_mask,
            text_global=text_global,
            visual_global=visual_global,
            has_image=has_image,
        )
        if self.config.fusion_assignment != "off":
            feats.fused, maps = self._fuse(text_tokens, text_mask, visual_tokens, visual_mask)
            if output_maps:
                feats.fusion_maps = maps
        if self.config.unimodal_assignment != "off":
            if side == "entity":
                feats.text_queries = self.text_matching.query(text_tokens)
                feats.visual_queries = self.visual_matching.query(visual_tokens)
                feats.text_global_small = F.normalize(self.text_global_small(text_global), dim=-1)
                feats.visual_global_small = F.normalize(self.visual_global_small(visual_global), dim=-1)
            else:
                feats.text_keys = self.text_matching.key(text_tokens)
                feats.text_values = self.text_matching.value(text_tokens)
                feats.visual_keys = self.visual_matching.key(visual_tokens)
                feats.visual_values = self.visual_matching.value(visual_tokens)
        return feats

    def encode_entities(self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps=False):
        """Entity-side features (cacheable for a whole KB). See [`~OTMELModel.encode`]."""
        return self.encode(input_ids, attention_mask, pixel_values, has_image, side="entity", output_maps=output_maps)

    def encode_mentions(self, input_ids, attention_mask, pixel_values=None, has_image=None, output_maps=False):
        """Mention-side features. See [`~OTMELModel.encode`]."""
        return self.encode(input_ids, attention_mask, pixel_values, has_image, side="mention", output_maps=output_maps)

    def _fuse(self, text_tokens, text_mask, visual_tokens, visual_mask):
        """Multimodal fusion (Eq. 6-18) of one side: returns normalised g^t (+) g^v `(B, 2D)`, the maps, and KD."""
        mode = self._assignment_mode(self.config.fusion_assignment)
        pooling = self.config.pooling
        maps = {}
        kd = []
        for name, layer, own, own_mask, other, other_mask, own_value in (
            ("v2t", self.text_from_visual, text_tokens, text_mask, visual_tokens, visual_mask, self.text_value),
            ("t2v", self.visual_from_text, visual_tokens, visual_mask, text_tokens, text_mask, self.visual_value),
        ):
            q, k = layer.query(own), layer.key(other)
            assignment, plan, logits = layer.assign(q, k, own_mask, other_mask, mode)
            g = assignment @ layer.value(other)  # (B, L_own, D)
            members = torch.cat([own_value(own), g], dim=1)
            members_mask = torch.cat([own_mask, own_mask], dim=1)
            maps[name] = {"assignment": assignment, "plan": plan, "logits": logits}
            if plan is not None and logits is not None:
                pair_mask = own_mask.unsqueeze(-1).bool() & other_mask.unsqueeze(-2).bool()
                kd.append(kd_divergence(plan, logits, pair_mask, self.config.distillation).mean())
            maps[name]["pooled"] = pool_set(members, members_mask, pooling)
        fused = F.normalize(torch.cat([maps["v2t"]["pooled"], maps["t2v"]["pooled"]], dim=-1), dim=-1)
        maps["kd"] = torch.stack(kd).sum() if kd else None
        return fused, maps

    # ---- scoring --------------------------------------------------------------------------------------------

    def _unimodal(self, layer, queries, q_mask, keys, values, k_mask, global_small, mode, want_kd, want_maps):
        """Pairwise unimodal matching (Eq. 19-24): entity tokens are assigned mention tokens, pair by pair.

        Args:
            queries (`(1 or B_m, n, L_e, D)`), q_mask (`(1 or B_m, n, L_e)`), global_small (`(1 or B_m, n, D)`): the n
                entities scored against every mention (leading 1), or each mention's own n candidates (leading B_m).
            keys, values (`(B_m, L_m, D)`), k_mask (`(B_m, L_m)`): the mentions.

        Returns:
            scores `(B_m, n)` (cosine of the pooled assignment with the entity's global feature), KD loss or None, maps.
        """
        b_m, n, l_e = keys.shape[0], queries.shape[1], queries.shape[2]
        q_mask_pairs = q_mask.expand(b_m, n, -1)
        assignment, plan, logits = layer.assign(queries, keys, q_mask, k_mask, mode, zero_padding=want_maps)
        # One (n L_e x L_m) @ (L_m x D) product per mention rather than n small ones.
        flat = assignment.reshape(b_m, n * l_e, -1)
        if self.config.pooling == "softpool":
            bias = _softpool_bias(q_mask.bool(), flat.dtype).reshape(-1, n * l_e, 1)
            g = torch.baddbmm(bias, flat, values).view(b_m, n, l_e, -1)  # (B_m, n, L_e, D)
            pooled = softpool_biased(g)
        else:
            g = (flat @ values).view(b_m, n, l_e, -1)
            pooled = pool_set(g, q_mask_pairs, self.config.pooling)
        pooled = F.normalize(pooled, dim=-1)
        score = (pooled * global_small).sum(-1)
        kd = None
        if want_kd and plan is not None and logits is not None:
            pair_mask = q_mask_pairs.unsqueeze(-1).bool() & k_mask[:, None, None, :].bool()
            kd = kd_divergence(plan, logits, pair_mask, self.config.distillation).mean()
        maps = {"assignment": assignment, "plan": plan} if want_maps else None
        return score, kd, maps

    def score(
        self,
        mentions: OTMELFeatures,
        entities: OTMELFeatures,
        pairwise: bool = True,
        assignment: str | None = None,
        output_maps: bool = False,
        candidates: torch.LongTensor | None = None,
    ) -> OTMELScores:
        """Scores every mention against every entity, or against its own candidate entities.

        Args:
            mentions ([`OTMELFeatures`]): from [`~OTMELModel.encode_mentions`], B_m rows.
            entities ([`OTMELFeatures`]): from [`~OTMELModel.encode_entities`] (possibly cached), B_e rows.
            pairwise (`bool`): compute the pairwise unimodal matching; False gives only S_F and S_R (stage-1 retrieval).
            assignment (`str`, *optional*): `"ot"` or `"attention"` for this call's unimodal OT assignment
                (default: the config's, i.e. `inference_assignment` in eval mode).
            output_maps (`bool`): return the unimodal assignment maps.
            candidates (`torch.LongTensor` of shape `(B_m, k)`, *optional*): rows of `entities` to score for each mention;
                the pairwise matching then runs for these B_m * k pairs only.

        Returns:
            [`OTMELScores`] with `(B_m, B_e)` matrices, or `(B_m, k)` with `candidates`.
        """
        if candidates is not None:
            picked = OTMELFeatures(
                **{key: value[candidates] for key, value in entities.items() if isinstance(value, torch.Tensor)}
            )
            return self.score_candidates(mentions, picked, pairwise, assignment, output_maps)
        return self._score(mentions, entities, False, pairwise, assignment, output_maps)

    def score_candidates(
        self,
        mentions: OTMELFeatures,
        candidates: OTMELFeatures,
        pairwise: bool = True,
        assignment: str | None = None,
        output_maps: bool = False,
    ) -> OTMELScores:
        """Scores each mention against its own k candidates, whose features have leading shape `(B_m, k)` (e.g.
        gathered from a KB index): the same values as [`~OTMELModel.score`] for those pairs, `(B_m, k)` matrices."""
        return self._score(mentions, candidates, True, pairwise, assignment, output_maps)

    def _score(self, mentions, entities, aligned, pairwise, assignment, output_maps) -> OTMELScores:
        cfg = self.config
        if assignment not in (None, "ot", "attention"):
            raise ValueError(f"assignment must be 'ot', 'attention' or None, got {assignment!r}")
        out = OTMELScores()

        def similarity(a, b):
            return (a.unsqueeze(1) * b).sum(-1) if aligned else a @ b.T

        def entity_side(tensor):
            return tensor if aligned else tensor.unsqueeze(0)

        text_global = similarity(mentions.text_global, entities.text_global)
        visual_global = similarity(mentions.visual_global, entities.visual_global)
        if cfg.fusion_assignment != "off":
            out.fusion = similarity(mentions.fused, entities.fused)
        if cfg.unimodal_assignment == "off":
            out.text, out.visual = text_global, visual_global
            out.retrieval = self._combine(out.fusion, text_global, visual_global)
            out.overall = out.retrieval
            return out
        out.retrieval = self._combine(out.fusion, text_global / 2, visual_global / 2)
        if not pairwise:
            return out
        mode = cfg.unimodal_assignment
        if mode == "ot":
            mode = assignment or self._assignment_mode(mode)
        want_kd = self.training and cfg.distillation != "off"
        s_t, kd_t, maps_t = self._unimodal(
            self.text_matching, entity_side(entities.text_queries), entity_side(entities.text_mask),
            mentions.text_keys, mentions.text_values, mentions.text_mask, entity_side(entities.text_global_small),
            mode, want_kd, output_maps,
        )  # fmt: skip
        s_v, kd_v, maps_v = self._unimodal(
            self.visual_matching, entity_side(entities.visual_queries), entity_side(entities.visual_mask),
            mentions.visual_keys, mentions.visual_values, mentions.visual_mask,
            entity_side(entities.visual_global_small), mode, want_kd, output_maps,
        )  # fmt: skip
        out.text = (s_t + text_global) / 2
        out.visual = (s_v + visual_global) / 2
        out.overall = self._combine(out.fusion, out.text, out.visual)
        if want_kd and kd_t is not None:
            out.kd_loss = kd_t + kd_v
        if output_maps:
            out.unimodal_maps = {"text": maps_t, "visual": maps_v}
        return out

    @staticmethod
    def _combine(*terms):
        terms = [t for t in terms if t is not None]
        return sum(terms) / len(terms)

    # ---- training -------------------------------------------------------------------------------------------

    def contrastive_loss(
        self, scores: torch.Tensor, entity_ids: torch.LongTensor | None = None, offset: int = 0
    ) -> torch.Tensor:
        """InfoNCE of mentions against the batch's gold entities (Eq. 26).

        Args:
            scores (`(B_m, B_e)`): row i's positive is column `offset + i` (B_e > B_m when entities were gathered
                from other processes).
            entity_ids (`(B_e,)`, *optional*): KB index of each column's entity; columns holding row i's gold entity
                elsewhere in the batch (duplicates) are masked out of its negatives.
        """
        logits = self.logit_scale.exp().clamp(max=100) * scores
        target = torch.arange(scores.shape[0], device=scores.device) + offset
        if entity_ids is not None:
            same = entity_ids[target].unsqueeze(1) == entity_ids.unsqueeze(0)
            same[torch.arange(scores.shape[0], device=scores.device), target] = False
            logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, target)

    @staticmethod
    @torch.no_grad()
    def _hard_candidates(retrieval, entity_ids, offset, k):
        """`(B_m, 1 + k)`: each mention's positive column, then the k other in-batch entities with the highest S_R
        (duplicates of the gold entity excluded)."""
        positive = torch.arange(retrieval.shape[0], device=retrieval.device) + offset
        blocked = torch.zeros_like(retrieval, dtype=torch.bool)
        if entity_ids is not None:
            blocked = entity_ids[positive].unsqueeze(1) == entity_ids.unsqueeze(0)
        blocked[torch.arange(retrieval.shape[0], device=retrieval.device), positive] = True
        hard = retrieval.masked_fill(blocked, float("-inf")).topk(k, dim=1).indices
        return torch.cat([positive.unsqueeze(1), hard], dim=1)

    @staticmethod
    def _gather(features: OTMELFeatures, entity_ids: torch.LongTensor | None):
        """All-gathers entity features across processes, keeping gradients (in-batch negatives from every process).

        Returns the gathered features and ids, and the offset of this process's entities among them.
        """
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_gather

        gathered = OTMELFeatures()
        for key, value in features.items():
            if isinstance(value, torch.Tensor) and value.dtype != torch.bool:  # has_image is not needed to score
                gathered[key] = torch.cat(all_gather(value), dim=0)
        if entity_ids is not None:
            entity_ids = torch.cat(all_gather(entity_ids), dim=0)
        return gathered, entity_ids, dist.get_rank() * features.text_mask.shape[0]

    def forward(
        self,
        mention_input_ids: torch.LongTensor,
        mention_attention_mask: torch.LongTensor,
        entity_input_ids: torch.LongTensor,
        entity_attention_mask: torch.LongTensor,
        mention_pixel_values: torch.FloatTensor | None = None,
        mention_has_image: torch.BoolTensor | None = None,
        entity_pixel_values: torch.FloatTensor | None = None,
        entity_has_image: torch.BoolTensor | None = None,
        entity_ids: torch.LongTensor | None = None,
        return_loss: bool = True,
        output_features: bool = False,
        output_maps: bool = False,
        gather_across_processes: bool = False,
    ) -> OTMELOutput:
        r"""Scores a batch of B mentions against their B gold entities (in-batch negatives) and computes the loss.

        Args:
            mention_input_ids, mention_attention_mask (`(B, L_m)`): tokenised mentions.
            entity_input_ids, entity_attention_mask (`(B, L_e)`): tokenised gold entities (row i is mention i's).
            mention_pixel_values / entity_pixel_values (`(B, 3, H, W)`, *optional*) with `*_has_image` (`(B,)`).
            entity_ids (`(B,)`, *optional*): KB index of each gold entity, to mask duplicates from the negatives.
            return_loss (`bool`): compute the loss.
            output_features, output_maps: return the side features / assignment maps.
            gather_across_processes (`bool`): under torch.distributed, score each mention against the gold entities of
                every process (texts must be padded to the same length on every process).
        """
        cfg = self.config
        m = self.encode_mentions(
            mention_input_ids, mention_attention_mask, mention_pixel_values, mention_has_image, output_maps=True
        )
        e = self.encode_entities(
            entity_input_ids, entity_attention_mask, entity_pixel_values, entity_has_image, output_maps=True
        )
        e_all, ids_all, offset = e, entity_ids, 0
        if gather_across_processes and torch.distributed.is_available() and torch.distributed.is_initialized():
            e_all, ids_all, offset = self._gather(e, entity_ids)
        n_entities = e_all.text_mask.shape[0]
        k = cfg.pairwise_negatives
        subset = cfg.unimodal_assignment != "off" and 0 < k < n_entities - 1
        full = self.score(m, e_all, pairwise=not subset, output_maps=output_maps)
        scores, candidates = full, None
        if subset:
            candidates = self._hard_candidates(full.retrieval, ids_all, offset, k)
            scores = self.score(m, e_all, candidates=candidates, output_maps=output_maps)
        scale = self.logit_scale.exp().clamp(max=100)
        out = OTMELOutput(logits=scale * scores.overall, scores=scores, candidate_indices=candidates)
        if return_loss:

            def pairwise_loss(matrix):
                if subset:  # column 0 is the positive; duplicates of it were never candidates
                    return F.cross_entropy(scale * matrix, torch.zeros_like(candidates[:, 0]))
                return self.contrastive_loss(matrix, ids_all, offset)

            out.loss_o = pairwise_loss(scores.overall)
            total = out.loss_o
            if full.fusion is not None:
                out.loss_f = self.contrastive_loss(full.fusion, ids_all, offset)
                total = total + out.loss_f
            out.loss_t = pairwise_loss(scores.text)
            out.loss_v = pairwise_loss(scores.visual)
            total = total + out.loss_t + out.loss_v
            if cfg.retrieval_loss_weight > 0 and cfg.unimodal_assignment != "off":
                out.loss_r = self.contrastive_loss(full.retrieval, ids_all, offset)
                total = total + cfg.retrieval_loss_weight * out.loss_r
            if self.training and cfg.distillation != "off":
                kd_terms = [x for x in (scores.kd_loss, (m.fusion_maps or {}).get("kd"), (e.fusion_maps or {}).get("kd"))]
                kd_terms = [x for x in kd_terms if x is not None]
                if kd_terms:
                    out.loss_kd = sum(kd_terms)
                    total = total + cfg.kd_weight * out.loss_kd
            out.loss = total
        if not output_maps:
            m.fusion_maps = e.fusion_maps = None
        if output_features or output_maps:
            out.mention_features, out.entity_features = m, e
        return out


OTMELModel.register_for_auto_class("AutoModel")


def _register_in_library():
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("otmel", OTMELConfig, exist_ok=True)
    AutoModel.register(OTMELConfig, OTMELModel, exist_ok=True)


_register_in_library()

__all__ = ["OTMELModel", "OTMELPreTrainedModel", "OTMELOutput", "OTMELScores", "OTMELFeatures", "sinkhorn"]
