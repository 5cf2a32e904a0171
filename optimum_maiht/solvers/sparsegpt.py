"""SparseGPT (Frantar & Alistarh, ICML 2023, Algorithm 1) for one linear layer: a pure tensor function.

* dampen ``H`` by ``dampening`` times its mean diagonal; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and
  their weights are set to zero (they never reach the output);
* take the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): row ``j`` of ``U`` divided by
  ``U_jj`` is the OBS update of the columns right of ``j`` when weight ``j`` is removed, with the columns
  left of ``j`` already fixed;
* sweep the columns left to right in lazy blocks of ``block_size`` (for N:M rounded down to whole groups of
  M, at least one: the N:M result does not depend on the block size): inside a block each column is masked
  and its error ``(w - q) / U_jj`` spread over the block's remaining columns; the block's errors are
  applied to all later columns with one matmul;
* the mask is chosen by the OBS saliency ``w^2 / U_jj^2`` on the weights as updated so far: for N:M when
  the sweep reaches each group of M columns; unstructured once per block, the same count in every row
  (``scope="row"``, exact per row) or over the whole block (``scope="layer"``, the paper's choice, exact
  per layer). Per-block counts are cumulative roundings, so the totals are exact.

Computed in float32 (float64 for a float64 weight) on the weight's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import LayerSpec, SolverResult, check_options, check_problem, keep, scored_result, topk_mask

__all__ = ["NotPositiveDefinite", "sparsegpt"]


class NotPositiveDefinite(ValueError):
    """The dampened Gram matrix has no Cholesky factor."""


DAMPENING = 0.01
BLOCK_SIZE = 128


def sparsegpt(
    weight: Tensor,
    gram: Tensor,
    spec: LayerSpec,
    *,
    dampening: float = DAMPENING,
    block_size: int = BLOCK_SIZE,
) -> SolverResult:
    """Prune ``weight`` (out, in) with SparseGPT on the Gram matrix ``gram`` (in, in).

    ``dampening``: added to the diagonal of ``H``, as a fraction of its mean; ``block_size``: columns per
    lazy block (and per unstructured mask choice). For N:M it is rounded down to a multiple of M (at least
    M): any pattern then runs with the default, and the result is the same, since the N:M mask is chosen
    group by group as the sweep reaches it (the block size only batches the updates).
    """
    check_problem(weight, gram, spec)
    check_options(dampening=dampening, block_size=block_size)
    w, mask = sparsegpt_sweep(weight, gram, spec, dampening, block_size)
    return scored_result(weight.detach(), gram.to(weight.device), spec, w, mask)


def sparsegpt_sweep(
    weight: Tensor, gram: Tensor, spec: LayerSpec, dampening: float = DAMPENING, block_size: int = BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """SparseGPT's pruned weight (in ``weight``'s dtype) and its kept-entry mask, unscored and unchecked:
    for :func:`sparsegpt`, and for mAIHT's start, which scores it with its own :class:`OutputError`."""
    if spec.nm is not None:
        block_size = spec.nm[1] * max(1, block_size // spec.nm[1])
    dtype = torch.promote_types(weight.dtype, torch.float32)
    u, dead = _inverse_cholesky(gram.to(weight.device, dtype), dampening)
    w = weight.detach().to(dtype, copy=True)
    w[:, dead] = 0.0
    pruned = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        _sweep_block(w, u, pruned, start, stop, spec)
    mask = ~pruned
    return keep(w, mask).to(weight.dtype), mask


def _inverse_cholesky(h: Tensor, dampening: float) -> tuple[Tensor, Tensor]:
    """The upper Cholesky factor of the dampened ``H^-1``, and the mask of dead inputs."""
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * float(torch.diagonal(h).mean()))
    lower, info = torch.linalg.cholesky_ex(h)
    if not info:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info:
        raise NotPositiveDefinite(
            f"SparseGPT: the Gram matrix is not positive definite after dampening={dampening}; "
            "raise dampening or use more calibration tokens"
        )
    return u, dead


def _sweep_block(w: Tensor, u: Tensor, pruned: Tensor, start: int, stop: int, spec: LayerSpec) -> None:
    """Prune columns ``start:stop`` of ``w`` in place (recording them in ``pruned``) and apply their OBS
    updates to the block's later columns and, lazily, to all columns right of the block."""
    block = w[:, start:stop].clone()
    u_block = u[start:stop, start:stop]
    diag = torch.diagonal(u_block)
    mask = pruned[:, start:stop]  # a view: the block's choices land in ``pruned``
    if spec.nm is None:
        mask |= _lowest_saliency(block.pow(2) / diag.pow(2), spec, start, stop, w.shape)
    errors = torch.zeros_like(block)
    for j in range(stop - start):
        if spec.nm is not None and j % spec.nm[1] == 0:
            n, m = spec.nm
            saliency = block[:, j : j + m].pow(2) / diag[j : j + m].pow(2)
            mask[:, j : j + m] = topk_mask(saliency, m - n, dim=1, largest=False)
        err = torch.where(mask[:, j], block[:, j], 0.0) / diag[j]
        block[:, j:].sub_(torch.outer(err, u_block[j, j:]))
        errors[:, j] = err
    w[:, start:stop] = keep(block, ~mask)
    w[:, stop:].sub_(errors @ u[start:stop, stop:])


def _lowest_saliency(saliency: Tensor, spec: LayerSpec, start: int, stop: int, shape: torch.Size) -> Tensor:
    """The unstructured mask of one block: the lowest saliencies, per row or over the block.

    Counts are differences of cumulative roundings (``round(s * stop) - round(s * start)`` per row, or of
    ``s * rows * column``), so the row's or the layer's total is exactly ``round(s * size)``.
    """
    s = spec.sparsity
    if spec.scope == "row":
        return topk_mask(saliency, round(s * stop) - round(s * start), dim=1, largest=False)
    rows = shape[0]
    count = round(s * rows * stop) - round(s * rows * start)
    return topk_mask(saliency.reshape(-1), count, dim=0, largest=False).view_as(saliency)
