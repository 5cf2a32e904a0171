"""What every layer solver shares: the question (:class:`LayerSpec`), the answer (:class:`SolverResult`),
the input checks, the projection onto the sparsity set and the error that scores an answer.

The layer problem (docs/design.md, "The layer problem"): given ``W0`` (out x in) and the Gram matrix
``H = X^T X`` (in x in) of the layer's calibration inputs, find ``W`` with the requested sparsity pattern
and a small output error ``tr((W - W0) H (W - W0)^T)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..constants import START_NAMES

__all__ = [
    "LayerSpec",
    "OutputError",
    "SolverResult",
    "check_options",
    "check_problem",
    "feature_norms",
    "keep",
    "project",
    "relative_output_error",
    "scored_result",
    "topk_mask",
    "wanda_mask",
]

SCOPES = ("row", "layer")


@dataclass(frozen=True)
class LayerSpec:
    """The sparsity one layer problem asks for (checked on construction).

    ``sparsity``: fraction of zeros, ``0 < sparsity < 1``; for N:M it must equal ``1 - N/M``.
    ``nm``: ``(N, M)`` keeps N of every M consecutive input weights of a row; ``None`` is unstructured.
    ``scope``: the unstructured comparison group, ``"row"`` (the exact count in every row, Wanda's group)
    or ``"layer"`` (the exact count over the whole matrix); N:M patterns ignore it.
    """

    sparsity: float
    nm: tuple[int, int] | None = None
    scope: str = "row"

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s < 1.0:
            raise ValueError(f"LayerSpec.sparsity must be a number in (0, 1), got {s!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"LayerSpec.scope must be 'row' or 'layer', got {self.scope!r}")
        if self.nm is None:
            return
        nm = self.nm
        if not (
            isinstance(nm, tuple) and len(nm) == 2 and all(type(v) is int for v in nm) and 0 < nm[0] < nm[1]
        ):
            raise ValueError(f"LayerSpec.nm must be a tuple (N, M) of integers with 0 < N < M, got {nm!r}")
        if abs(s - (1.0 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"LayerSpec.sparsity={s} does not match nm={nm}, which keeps {nm[0]} of {nm[1]}; "
                f"set sparsity to {1.0 - nm[0] / nm[1]:g}"
            )


@dataclass
class SolverResult:
    """What a layer solver returns."""

    weight: Tensor
    """The pruned copy: same shape, dtype and device as the input weight; pruned entries are exact +0.0."""
    mask: Tensor
    """Boolean mask of the kept entries: exactly the spec's count or N:M pattern (``weight`` is zero off it,
    and may hold a few zeros on it, e.g. weights of inputs that are always zero)."""
    error: float
    """Relative output error ``tr(E H E^T) / tr(W0 H W0^T)`` of ``weight``, ``E = weight - W0``."""
    error_wanda: float
    """The same for Wanda's mask without any update: a yardstick every solver fills in."""
    history: list[float] = field(default_factory=list)
    """The objective after each step, where the solver has one (mAIHT), else empty."""
    iterations: int = 0
    """mAIHT: accelerated hard-thresholding iterations run (0 for one-shot solvers)."""
    refit_iterations: int = 0
    """mAIHT: conjugate-gradient steps of the refit (0 for one-shot solvers)."""
    step_size: float = float("nan")
    """mAIHT: the step ``1/L`` of the iteration (NaN for one-shot solvers)."""


# --------------------------------------------------------------------------------------------------
# input checks, once for every solver


def check_problem(weight: Tensor, gram: Tensor, spec: LayerSpec) -> None:
    """Reject a layer problem no solver can take, before any work: shapes, dtypes, N:M fit, finiteness."""
    if not isinstance(spec, LayerSpec):
        raise ValueError(f"spec must be a LayerSpec, got {type(spec).__name__}")
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"weight must be (out, in) and gram (in, in); got {tuple(weight.shape)} and {tuple(gram.shape)}"
        )
    if not weight.is_floating_point() or not gram.is_floating_point():
        raise ValueError(f"weight and gram must be floating point, got {weight.dtype} and {gram.dtype}")
    if spec.nm is not None and weight.shape[1] % spec.nm[1]:
        n, m = spec.nm
        raise ValueError(f"input size {weight.shape[1]} is not a multiple of M={m} for the {n}:{m} pattern")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(gram).all()):
        raise ValueError("weight and gram must be finite; check the layer and its calibration activations")


# option name: (kind, smallest value or the allowed choices)
_OPTIONS: dict[str, tuple[str, Any]] = {
    "iterations": ("int", 0),
    "refit_iterations": ("int", 0),
    "seed": ("int", 0),
    "block_size": ("int", 1),
    "ridge": ("number", 0.0),
    "dampening": ("number", 0.0),
    "formulation": ("choice", ("constraint", "penalty")),
    "start": ("choice", START_NAMES),
}


def check_options(**options: Any) -> None:
    """Reject solver option values out of range (one table for every solver's options)."""
    for name, value in options.items():
        kind, rule = _OPTIONS[name]
        if kind == "choice":
            if not isinstance(value, str) or value not in rule:
                shown = repr(value) if isinstance(value, (str, int, float)) else f"a {type(value).__name__}"
                raise ValueError(f"{name} must be {' or '.join(map(repr, rule))}, got {shown}")
            continue
        types = (int,) if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, types) or not value >= rule:  # "not >=": NaN
            raise ValueError(
                f"{name} must be {'an integer' if kind == 'int' else 'a number'} >= {rule}, got {value!r}"
            )
        if kind == "number" and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")


# --------------------------------------------------------------------------------------------------
# the sparsity set


def topk_mask(scores: Tensor, k: int, dim: int, largest: bool = True) -> Tensor:
    """Mask of the ``k`` largest (or smallest) ``scores`` along ``dim``; exact count, ties broken by topk."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, scores.topk(k, dim=dim, largest=largest, sorted=False).indices, True)
    return mask


def project(values: Tensor, spec: LayerSpec) -> Tensor:
    """Mask of the entries the hard-thresholding projection keeps (largest ``|values|``).

    N:M keeps N of every M consecutive entries of a row; unstructured compares entries within each row
    (``scope="row"``) or over the whole matrix (``scope="layer"``). The kept count is always exact.
    """
    scores = values.abs()
    rows, cols = scores.shape
    if spec.nm is not None:
        n, m = spec.nm
        if cols % m:
            raise ValueError(f"input size {cols} is not a multiple of M={m} for the {n}:{m} pattern")
        return topk_mask(scores.reshape(rows, cols // m, m), n, dim=2).reshape(rows, cols)
    if spec.scope == "row":
        return topk_mask(scores, cols - round(spec.sparsity * cols), dim=1)
    kept = scores.numel() - round(spec.sparsity * scores.numel())
    return topk_mask(scores.reshape(-1), kept, 0).view_as(scores)


def keep(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask``, else +0.0 (a product with the mask would leave -0.0 behind)."""
    return torch.where(mask, values, 0.0)


# --------------------------------------------------------------------------------------------------
# scores and errors


def feature_norms(gram: Tensor) -> Tensor:
    """``d = sqrt(diag H)`` in float32: ``||X_j||``, the input norms Wanda scales ``|W|`` by.

    Dead features (``H_jj = 0``) get a tiny positive ``d_j`` instead of zero, so their weights score lowest
    and are pruned first, and nothing divides by zero.
    """
    d = torch.diagonal(gram.float()).clamp_min(0).sqrt()
    floor = max(float(d.max()) * 1e-6, 1e-12) if d.numel() else 1e-12
    return d.clamp_min(floor)


def wanda_mask(weight: Tensor, gram: Tensor, spec: LayerSpec) -> Tensor:
    """Wanda's mask (Sun et al. 2023): keep the largest ``|W_ij| * ||X_j||`` in the spec's groups."""
    return project(weight.float() * feature_norms(gram.to(weight.device)), spec)


class OutputError:
    """Scores pruned copies of one weight on one Gram matrix: ``tr((W-W0) H (W-W0)^T) / tr(W0 H W0^T)``,
    the share of the layer's output energy lost.

    The denominator is computed once, so a solver that scores its start, its result and Wanda's mask pays one
    ``(out x in) @ (in x in)`` product per score, not two.
    """

    def __init__(self, weight0: Tensor, gram: Tensor) -> None:
        self.gram = gram.float()
        self.weight0 = weight0.float().to(self.gram.device)
        self.energy = float((self.weight0 @ self.gram * self.weight0).sum())

    def __call__(self, weight: Tensor) -> float:
        if self.energy <= 0:
            return 0.0
        e = weight.float().to(self.gram.device) - self.weight0
        return float((e @ self.gram * e).sum()) / self.energy


def relative_output_error(weight: Tensor, weight0: Tensor, gram: Tensor) -> float:
    """``tr((W-W0) H (W-W0)^T) / tr(W0 H W0^T)`` of one weight (:class:`OutputError` scores several)."""
    return OutputError(weight0, gram)(weight)


def scored_result(
    weight0: Tensor,
    gram: Tensor,
    spec: LayerSpec,
    weight: Tensor,
    mask: Tensor,
    wanda: Tensor | None = None,
    error: OutputError | None = None,
    **fields: Any,
) -> SolverResult:
    """The result for the pruned ``weight`` of ``weight0``, with its error and Wanda's on ``gram``.

    ``wanda``: Wanda's mask if the solver already has it; ``error``: the solver's :class:`OutputError` of
    ``weight0`` on ``gram`` if it has one; ``fields``: passed on to :class:`SolverResult`.
    """
    if wanda is None:
        wanda = wanda_mask(weight0, gram, spec)
    if error is None:
        error = OutputError(weight0, gram)
    return SolverResult(
        weight=weight,
        mask=mask,
        error=error(weight),
        error_wanda=error(keep(weight0.float(), wanda)),
        **fields,
    )
