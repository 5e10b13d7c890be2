"""Entropic optimal transport (Sinkhorn), batched and in the log domain, for CL2CM's word alignment.

``sinkhorn(cost [B,n,m], a [B,n], b [B,m], eps, iters)`` returns the plan ``P [B,n,m]`` minimising
``<P, C> - eps * H(P)`` subject to ``P 1 = a`` and ``P^T 1 = b``. Sequences of different lengths
share one padded batch: a padded position has zero mass (or is False in the optional masks) and
gets no mass in the plan. The iterations update the dual potentials ``f, g`` with log-sum-exp, so
small ``eps`` does not underflow the Gibbs kernel ``exp(-C / eps)`` (stable down to eps ~ 1e-4 on
costs in [0, 2]). Everything runs on the tensors' device (CPU or GPU); autograd works
through the unrolled iterations, but CL2CM computes plans on detached costs (see ccrk/cl2cm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_marginal(mask: torch.Tensor) -> torch.Tensor:
    """Uniform mass over the True positions of each row of ``mask`` ([B, n] bool) -> [B, n] float."""
    mask = mask.float()
    return mask / mask.sum(dim=-1, keepdim=True).clamp(min=1.0)


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between every row of ``x`` [B, n, D] and of ``y`` [B, m, D]: [B, n, m] in [0, 2]."""
    return 1.0 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).transpose(1, 2)


def sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float = 0.05, iters: int = 50,
             mask_a: torch.Tensor | None = None, mask_b: torch.Tensor | None = None,
             anneal: bool = False, tol: float | None = None) -> torch.Tensor:
    """Entropic OT plans [B, n, m] for a batch of problems (log-domain Sinkhorn, ``iters`` sweeps).

    ``a`` [B, n] and ``b`` [B, m] are the marginals (each row summing to the same total, usually 1);
    positions where the mask is False (default: where the mass is 0) are padding and get no mass.
    Each sweep fits the rows then the columns, so the returned plan's column marginals hold exactly
    and its row marginals up to the convergence reached. Small ``eps`` converges slowly (sweeps grow
    like 1 / eps): ``anneal`` starts at eps = the largest cost and shrinks it geometrically to ``eps``
    over the first half of the sweeps (epsilon scaling, warm-started potentials). ``tol`` stops early
    once every row marginal is within ``tol`` (checked every 10 sweeps, a host sync: training uses a
    fixed ``iters``). Computes in float32, or float64 for float64 input.
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, n, m], got shape {tuple(cost.shape)}")
    bsz, n, m = cost.shape
    if a.shape != (bsz, n) or b.shape != (bsz, m):
        raise ValueError(f"marginals must be [B, n] = {(bsz, n)} and [B, m] = {(bsz, m)}, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if int(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost, a, b = cost.to(dtype), a.to(dtype), b.to(dtype)
        mask_a = a > 0 if mask_a is None else mask_a.bool() & (a > 0)
        mask_b = b > 0 if mask_b is None else mask_b.bool() & (b > 0)
        pair = mask_a[:, :, None] & mask_b[:, None, :]
        # Padding pairs cost +inf: they drop out of every log-sum-exp and get exp(-inf) = 0 mass.
        cost = cost.masked_fill(~pair, float("inf"))
        log_a = a.clamp(min=torch.finfo(dtype).tiny).log()
        log_b = b.clamp(min=torch.finfo(dtype).tiny).log()
        # Dual potentials f [B, n], g [B, m] (in cost units); 0 at padding keeps them finite.
        f, g = torch.zeros_like(a), torch.zeros_like(b)
        schedule = [float(eps)] * int(iters)
        if anneal:
            top = max(float(cost.masked_fill(~pair, 0.0).max()), float(eps))
            steps = max(1, int(iters) // 2)
            schedule = [max(float(eps), top * (float(eps) / top) ** (t / steps)) for t in range(int(iters))]
        for sweep, e in enumerate(schedule):
            f = torch.where(mask_a, e * (log_a - _lse((g[:, None, :] - cost) / e, dim=2)), 0.0)
            g = torch.where(mask_b, e * (log_b - _lse((f[:, :, None] - cost) / e, dim=1)), 0.0)
            if tol is not None and sweep % 10 == 9 and e == float(eps):
                rows = torch.exp((f[:, :, None] + g[:, None, :] - cost) / e).sum(dim=2)
                if float((rows - a.masked_fill(~mask_a, 0.0)).abs().max()) < tol:
                    break
        return torch.exp((f[:, :, None] + g[:, None, :] - cost) / float(eps))


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp that gives 0 (not -inf, hence no NaN downstream) over all-padding slices."""
    out = torch.logsumexp(x, dim=dim)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """<P, C> per problem: [B]."""
    return (plan * cost).sum(dim=(1, 2))
