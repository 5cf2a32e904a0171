"""Block reconstruction: refit the kept weights of a pruned block to the dense block's output
(docs/design.md, "Block reconstruction").

After the layer solves have fixed the masks of a block, the kept weights of all its pruned targets are
refitted jointly with Adam to minimise the mean over tokens of each token's relative squared error
``||block(X)_t - Y_t||^2 / ||Y_t||^2``, where ``X`` are the pruned model's block inputs and ``Y`` the dense
model's block outputs. Per token, because whatever reads the residual stream next (the next block, the
final norm) first divides each token by its RMS: an error matters relative to its own token's norm. (One
error over the whole batch is dominated by the few tokens with massive activations, the first of each
window in most LLMs, and barely moves the others.) Gradients are masked
and the zeros re-imposed after every step, so the sparsity pattern never changes. The number of epochs is
chosen on held-out calibration batches: the weights with the lowest held-out error are kept, the starting
weights included, so the refit never makes the held-out error worse. The errors reported are those held-out
ones, before and after: measured on windows no step has seen, and nearly free (a measurement on every
window would cost two more forwards of the block over the whole calibration set).

Tensors in, tensors out: the caller (:func:`optimum_maiht.sequential.prune_sequential`) gives a forward
function per calibration batch, the parameters and their masks, and the dense targets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .distributed import SINGLE, Parallel

logger = logging.getLogger(__name__)

PATIENCE = 2
"""Epochs without a lower held-out error after which the refit stops."""


@dataclass
class RefitResult:
    """Relative output errors against the dense block on the held-out batches (which choose the epoch),
    before and after the refit."""

    error_before: float
    """With the weights of the layer solves."""
    error_after: float
    """With the weights kept."""
    epochs: int
    """Epochs whose weights were kept (0: the starting weights)."""
    epochs_run: int
    holdout_history: list[float] = field(default_factory=list)
    """Held-out error after each epoch run."""


def holdout_batches(counts: Sequence[int], share: float, rank: int = 0) -> list[int]:
    """Indices (local to ``rank``) of the held-out batches: ``round(share * total)`` batches, at least one
    and at most all but one, spread evenly over all ranks' batches (``counts``: batches per rank, in rank
    order)."""
    total = sum(counts)
    held = min(total - 1, max(1, round(share * total)))
    chosen = {(2 * j + 1) * total // (2 * held) for j in range(held)}
    first = sum(counts[:rank])
    return sorted(k - first for k in chosen if first <= k < first + counts[rank])


def token_errors(out: Tensor, target: Tensor) -> Tensor:
    """Each token's squared error relative to the squared norm of its target (float32, one per token)."""
    target = target.to(out.device, torch.float32)
    return (out.float() - target).square().sum(-1) / target.square().sum(-1).clamp_min(1e-30)


def output_error(
    forward: Callable[[int], Tensor], targets: Sequence[Tensor], batches: Sequence[int], parallel: Parallel
) -> float:
    """The mean of :func:`token_errors` over the tokens of ``batches`` (and of the ranks), no grad."""
    total = count = 0.0
    with torch.no_grad():
        for k in batches:
            errors = token_errors(forward(k), targets[k])
            total += float(errors.sum())
            count += errors.numel()
    total, count = parallel.sum([total, count])
    return total / count if count > 0 else 0.0


def refit_block(
    forward: Callable[[int], Tensor],
    params: Sequence[Tensor],
    masks: Sequence[Tensor],
    targets: Sequence[Tensor],
    train: Sequence[int],
    holdout: Sequence[int],
    lr: float,
    epochs: int,
    seed: int = 0,
    parallel: Parallel = SINGLE,
) -> RefitResult:
    """Refit ``params`` (float32 leaves, updated in place) where ``masks`` is True, so that ``forward(k)``
    (the block on calibration batch ``k``) approaches ``targets[k]``.

    Adam with learning rate ``lr``, one step per training batch (order reshuffled each epoch), at most
    ``epochs`` epochs; the loss of a batch is the mean of its :func:`token_errors`. After each epoch the
    error on the ``holdout`` batches is measured; the weights with the lowest held-out error are kept (the
    starting ones included) and the refit stops after :data:`PATIENCE` epochs without improvement or on a
    non-finite loss. With several ranks (``parallel``) every step averages the gradients of the ranks'
    batches, so every rank takes the same steps and ends with the same weights.
    """
    before = output_error(forward, targets, holdout, parallel)
    best_error, best_epoch = before, 0
    best = [p.detach().clone() for p in params]
    steps = max(parallel.gather(len(train)))
    optimizer = _adam(params, lr)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for epoch in range(1, epochs + 1):
        order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
        finite = True
        for step in range(steps):
            batch = order[step] if step < len(order) else None
            finite = _step(forward, params, masks, targets, batch, parallel)
            if not finite:  # diverged: every rank sees it and stops here
                break
            optimizer.step()
            with torch.no_grad():
                for p, mask in zip(params, masks, strict=True):
                    p.masked_fill_(~mask, 0.0)
        error = output_error(forward, targets, holdout, parallel) if finite else math.inf
        history.append(error)
        if error < best_error:
            best_error, best_epoch = error, epoch
            for saved, p in zip(best, params, strict=True):
                saved.copy_(p.detach())
        if not math.isfinite(error) or epoch - best_epoch >= PATIENCE:
            break
    with torch.no_grad():
        for saved, p in zip(best, params, strict=True):
            p.copy_(saved)
    return RefitResult(before, best_error, best_epoch, len(history), history)


def _adam(params: Sequence[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, fused (one kernel per step: 40% less time than the per-tensor loop for a block of the demo
    model on a CPU, where many small steps make it count) where the parameters' device supports it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def _step(
    forward: Callable[[int], Tensor],
    params: Sequence[Tensor],
    masks: Sequence[Tensor],
    targets: Sequence[Tensor],
    batch: int | None,
    parallel: Parallel,
) -> bool:
    """Set each parameter's ``grad`` to the masked gradient of the relative error of ``batch`` (``None``:
    this rank has no batch at this step), averaged over the ranks that had one; whether the loss was
    finite on every rank."""
    found: list[Tensor | None] = [None] * len(params)
    flags = torch.zeros(2, dtype=torch.float32, device=params[0].device)  # batches here, non-finite losses
    error = None
    try:
        if batch is not None:
            with torch.enable_grad():
                loss = token_errors(forward(batch), targets[batch]).mean()
                # allow_unused: an expert that no token of this batch was routed to gets no gradient
                found = list(torch.autograd.grad(loss, params, allow_unused=True))
            flags[0] = 1.0
            flags[1] = 0.0 if bool(torch.isfinite(loss)) else 1.0
    except Exception as err:  # shared with the other ranks by sum_tensors
        error = err
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]
    parallel.sum_tensors([*grads, flags], error)
    count, nonfinite = flags.tolist()
    for p, grad, mask in zip(params, grads, masks, strict=True):
        p.grad = grad.mul_(mask).div_(max(count, 1.0))
    return nonfinite == 0
