"""The two score-only solvers: Wanda (Sun et al. 2023) and magnitude pruning. No weight update.

Wanda keeps the largest ``|W_ij| * ||X_j||`` (``||X_j|| = sqrt(H_jj)``), magnitude the largest ``|W_ij|``,
both within the spec's groups: each row (Wanda's paper) or the whole layer, N of every M for N:M.
"""

from __future__ import annotations

from torch import Tensor

from .common import LayerSpec, SolverResult, check_problem, keep, project, scored_result, wanda_mask

__all__ = ["magnitude", "magnitude_prune", "wanda"]


def wanda(weight: Tensor, gram: Tensor, spec: LayerSpec) -> SolverResult:
    """Keep the largest ``|W_ij| * ||X_j||`` in each group; the kept weights are unchanged."""
    check_problem(weight, gram, spec)
    w0, h = weight.detach(), gram.to(weight.device)
    mask = wanda_mask(w0, h, spec)
    return scored_result(w0, h, spec, keep(w0, mask), mask, wanda=mask)


def magnitude(weight: Tensor, gram: Tensor, spec: LayerSpec) -> SolverResult:
    """Keep the largest ``|W_ij|`` in each group (``gram`` only scores the result)."""
    check_problem(weight, gram, spec)
    w0, h = weight.detach(), gram.to(weight.device)
    mask = project(w0.float(), spec)
    return scored_result(w0, h, spec, keep(w0, mask), mask)


def magnitude_prune(weight: Tensor, spec: LayerSpec) -> Tensor:
    """A magnitude-pruned copy of ``weight`` without a Gram matrix: for tests and formats that just need a
    weight with the spec's pattern."""
    return keep(weight, project(weight.detach().float(), spec))
