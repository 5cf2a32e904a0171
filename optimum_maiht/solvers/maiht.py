"""mAIHT for one linear layer: a pure tensor function (no model, file or Hub code).

Problem (docs/design.md, "The layer problem"): given the weight ``W0`` (out x in) and the Gram matrix
``H = X^T X`` of the layer's calibration inputs, find ``W`` in the sparsity set minimising

    f(W) = 1/2 tr((W - W0) H (W - W0)^T)        (= 1/2 ||X W^T - X W0^T||_F^2)

We work in the column-scaled space ``V = W * d`` with ``d = sqrt(diag H)``, so ``|V|`` is the Wanda score
and the first projection reproduces Wanda's mask; ``G = H / (d d^T) + ridge * I`` keeps the problem
well-posed.

Iteration (docs/design.md, "The mAIHT iteration"): :func:`maiht` runs four named steps,

1. scale the problem and pick a safe step size (:class:`_LayerProblem`);
2. start from the Wanda mask (or a given feasible ``start``) and run the monotone accelerated proximal
   gradient of Li & Lin (2015) (:func:`_accelerated_iht`, one step is :func:`_li_lin_step`); its prox is
   the sparsity operator, the hard-thresholding projection (:class:`_Constraint`) or the l0-penalty
   threshold with its adaptive lambda (:class:`_Penalty`); the monotone choice is made per row whenever
   the sparsity set is row-separable (:func:`_monotone_choice`);
3. fix the exact-size final mask (:meth:`_Constraint.finish`);
4. refit the kept weights by conjugate gradient on that support (:func:`_refit`).

Every step can only lower the (ridge-regularised) objective, and its history is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .common import (
    LayerSpec,
    OutputError,
    SolverResult,
    check_options,
    check_problem,
    feature_norms,
    keep,
    project,
    scored_result,
)
from .sparsegpt import NotPositiveDefinite, sparsegpt_sweep

__all__ = ["maiht", "column_scale", "lambda_max"]

logger = logging.getLogger(__name__)


def maiht(
    weight: Tensor,
    gram: Tensor,
    spec: LayerSpec,
    *,
    iterations: int = 20,
    refit_iterations: int = 30,
    ridge: float = 0.01,
    formulation: str = "constraint",
    seed: int = 0,
    start: Tensor | str = "wanda",
) -> SolverResult:
    """Prune one linear layer with mAIHT and refit the kept weights.

    Args:
        weight: ``(out, in)`` weight (any float dtype; computed in float32 on its device).
        gram: ``(in, in)`` Gram matrix ``X^T X`` of the layer's inputs.
        spec: the sparsity asked for.
        iterations: accelerated hard-thresholding iterations.
        refit_iterations: conjugate-gradient steps on the fixed support.
        ridge: added to the unit diagonal of the scaled Gram matrix.
        formulation: ``"constraint"`` (project onto the sparsity set each step) or ``"penalty"``
            (the paper's l0-penalty form: threshold at ``sqrt(2 lam step)`` with ``lam`` adapted toward the
            target density, then an exact top-k fixes the mask; unstructured only).
        seed: seeds the power iteration that estimates the step size.
        start: where the iteration starts: ``"wanda"`` (Wanda's projection of ``weight``, the paper's
            start), ``"sparsegpt"`` (SparseGPT's masks and weights on the same ``gram``: mAIHT can then
            only lower SparseGPT's layer error), or a feasible ``(out, in)`` weight of its own.

    The returned error is never above the start's (in ``weight``'s dtype).
    """
    _check_arguments(weight, gram, spec, iterations, refit_iterations, ridge, formulation, seed)
    w0 = weight.detach().float()
    h = gram.to(weight.device)
    error = OutputError(w0, h)
    start_point = _start_point(start, weight, h, spec, error)
    start_weight = None if start_point is None else start_point[0]

    # 1. the column-scaled problem and its step size
    problem = _LayerProblem.build(w0, h, ridge, seed)
    sparse = _Penalty.start(spec, problem) if formulation == "penalty" else _Constraint(spec)

    # 2. mAIHT from the Wanda mask (|V| is the Wanda score, so the first projection is Wanda) or the start
    wanda = project(problem.v0, spec)
    x0 = keep(problem.v0, wanda) if start_weight is None else start_weight.float() * problem.d
    point, history = _accelerated_iht(problem, sparse, x0, iterations)

    # 3. the exact-size final mask, 4. the refit on it
    mask, point = sparse.finish(problem, point, history)
    x = _refit(problem, point, mask, refit_iterations, history)

    w = keep(x / problem.d, mask).to(weight.dtype)
    if not torch.isfinite(w).all():
        raise FloatingPointError("mAIHT produced non-finite weights; check the calibration activations")
    result = scored_result(
        w0,
        h,
        spec,
        w,
        mask,
        wanda=wanda,
        error=error,
        history=history,
        iterations=iterations,
        refit_iterations=refit_iterations,
        step_size=problem.step,
    )
    if start_point is None:
        return _no_worse_than_start(result, keep(weight.detach(), wanda), result.error_wanda, spec)
    return _no_worse_than_start(result, *start_point, spec)


def _check_arguments(
    weight: Tensor,
    gram: Tensor,
    spec: LayerSpec,
    iterations: int,
    refit_iterations: int,
    ridge: float,
    formulation: str,
    seed: int,
) -> None:
    """The checks every solver makes, plus mAIHT's own: the penalty form is for unstructured sparsity."""
    check_problem(weight, gram, spec)
    check_options(
        iterations=iterations,
        refit_iterations=refit_iterations,
        ridge=ridge,
        formulation=formulation,
        seed=seed,
    )
    if formulation == "penalty" and spec.nm is not None:
        raise ValueError("formulation='penalty' applies to unstructured sparsity only (spec.nm is set)")


def _start_point(
    start: Tensor | str, weight: Tensor, gram: Tensor, spec: LayerSpec, error: OutputError
) -> tuple[Tensor, float] | None:
    """The start as a feasible weight with its relative output ``error`` (``None``: Wanda's projection,
    computed in the scaled space)."""
    if isinstance(start, str):
        check_options(start=start)
        if start == "wanda":
            return None
        try:
            start_weight, _ = sparsegpt_sweep(weight, gram, spec)
        except NotPositiveDefinite as err:  # mAIHT's ridge still makes its own problem well-posed
            logger.warning("%s: mAIHT starts from Wanda's mask instead", err)
            return None
    else:
        start_weight = _feasible_start(start, weight, spec)
    return start_weight, error(start_weight)


def _feasible_start(start: Tensor, weight: Tensor, spec: LayerSpec) -> Tensor:
    """``start`` in ``weight``'s dtype and device, checked to be a finite point of the sparsity set."""
    if start.shape != weight.shape:
        raise ValueError(
            f"start must have the weight's shape {tuple(weight.shape)}, not {tuple(start.shape)}"
        )
    start = start.detach().to(weight.device, weight.dtype)
    if not torch.isfinite(start).all():
        raise ValueError("start must be finite")
    if ((start != 0) & ~project(start, spec)).any():
        raise ValueError(
            f"start is not in the sparsity set of {spec}: it has too many nonzeros in some group"
        )
    return start


def _no_worse_than_start(
    result: SolverResult, start: Tensor, start_error: float, spec: LayerSpec
) -> SolverResult:
    """``result``, or the start point itself if the result's output error is higher than the start's.

    The iteration is monotone in the ridge-regularised objective, not in the output error, and the result is
    rounded to the weight's dtype; this guard makes "never worse than the start" hold by construction.
    """
    if result.error <= start_error:
        return result
    logger.info(
        "mAIHT's error %.4g is above its start's %.4g: returning the start", result.error, start_error
    )
    mask = project(start, spec)
    return dataclasses.replace(result, weight=keep(start, mask), mask=mask, error=start_error)


# --------------------------------------------------------------------------------------------------
# scaling and step size


def column_scale(gram: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Return ``d = sqrt(diag H)`` (floored, :func:`feature_norms`) and ``G = H / (d d^T) + ridge * I``
    (float32)."""
    h = gram.float()
    d = feature_norms(h)
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


# --------------------------------------------------------------------------------------------------
# step 1: the layer problem in the column-scaled space


class _Point(NamedTuple):
    """An iterate with what the iteration needs of it: ``x``, ``grad = (x - V0) G``, per-row objective."""

    x: Tensor
    grad: Tensor
    f: Tensor


def _where(rows: Tensor, a: _Point, b: _Point) -> _Point:
    """Row ``i`` of ``a`` where ``rows[i]``, else row ``i`` of ``b``."""
    return _Point(
        torch.where(rows[:, None], a.x, b.x),
        torch.where(rows[:, None], a.grad, b.grad),
        torch.where(rows, a.f, b.f),
    )


@dataclass
class _LayerProblem:
    """``f(V) = 1/2 tr((V - V0) G (V - V0)^T)``, ``V0 = W0 * d``, with the step size ``1/L``."""

    v0: Tensor
    d: Tensor
    g: Tensor
    step: float

    @classmethod
    def build(cls, w0: Tensor, h: Tensor, ridge: float, seed: int) -> _LayerProblem:
        d, g = column_scale(h, ridge)
        # Safe step: 1/L with L an upper estimate of lambda_max(G); the monotone safeguard also keeps the
        # current iterate whenever both candidates are worse, so the history cannot increase even if L is
        # underestimated.
        return cls(v0=w0 * d, d=d, g=g, step=1.0 / (1.05 * lambda_max(g, seed=seed)))

    def evaluate(self, x: Tensor) -> _Point:
        """``x`` with its gradient and per-row objective (one matmul)."""
        e = x - self.v0
        eg = e @ self.g
        return _Point(x, eg, _row_objective(e, eg))


# --------------------------------------------------------------------------------------------------
# the sparsity operator: the prox of step 2 and the exact final mask of step 3


@dataclass
class _Constraint:
    """Constraint form: the prox is the hard-thresholding projection onto the sparsity set."""

    spec: LayerSpec

    @property
    def row_separable(self) -> bool:
        """Whether the sparsity set is a product of per-row sets (then the monotone choice is per row)."""
        return self.spec.nm is not None or self.spec.scope == "row"

    def prox(self, u: Tensor) -> Tensor:
        return keep(u, project(u, self.spec))

    def penalised(self, f: Tensor, x: Tensor) -> Tensor:
        """The per-row objective the monotone choice compares."""
        return f

    def adapt(self, x: Tensor) -> None:
        """Update the operator after an iteration (nothing to do for the constraint)."""

    def finish(self, problem: _LayerProblem, point: _Point, history: list[float]) -> tuple[Tensor, _Point]:
        """Step 3: the exact-size mask of the final iterate (and the iterate on it).

        In the constraint form ``x`` is feasible, so this keeps all its nonzeros (filling up with zeros where
        a kept weight happens to be exactly zero) and leaves the iterate and ``history`` as they are.
        """
        return project(point.x, self.spec), point


@dataclass
class _Penalty(_Constraint):
    """The paper's l0-penalty form ``f + lam ||x||_0``: the prox keeps ``|u| > sqrt(2 lam step)``, and
    ``lam`` is adapted after each iteration toward the target density; a final top-k fixes the count."""

    lam: float
    step: float

    @classmethod
    def start(cls, spec: LayerSpec, problem: _LayerProblem) -> _Penalty:
        """Start with the threshold that the first prox would give the target sparsity on ``V0``."""
        v0 = problem.v0
        thr = float(v0.abs().flatten().kthvalue(max(1, round(spec.sparsity * v0.numel()))).values)
        return cls(spec, lam=thr * thr / (2 * problem.step), step=problem.step)

    @property
    def row_separable(self) -> bool:
        return True  # the penalty is a sum over entries

    def prox(self, u: Tensor) -> Tensor:
        return keep(u, u.abs() > math.sqrt(2 * self.lam * self.step))

    def penalised(self, f: Tensor, x: Tensor) -> Tensor:
        return f + self.lam * (x != 0).sum(dim=1)

    def adapt(self, x: Tensor) -> None:
        keep_target = 1.0 - self.spec.sparsity
        density = float((x != 0).float().mean())
        self.lam *= math.exp(2.0 * (density - keep_target) / keep_target)

    def finish(self, problem: _LayerProblem, point: _Point, history: list[float]) -> tuple[Tensor, _Point]:
        """The penalty only approximates the count: an exact top-k fixes the mask, the iterate is cut to
        it and its objective appended to ``history``."""
        mask, _ = super().finish(problem, point, history)
        point = problem.evaluate(keep(point.x, mask))
        history.append(_total(point.f))
        return mask, point


# --------------------------------------------------------------------------------------------------
# step 2: the monotone accelerated iteration (Li & Lin 2015)


def _accelerated_iht(
    problem: _LayerProblem, sparse: _Constraint, x0: Tensor, iterations: int
) -> tuple[_Point, list[float]]:
    """Run ``iterations`` monotone accelerated steps from ``x0``; return the last iterate and the history
    (objective at ``x0``, then the penalised objective after each step)."""
    x = x_prev = z = problem.evaluate(x0)
    history = [_total(x.f)]
    t_prev, t = 0.0, 1.0
    for _ in range(iterations):
        x_next, z = _li_lin_step(problem, sparse, x, x_prev, z, t_prev / t, (t_prev - 1.0) / t)
        x_prev, x = x, x_next
        t_prev, t = t, (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        history.append(_total(sparse.penalised(x.f, x.x)))
        sparse.adapt(x.x)
    return x, history


def _li_lin_step(
    problem: _LayerProblem, sparse: _Constraint, x: _Point, x_prev: _Point, z: _Point, a: float, b: float
) -> tuple[_Point, _Point]:
    """One step of the monotone accelerated proximal gradient (Li & Lin 2015); returns ``(x, z)``.

    The accelerated candidate ``z = prox(y - step grad f(y))`` starts from the extrapolation
    ``y = x + a (z - x) + b (x - x_prev)``; the plain candidate ``v = prox(x - step grad f(x))`` is the
    safeguard. The new ``x`` is the better of the two, or the old ``x`` if both are worse.
    """
    step = problem.step
    # grad f is affine, so grad f(y) is the same combination of the known gradients: no extra matmul
    y = x.x.mul(1.0 - a + b).add_(z.x, alpha=a).sub_(x_prev.x, alpha=b)
    gy = x.grad.mul(1.0 - a + b).add_(z.grad, alpha=a).sub_(x_prev.grad, alpha=b)
    z = problem.evaluate(sparse.prox(y.sub_(gy, alpha=step)))
    v = problem.evaluate(sparse.prox(torch.add(x.x, x.grad, alpha=-step)))
    take_z, take_v = _monotone_choice(
        sparse.penalised(z.f, z.x),
        sparse.penalised(v.f, v.x),
        sparse.penalised(x.f, x.x),
        sparse.row_separable,
    )
    return _where(take_z, z, _where(take_v, v, x)), z


def _monotone_choice(fz: Tensor, fv: Tensor, fx: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    """Rows that move to ``z`` and rows that move to ``v``, given the per-row objectives of ``z, v, x``.

    Per row when the sparsity set is row-separable; otherwise one choice for the whole matrix, which keeps
    the layer-wide count exact.
    """
    if per_row:
        take_z = fz <= fv
        move = torch.where(take_z, fz, fv) <= fx
    else:
        take_z = (fz.sum() <= fv.sum()).expand_as(fx)
        move = (torch.minimum(fz.sum(), fv.sum()) <= fx.sum()).expand_as(fx)
    return take_z & move, ~take_z & move


# --------------------------------------------------------------------------------------------------
# step 4: the refit on the final support


def _refit(problem: _LayerProblem, point: _Point, mask: Tensor, steps: int, history: list[float]) -> Tensor:
    """Minimise f on the fixed support by conjugate gradient, all rows at once (one matmul a step).

    Appends the objective after each step to ``history`` and returns the refitted ``x``.
    """
    x, v0, g = point.x, problem.v0, problem.g
    if steps == 0:
        return x
    m = mask.to(x.dtype)
    eg = point.grad  # (x - V0) G, already known
    r = -eg * m
    p = r.clone()
    rs = torch.linalg.vecdot(r, r, dim=1)
    tiny = torch.finfo(x.dtype).tiny
    best_x, best_f = x, point.f
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
    return keep(best_x, mask)


def _total(row_objective: Tensor) -> float:
    """Sum of per-row objectives in float64, so that row-wise decreases show as a decreasing total."""
    return float(row_objective.double().sum())
