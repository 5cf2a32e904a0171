"""The reconstruct stage: refit the kept weights of a pruned block to the dense block's output
(docs/design.md, "Block reconstruction").

After the layer solves have fixed the masks of a block, the kept weights of all its pruned targets are
refitted jointly with Adam to minimise the mean over tokens of each token's relative squared error
``||R(block(X))_t - R(Y)_t||^2 / ||R(Y)_t||^2``, where ``X`` are the pruned model's block inputs, ``Y`` the
dense model's block outputs and ``R`` the normalisation layer that reads the block's output next (the next
block's input norm; the final norm after the last block). Through ``R``, because that is how the model
reads the residual stream: each token divided by its RMS, then each channel scaled by the norm's weight.
On the raw stream a few massive channels dominate the error (8 of Gemma3-270M's 640 channels hold 88-98%
of its squared norm, and its norms scale them down); the refit then trades the other channels away, which
the model reads amplified, and the held-out perplexity gets worse while the raw error falls
(docs/design.md, "Block reconstruction"). Per token, because one error over the whole batch is dominated
by the few tokens with massive activations (the first of each window in most LLMs). The gradients of the
pruned weights are set to exactly zero, so Adam's moments and steps there stay zero and the sparsity
pattern never changes (the zeros are re-imposed once more at the end). The rate falls linearly to 0 over
the last ``reconstruction_decay`` of the steps, and the forward and backward passes may run under bfloat16
autocast (``compute_dtype``; the weights and Adam stay float32). The number
of epochs is chosen on held-out calibration batches: the weights with the lowest held-out error are kept,
the starting weights included, so the refit never makes the held-out error worse. The errors reported are
those held-out ones, before and after: measured on windows no step has seen.

:func:`refit_block` is the maths (a forward function, tensors and their masks in); :func:`reconstruct_block`
the stage around it (which weights, the float32 cast, the calibration batches cut into pieces).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..configuration import MAIHTConfig
from ..distributed import Parallel
from ..model_utils import dtype_name
from ..report import BlockReconstruction, LayerReport
from .capture import BlockCall
from .context import BlockContext
from .precision import agreed_dtype, resolve_compute_dtype

logger = logging.getLogger(__name__)

PATIENCE = 2
"""Epochs without a lower held-out error after which the refit stops, once its rate has begun to fall."""
REFIT_BYTES_PER_WEIGHT = 22
"""What the refit holds per pruned weight: its float32 copy, the best weights saved, the gradient and Adam's
two moments (4 bytes each) and two masks (a byte each: which weights are kept, and the 0/1 factor of the
gradients)."""
CUT_TOLERANCE = 1e-4
"""A call cut by rows must give the whole batch's outputs for those rows within this relative difference."""


# --------------------------------------------------------------------------------------------------
# the maths


@dataclass
class RefitResult:
    """Relative output errors against the dense block on the held-out batches (which choose the epoch),
    before and after the refit."""

    error_solved: float
    """With the weights of the layer solves."""
    error_refit: float
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
    forward: Callable[[int], Tensor],
    targets: Sequence[Tensor],
    batches: Sequence[int],
    parallel: Parallel,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
) -> float:
    """The mean of :func:`token_errors` over the tokens of ``batches`` (and of the ranks), no grad; the
    forward under autocast to ``dtype`` on ``device_type`` unless ``dtype`` is float32."""
    total = count = 0.0
    with torch.no_grad():
        for k in batches:
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                out = forward(k)
            errors = token_errors(out, targets[k])
            total += float(errors.sum())
            count += errors.numel()
    total, count = parallel.sum([total, count])
    return total / count if count > 0 else 0.0


def refit_block(
    forward: Callable[[int], Tensor],
    params: Sequence[Tensor],
    masks: Sequence[Tensor],
    targets: Sequence[Tensor],
    split: tuple[Sequence[int], Sequence[int]],
    config: MAIHTConfig,
    seed: int,
    parallel: Parallel,
    dtype: torch.dtype = torch.float32,
) -> RefitResult:
    """Refit ``params`` (float32 leaves, updated in place) where ``masks`` is True, so that ``forward(k)``
    (the block on calibration piece ``k``) approaches ``targets[k]``; ``split`` = (training pieces,
    held-out pieces).

    Adam with a rate per tensor of ``config.reconstruction_lr`` times the RMS of its kept weights
    (:func:`_adam`), falling linearly to 0 over the last ``config.reconstruction_decay`` of all the
    epochs' steps, one step per training piece (order reshuffled each epoch, seeded with ``seed``), at
    most ``config.reconstruction_epochs`` epochs; the loss of a piece is the mean of its
    :func:`token_errors`, its forward and backward passes under autocast to ``dtype`` (float32: none).
    After each epoch the held-out error is measured (its forward under the same autocast, as the
    error before: the guard compares like with like); the weights with the lowest held-out error are kept
    (the starting ones included). The refit stops on a non-finite loss, or after :data:`PATIENCE` epochs
    without improvement once the rate has begun to fall: an epoch at the full rate that does not lower the
    held-out error says little about the decay to come. With several ranks every step averages the
    gradients of the ranks' pieces, so every rank takes the same steps and ends with the same weights.
    """
    train, holdout = split
    device_type = params[0].device.type
    before = output_error(forward, targets, holdout, parallel, dtype, device_type)
    best_error, best_epoch = before, 0
    best = [p.detach().clone() for p in params]
    steps = max(parallel.gather(len(train)))
    # 1 where kept: a product with it zeroes a gradient's pruned entries (torch's masked_fill_ and where
    # with a boolean mask took 6 ms for a 2048 x 640 tensor on a 2-core CPU, a product 0.2 ms: 7% of a
    # Gemma3-270M block's refit). A -0.0 it leaves moves nothing: Adam's step there stays +0.0
    kept = [mask.to(torch.uint8) for mask in masks]
    optimizer = _adam(params, masks, config.reconstruction_lr)
    rates = [group["lr"] for group in optimizer.param_groups]
    total = config.reconstruction_epochs * steps
    tail = config.reconstruction_decay * total
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for epoch in range(1, config.reconstruction_epochs + 1):
        order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
        finite = True
        for step in range(steps):
            left = total - (epoch - 1) * steps - step  # steps left, this one included
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate * min(1.0, left / tail) if tail > 0 else rate
            batch = order[step] if step < len(order) else None
            finite = _step(forward, params, kept, targets, batch, parallel, dtype)
            if not finite:  # diverged: every rank sees it and stops here
                break
            optimizer.step()  # a zero gradient leaves Adam's moments, hence its step, exactly zero
        error = output_error(forward, targets, holdout, parallel, dtype, device_type) if finite else math.inf
        history.append(error)
        if error < best_error:
            best_error, best_epoch = error, epoch
            for saved, p in zip(best, params, strict=True):
                saved.copy_(p.detach())
        falling = tail <= 0 or epoch * steps > total - tail  # this epoch reached the decay (or has none)
        if not math.isfinite(error) or (falling and epoch - best_epoch >= PATIENCE):
            break
    with torch.no_grad():
        for saved, p in zip(best, params, strict=True):
            p.copy_(saved)
    return RefitResult(before, best_error, best_epoch, len(history), history)


def _adam(params: Sequence[Tensor], masks: Sequence[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with one learning rate per tensor: ``lr`` times the RMS of its kept weights. Adam moves every
    weight by about its learning rate whatever the weight's size, so one absolute rate is a different step
    on every model: Gemma3-270M's weights are 5-10x smaller than SmolLM2-135M's (RMS 0.014-0.04 against
    0.05-0.4), and the 1e-3 that suited SmolLM2 overshot there (docs/design.md, "Block reconstruction").
    Fused where the parameters' device supports it (fused kernels instead of a loop of small ones: 40% less
    time for a block of the demo model on a CPU, where many small steps make it count; the per-tensor rates
    left the refit's time as it was)."""
    with torch.no_grad():  # the pruned entries are zeros: the tensor's norm is its kept weights'
        groups = [
            {"params": [p], "lr": lr * float(torch.linalg.vector_norm(p)) / max(int(mask.sum()), 1) ** 0.5}
            for p, mask in zip(params, masks, strict=True)
        ]
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.Adam(groups, lr=lr)


def _step(
    forward: Callable[[int], Tensor],
    params: Sequence[Tensor],
    kept: Sequence[Tensor],
    targets: Sequence[Tensor],
    batch: int | None,
    parallel: Parallel,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Set each parameter's ``grad`` to the gradient of the relative error of ``batch`` (``None``: this
    rank has no batch at this step), averaged over the ranks that had one, and zero where ``kept`` is 0
    (so the pruned weights stay zero through Adam's step: its moments there stay zero); whether the loss was
    finite on every rank. The forward runs under autocast to ``dtype`` unless it is float32; the gradients
    of the float32 leaves are float32 either way."""
    found: list[Tensor | None] = [None] * len(params)
    flags = torch.zeros(2, dtype=torch.float32, device=params[0].device)  # batches here, non-finite losses
    error = None
    try:
        if batch is not None:
            device = params[0].device.type
            with torch.enable_grad():
                with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
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
    for p, grad, keep in zip(params, grads, kept, strict=True):
        p.grad = grad.mul_(keep) if count <= 1 else grad.mul_(keep).div_(count)
    return nonfinite == 0


# --------------------------------------------------------------------------------------------------
# the stage


def reconstruct_block(
    ctx: BlockContext, layers: list[LayerReport], config: MAIHTConfig, parallel: Parallel
) -> BlockReconstruction:
    """Refit the kept weights of the pruned targets of ``ctx.block`` (on its compute device) so that its
    output on the pruned inputs approaches the dense block's ``ctx.dense``. The block runs in float32 (a
    half-precision block is cast and cast back); the zero pattern of every pruned weight is kept exactly.
    ``layers``: the block's layer reports (the targets actually pruned)."""
    start = time.perf_counter()
    params = _pruned_params(ctx, layers)
    counts = parallel.gather(len(ctx.hidden))
    skipped = _skip_reason(params, sum(counts), config)
    if skipped is not None and params:
        logger.warning("block %d: block reconstruction skipped: %s", ctx.index, skipped)
    if skipped is not None:
        return BlockReconstruction(ctx.index, 0.0, 0.0, 0, 0, 0.0, skipped=skipped)
    dtype = ctx.precision
    with _refit_problem(ctx, params, counts, config, parallel) as problem:
        if dtype is None:  # not decided by the pipeline: probed on a piece of the float32 block
            wanted = resolve_compute_dtype(params[0].device, config.compute_dtype)
            pieces = len(problem.targets)
            dtype = agreed_dtype(problem.forward, pieces, wanted, params[0].device, parallel, ctx.index)
        fit = refit_block(
            problem.forward,
            problem.leaves,
            problem.masks,
            problem.targets,
            problem.split,
            config,
            config.seed + ctx.index,
            parallel,
            dtype,
        )
    seconds = round(time.perf_counter() - start, 3)
    if fit.epochs == 0:
        logger.info(
            "block %d: the refit never lowered the held-out output error (%.4g)", ctx.index, fit.error_solved
        )
    else:
        logger.info(
            "block %d: block reconstruction, held-out output error %.4g -> %.4g (epoch %d of %d, %.1fs)",
            ctx.index,
            fit.error_solved,
            fit.error_refit,
            fit.epochs,
            fit.epochs_run,
            seconds,
        )
    return BlockReconstruction(
        ctx.index,
        fit.error_solved,
        fit.error_refit,
        fit.epochs,
        fit.epochs_run,
        seconds,
        precision=dtype_name(dtype),
    )


def holdout_error(
    ctx: BlockContext, layers: list[LayerReport], config: MAIHTConfig, parallel: Parallel
) -> float:
    """The held-out output error of ``ctx.block`` as it is now, measured as :func:`reconstruct_block` measures
    it (the same held-out batches, reader and dtype, :attr:`BlockContext.precision`): for weights that no
    refit produced, such as those of a block solved again after its refit did not help."""
    params = _pruned_params(ctx, layers)
    if not params:
        return 0.0
    counts = parallel.gather(len(ctx.hidden))
    with _refit_problem(ctx, params, counts, config, parallel) as problem:
        dtype = ctx.precision or torch.float32
        device_type = params[0].device.type
        return output_error(problem.forward, problem.targets, problem.split[1], parallel, dtype, device_type)


def _pruned_params(ctx: BlockContext, layers: list[LayerReport]) -> list[Tensor]:
    """The weights of the targets of ``ctx`` that ``layers`` report as pruned (a fused experts tensor once per
    expert pruned in it)."""
    pruned = {layer.name.partition("[")[0] for layer in layers if layer.skipped is None}
    params = [m.weight for n, m in ctx.targets.linears.items() if n in pruned]
    return params + [w.param for w in ctx.targets.experts if w.name in pruned]


@dataclass
class _Problem:
    """The refit of one block as :func:`refit_block` takes it."""

    forward: Callable[[int], Tensor]
    leaves: list[nn.Parameter]
    masks: list[Tensor]
    targets: Sequence[Tensor]
    split: tuple[list[int], list[int]]
    """(training pieces, held-out pieces)."""


@contextlib.contextmanager
def _refit_problem(
    ctx: BlockContext, params: list[Tensor], counts: list[int], config: MAIHTConfig, parallel: Parallel
) -> Iterator[_Problem]:
    """The block in float32 (:func:`_float32`) with its calibration batches cut into pieces, the held-out
    ones set apart (``counts``: batches per rank), and the forward through the reader; the block gets its
    dtypes back on exit."""
    held_batches = set(holdout_batches(counts, config.reconstruction_holdout, parallel.rank))
    device = params[0].device
    with _float32(ctx.block, params) as leaves:  # type: ignore[arg-type]
        calls = [call.float32() for call in ctx.calls]
        pieces = _refit_pieces(ctx, calls, config.reconstruction_batch_size, device)
        holdout = [j for j, piece in enumerate(pieces) if piece.batch in held_batches]
        train = [j for j, piece in enumerate(pieces) if piece.batch not in held_batches]
        read = ctx.reader if ctx.reader is not None else nn.Identity()

        def forward(j: int) -> Tensor:
            piece = pieces[j]
            hidden = ctx.hidden[piece.batch][piece.rows].to(device, torch.float32)
            return read(piece.call.run(ctx.block, hidden))

        targets = _ReadTargets(read, [ctx.dense[piece.batch][piece.rows] for piece in pieces], device)
        yield _Problem(forward, leaves, [p != 0 for p in leaves], targets, (train, holdout))


def refit_skip_reason(ctx: BlockContext, config: MAIHTConfig, parallel: Parallel) -> str | None:
    """Why the refit of ``ctx``'s block will not run, as far as is known before its layer solves (its
    targets, the calibration batches); ``None``: it will. A block that will not be refitted is solved on the
    pruned model's inputs, exactly as with the refit off."""
    return _skip_reason(ctx.targets.parameters(), sum(parallel.gather(len(ctx.hidden))), config)


def _skip_reason(params: Sequence[Tensor], batches: int, config: MAIHTConfig) -> str | None:
    """Why a block's refit cannot run (``None``: it can): nothing pruned, fewer than two calibration
    batches in all (none could be held out), or more memory than ``reconstruction_max_gib``."""
    if not params:
        return "no pruned layer"
    if batches < 2:
        return (
            f"{batches} calibration batch: none can be held out to choose the epochs; raise num_samples or "
            "lower batch_size"
        )
    limit = config.reconstruction_max_gib
    if limit is not None and (gib := refit_gib(params)) > limit:
        return (
            f"the refit would hold {gib:.1f} GiB, more than reconstruction_max_gib={limit:g}; raise it to "
            "refit this block"
        )
    return None


def refit_gib(params: Sequence[Tensor]) -> float:
    """GiB the refit of ``params`` holds (:data:`REFIT_BYTES_PER_WEIGHT` per weight; a tensor listed twice,
    such as a fused experts tensor, counts once)."""
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() for p in unique) * REFIT_BYTES_PER_WEIGHT / 2**30


class _ReadTargets(Sequence[Tensor]):
    """The dense outputs as the reader sees them, computed when asked (no second copy of the targets)."""

    def __init__(self, read: nn.Module, dense: list[Tensor], device: torch.device) -> None:
        self.read, self.dense, self.device = read, dense, device

    def __len__(self) -> int:
        return len(self.dense)

    def __getitem__(self, k: int) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return self.read(self.dense[k].to(self.device, torch.float32))


@dataclass
class Piece:
    """The windows ``rows`` of calibration batch ``batch``: one step of the refit, with its call."""

    batch: int
    rows: slice
    call: BlockCall


def _refit_pieces(ctx: BlockContext, calls: list[BlockCall], size: int, device: torch.device) -> list[Piece]:
    """The calibration batches cut into pieces of ``size`` windows, one Adam step each: the same tokens per
    epoch in more, smaller steps. The first cut call is checked against the whole batch's forward; a model
    whose call cannot be cut by rows (a per-window tensor the rule of :meth:`BlockCall.rows` misses) falls
    back to whole batches, with a warning."""
    hidden = ctx.hidden
    whole = [Piece(k, slice(None), call) for k, call in enumerate(calls)]
    if all(len(h) <= size for h in hidden):
        return whole
    pieces = [
        Piece(k, slice(start, start + size), call.rows(slice(start, start + size), len(h)))
        for k, (h, call) in enumerate(zip(hidden, calls, strict=True))
        for start in range(0, len(h), size)
    ]
    first = next(p for p in pieces if p.rows.stop < len(hidden[p.batch]))
    h = hidden[first.batch].to(device, torch.float32)
    try:
        with torch.no_grad():
            full = calls[first.batch].run(ctx.block, h)[first.rows]
            cut = first.call.run(ctx.block, h[first.rows])
        gap = float((cut - full).norm() / full.norm().clamp_min(1e-30))
    except (RuntimeError, ValueError, IndexError) as err:
        gap, reason = math.inf, f"{type(err).__name__}: {err}"
    else:
        reason = f"relative difference {gap:.3g}"
    if gap > CUT_TOLERANCE:
        logger.warning(
            "block %d: its calibration batches cannot be cut into pieces of %d windows for the refit (%s); "
            "refitting on whole batches (batch_size)",
            ctx.index,
            size,
            reason,
        )
        return whole
    return pieces


@contextlib.contextmanager
def _float32(block: nn.Module, params: list[nn.Parameter]) -> Iterator[list[nn.Parameter]]:
    """The block in float32 with ``params`` requiring grad, for the refit; afterwards every tensor gets
    its dtype back and the zeros of ``params`` are re-imposed, so the cast cannot move the mask."""
    tensors = list(block.parameters()) + list(block.buffers())
    dtypes = [t.dtype for t in tensors]
    wanted = [p.requires_grad for p in params]
    masks = [p != 0 for p in params]
    try:
        for t in tensors:
            if t.is_floating_point():
                t.data = t.data.float()
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        with torch.no_grad():
            for t, dtype in zip(tensors, dtypes, strict=True):
                t.data = t.data.to(dtype)
            for p, mask, flag in zip(params, masks, wanted, strict=True):
                p.grad = None
                p.masked_fill_(~mask, 0.0)
                p.requires_grad_(flag)
