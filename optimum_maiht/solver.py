"""mAIHT for one linear layer: a pure tensor function (no model, file or Hub code).

Problem (docs/design.md, "The layer problem"): given the weight ``W0`` (out x in) and the Gram matrix
``H = X^T X`` of the layer's calibration inputs, find ``W`` in the sparsity set minimising

    f(W) = 1/2 tr((W - W0) H (W - W0)^T)        (= 1/2 ||X W^T - X W0^T||_F^2)

We work in the column-scaled space ``V = W * d`` with ``d = sqrt(diag H)``, so ``|V|`` is the Wanda score
and the first projection reproduces Wanda's mask; ``G = H / (d d^T) + ridge * I`` keeps the problem
well-posed. The iteration is the monotone accelerated proximal gradient of Li & Lin (2015) with the hard
thresholding projection as its prox; the monotone choice is made per row whenever the sparsity set is
row-separable. A conjugate-gradient refit on the final support follows. Every step can only lower the
(ridge-regularised) objective, and its history is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SolverResult",
    "maiht_prune",
    "magnitude_prune",
    "project",
    "wanda_prune",
    "column_scale",
    "relative_output_error",
    "lambda_max",
]


@dataclass
class SolverResult:
    """What :func:`maiht_prune` returns."""

    weight: Tensor
    """The pruned weight, same shape, dtype and device as the input; pruned entries are exact zeros."""
    mask: Tensor
    """Boolean mask of the kept entries (exactly the requested count or N:M pattern)."""
    history: list[float] = field(default_factory=list)
    """Objective after the initial (Wanda) projection, after each iteration and after each refit step."""
    error_init: float = float("nan")
    """Relative output error ``||X(W-W0)^T||^2 / ||X W0^T||^2`` of the initial (Wanda) mask, no refit."""
    error: float = float("nan")
    """Relative output error of the returned weight."""
    iterations: int = 0
    refit_iterations: int = 0
    step_size: float = float("nan")


# --------------------------------------------------------------------------------------------------
# projections onto the sparsity set


def _topk_mask(scores: Tensor, k: int, dim: int) -> Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, scores.topk(k, dim=dim, sorted=False).indices, True)
    return mask


def project(values: Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row") -> Tensor:
    """Mask of the entries the hard-thresholding projection keeps (largest ``|values|``).

    ``nm=(N, M)`` keeps N of every M consecutive entries of a row; otherwise unstructured, comparing
    entries within each row (``scope="row"``, Wanda's group) or over the whole matrix (``scope="layer"``).
    Ties are broken by ``topk``, so the kept count is always exact.
    """
    scores = values.abs()
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"input dimension {cols} is not a multiple of M={m} for the {n}:{m} pattern")
        return _topk_mask(scores.reshape(rows, cols // m, m), n, dim=2).reshape(rows, cols)
    if scope == "row":
        return _topk_mask(scores, cols - round(sparsity * cols), dim=1)
    if scope == "layer":
        return _topk_mask(scores.reshape(-1), scores.numel() - round(sparsity * scores.numel()), 0).view_as(
            scores
        )
    raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")


# --------------------------------------------------------------------------------------------------
# scaling, step size, objective


def column_scale(hessian: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Return ``d`` and ``G = H / (d d^T) + ridge * I`` (float32).

    Dead features (``H_jj = 0``) get a tiny positive ``d_j`` instead of a division by zero, so their
    weights score lowest and are pruned first, and nothing becomes NaN.
    """
    h = hessian.float()
    d = torch.diagonal(h).clamp_min(0).sqrt()
    floor = max(float(d.max()) * 1e-6, 1e-12) if d.numel() else 1e-12
    d = d.clamp_min(floor)
    g = h / d[:, None] / d[None, :]
    g.diagonal().add_(ridge)
    return d, g


def lambda_max(g: Tensor, iterations: int = 50, seed: int = 0) -> float:
    """Largest eigenvalue of the symmetric PSD matrix ``g`` by seeded power iteration."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(g.shape[0], 1, generator=gen).to(g.device, g.dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iterations):
        w = g @ v
        lam = float((v * w).sum())
        norm = w.norm()
        if norm == 0:
            break
        v = w / norm
    return lam


def _row_objective(e: Tensor, eg: Tensor) -> Tensor:
    """Per-row ``1/2 e G e^T`` given ``e`` and ``e @ G``."""
    return 0.5 * torch.linalg.vecdot(e, eg, dim=1)


def _keep(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask``, else +0.0 (a product with the mask would leave -0.0 behind)."""
    return torch.where(mask, values, 0.0)


def relative_output_error(weight: Tensor, weight0: Tensor, hessian: Tensor) -> float:
    """``tr((W-W0) H (W-W0)^T) / tr(W0 H W0^T)``: the share of the layer's output energy lost."""
    h = hessian.float()
    e = (weight.float() - weight0.float()).to(h.device)
    w0 = weight0.float().to(h.device)
    den = float((w0 @ h * w0).sum())
    return float((e @ h * e).sum()) / den if den > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# baselines (also used by the tests and the benchmarks)


def magnitude_prune(
    weight: Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row"
) -> Tensor:
    """Keep the largest ``|W|``: the classic magnitude baseline."""
    return _keep(weight, project(weight.float(), sparsity, nm, scope))


def wanda_prune(
    weight: Tensor, hessian: Tensor, sparsity: float, nm: tuple[int, int] | None = None, scope: str = "row"
) -> Tensor:
    """Keep the largest ``|W_ij| * ||X_j||`` (Wanda, Sun et al. 2023), no weight update."""
    d, _ = column_scale(hessian.to(weight.device), 0.0)
    return _keep(weight, project(weight.float() * d, sparsity, nm, scope))


# --------------------------------------------------------------------------------------------------
# the solver


def maiht_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    scope: str = "row",
    iterations: int = 20,
    refit_iterations: int = 30,
    ridge: float = 0.01,
    formulation: str = "constraint",
    seed: int = 0,
) -> SolverResult:
    """Prune one linear layer with mAIHT and refit the kept weights.

    Args:
        weight: ``(out, in)`` weight (any float dtype; computed in float32 on its device).
        hessian: ``(in, in)`` Gram matrix ``X^T X`` of the layer's inputs.
        sparsity: fraction of weights set to zero (for N:M it must equal ``1 - N/M``).
        nm: ``(N, M)`` for an N:M pattern, ``None`` for unstructured.
        scope: unstructured comparison group, ``"row"`` (per output channel) or ``"layer"``.
        iterations: accelerated hard-thresholding iterations.
        refit_iterations: conjugate-gradient steps on the fixed support.
        ridge: added to the unit diagonal of the scaled Gram matrix.
        formulation: ``"constraint"`` (project onto the sparsity set each step) or ``"penalty"``
            (the paper's l0-penalty form: threshold at ``sqrt(2 lam step)`` with ``lam`` adapted toward the
            target density, then an exact top-k fixes the mask; unstructured only).
        seed: seeds the power iteration that estimates the step size.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight must be (out, in) and hessian (in, in); got {tuple(weight.shape)} and "
            f"{tuple(hessian.shape)}"
        )
    if formulation not in ("constraint", "penalty"):
        raise ValueError(f"formulation must be 'constraint' or 'penalty', got {formulation!r}")
    if formulation == "penalty" and nm is not None:
        raise ValueError("formulation='penalty' applies to unstructured sparsity only")

    device = weight.device
    w0 = weight.detach().float()
    h = hessian.to(device)
    d, g = column_scale(h, ridge)
    v0 = w0 * d
    # The per-row choice is only valid when the sparsity set is a product of per-row sets.
    row_separable = nm is not None or scope == "row" or formulation == "penalty"

    def proj(u: Tensor) -> Tensor:
        return _keep(u, project(u, sparsity, nm, scope))

    def grad_and_obj(x: Tensor) -> tuple[Tensor, Tensor]:
        e = x - v0
        eg = e @ g
        return eg, _row_objective(e, eg)

    # Safe step: 1/L with L an upper estimate of lambda_max(G); the monotone safeguard below also keeps the
    # current iterate whenever both candidates are worse, so the history cannot increase even if it is low.
    step = 1.0 / (1.05 * lambda_max(g, seed=seed))

    wanda_mask = project(v0, sparsity, nm, scope)  # |V| is the Wanda score: the first projection is Wanda
    x = _keep(v0, wanda_mask)
    gx, fx = grad_and_obj(x)
    history = [_total(fx)]
    x_prev, gx_prev, z, gz = x, gx, x, gx
    t_prev, t = 0.0, 1.0

    lam = 0.0
    keep_target = 1.0 - sparsity
    if formulation == "penalty":
        thr = float(v0.abs().flatten().kthvalue(max(1, round(sparsity * v0.numel()))).values)
        lam = thr * thr / (2 * step)

    def penalised(f: Tensor, u: Tensor) -> Tensor:
        return f + lam * (u != 0).sum(dim=1) if formulation == "penalty" else f

    def prox(u: Tensor) -> Tensor:
        if formulation == "penalty":
            return _keep(u, u.abs() > math.sqrt(2 * lam * step))
        return proj(u)

    for _ in range(iterations):
        a, b = t_prev / t, (t_prev - 1.0) / t
        # Y = X + a (Z - X) + b (X - X_prev); grad f is affine, so grad f(Y) is the same combination
        y = x.mul(1.0 - a + b).add_(z, alpha=a).sub_(x_prev, alpha=b)
        gy = gx.mul(1.0 - a + b).add_(gz, alpha=a).sub_(gx_prev, alpha=b)
        z = prox(y.sub_(gy, alpha=step))
        gz, fz = grad_and_obj(z)
        vn = prox(torch.add(x, gx, alpha=-step))
        gv, fv = grad_and_obj(vn)
        t_prev, t = t, (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0

        fz_p, fv_p, fx_p = penalised(fz, z), penalised(fv, vn), penalised(fx, x)
        if row_separable:
            take_z = fz_p <= fv_p
            move = torch.where(take_z, fz_p, fv_p) <= fx_p
        else:  # one choice for the whole matrix keeps the layer-wide count exact
            take_z = (fz_p.sum() <= fv_p.sum()).expand_as(fx)
            move = (torch.minimum(fz_p.sum(), fv_p.sum()) <= fx_p.sum()).expand_as(fx)
        tz, tv = take_z & move, ~take_z & move
        x_prev, gx_prev = x, gx
        x = torch.where(tz[:, None], z, torch.where(tv[:, None], vn, x))
        gx = torch.where(tz[:, None], gz, torch.where(tv[:, None], gv, gx))
        fx = torch.where(tz, fz, torch.where(tv, fv, fx))
        history.append(_total(penalised(fx, x)))
        if formulation == "penalty":
            density = float((x != 0).float().mean())
            lam *= math.exp(2.0 * (density - keep_target) / keep_target)

    # Exact-size mask: in the constraint form x is feasible, so this keeps all its nonzeros (filling up
    # with zeros where a kept weight happens to be exactly zero); the penalty form needs the final top-k.
    mask = project(x, sparsity, nm, scope)
    if formulation == "penalty":
        x = _keep(x, mask)
        gx, fx = grad_and_obj(x)
        history.append(_total(fx))

    x, fx, refit_history = _refit(x, fx, v0, g, mask, refit_iterations)
    history.extend(refit_history)

    w = _keep(x / d, mask).to(weight.dtype)
    if not torch.isfinite(w).all():
        raise FloatingPointError("mAIHT produced non-finite weights; check the calibration activations")
    return SolverResult(
        weight=w,
        mask=mask,
        history=history,
        error_init=relative_output_error(_keep(w0, wanda_mask), w0, h),
        error=relative_output_error(w.float(), w0, h),
        iterations=iterations,
        refit_iterations=refit_iterations,
        step_size=step,
    )


def _refit(
    x: Tensor, fx: Tensor, v0: Tensor, g: Tensor, mask: Tensor, steps: int
) -> tuple[Tensor, Tensor, list[float]]:
    """Minimise f on the fixed support by conjugate gradient, all rows at once (one matmul a step)."""
    history: list[float] = []
    if steps == 0:
        return x, fx, history
    m = mask.to(x.dtype)
    eg = (x - v0) @ g
    r = -eg * m
    p = r.clone()
    rs = torch.linalg.vecdot(r, r, dim=1)
    tiny = torch.finfo(x.dtype).tiny
    best_x, best_f = x, fx
    for _ in range(steps):
        pg = p @ g
        ap = pg * m
        curv = torch.linalg.vecdot(p, ap, dim=1)
        alpha = torch.where(curv > tiny, rs / curv.clamp_min(tiny), torch.zeros_like(rs))
        x = torch.addcmul(x, alpha[:, None], p)
        eg = torch.addcmul(eg, alpha[:, None], pg)
        r = torch.addcmul(r, alpha[:, None], ap, value=-1.0)
        rs_new = torch.linalg.vecdot(r, r, dim=1)
        beta = torch.where(rs > tiny, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = torch.addcmul(r, beta[:, None], p)
        rs = rs_new
        # CG lowers the energy every step in exact arithmetic; keeping each row's best iterate makes the
        # history non-increasing in floating point too.
        f = _row_objective(x - v0, eg)
        better = f < best_f
        best_x = torch.where(better[:, None], x, best_x)
        best_f = torch.where(better, f, best_f)
        history.append(_total(best_f))
    return _keep(best_x, mask), best_f, history


def _total(row_objective: Tensor) -> float:
    """Sum of per-row objectives in float64, so that row-wise decreases show as a decreasing total."""
    return float(row_objective.double().sum())
