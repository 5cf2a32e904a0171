"""The sequential pipeline: prune a causal LM one decoder block at a time (docs/design.md, "The pipeline").

    capture ──> for each block:  store.load ─> statistics + solve ─> reconstruct ─> propagate ─> store.done

The stages live in their own modules (capture, statistics, solve, reconstruct, store); this module only
moves data between them: the calibration activations from block to block, one :class:`BlockContext` per
block, the progress bar, and the report's per-block records.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..configuration import MAIHTConfig
from ..distributed import SINGLE, Parallel
from ..experts import eager_experts
from ..model_utils import dtype_name, final_norm, find_decoder_blocks
from ..report import BlockReconstruction, KeptDense, LayerReport
from ..solvers import LayerSolver
from ..targets import find_targets, kept_dense_weights
from .capture import (
    BlockCall,
    Placement,
    activations_device,
    capture_block_inputs,
    first_reader,
    move_outside_blocks,
    replay,
)
from .context import BlockContext
from .precision import block_dtype
from .reconstruct import holdout_error, reconstruct_block, refit_skip_reason
from .solve import Solving, solve_block
from .store import IN_MEMORY, BlockStore, FinishedBlock

logger = logging.getLogger(__name__)


@dataclass
class SequentialResult:
    """What :func:`prune_sequential` returns."""

    layers: list[LayerReport]
    kept_dense: list[KeptDense]
    block_seconds: list[float] = field(default_factory=list)
    block_dtypes: list[str | None] = field(default_factory=list)
    """Per block, the dtype of the matrix products of its passes."""
    reconstruction: list[BlockReconstruction] = field(default_factory=list)
    """Per block, when block reconstruction is on."""

    def add(self, record: FinishedBlock) -> None:
        self.layers += record.layers
        self.block_seconds.append(record.seconds)
        self.block_dtypes.append(record.dtype)
        if record.reconstruction is not None:
            self.reconstruction.append(record.reconstruction)


def prune_sequential(
    model: nn.Module,
    input_ids: Tensor,
    config: MAIHTConfig,
    *,
    device: torch.device,
    progress: bool = True,
    parallel: Parallel = SINGLE,
    store: BlockStore = IN_MEMORY,
    offload_activations: bool | None = None,
    solver: LayerSolver | None = None,
) -> SequentialResult:
    """Prune ``model`` in place, block by block; return a report per target (a linear layer or an expert's
    slice of a fused parameter), the other matrices inside the blocks (kept dense, with the reason) and the
    time per block.

    ``parallel``: under ``torchrun``, this rank's share of the windows is calibrated here and the
    statistics and solves are shared with the other ranks. ``store``: where the blocks' weights come from
    and go to (default: the model in memory). ``offload_activations``: keep the calibration activations on
    the CPU between uses (``None``: when they would crowd the GPU). ``solver``: an experiment's own layer
    solver instead of ``config.solver``.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name, blocks, config)
    result = SequentialResult(layers=[], kept_dense=kept_dense_weights(blocks_name, blocks, targets, config))
    store.begin(input_ids, config)
    refit = config.reconstruction_epochs > 0
    parked = activations_device(model, input_ids, device, offload_activations, 3 if refit else 2)
    placement = Placement(device, parked)
    hidden, calls, reader_name = _capture(
        model, blocks, parallel.shard_windows(input_ids, config.batch_size), config, store, placement
    )
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    solving = Solving.from_config(config, parallel, solver)
    dense = list(hidden) if refit else None  # the dense model's inputs to the next block
    shown = progress and parallel.is_main  # one bar under torchrun, rank 0's
    bar = tqdm(range(len(blocks)), desc="mAIHT: pruning blocks", unit="block", disable=not shown)

    def status(step: str) -> None:
        """The bar's postfix: what runs now (a layer's solve, a pass...) and the last block's time."""
        last = f", {result.block_seconds[-1]:.1f} s/block" if result.block_seconds else ""
        bar.set_postfix_str(f"{step}{last}")

    solving.status = status
    with eager_experts(model) if any(t.experts for t in targets) else contextlib.nullcontext():
        for i in bar:
            start = time.perf_counter()
            status(f"block {i}: calibration")
            resumed = store.finished(i)
            precision = None
            if dense is not None and resumed:  # its dense outputs before load() gives its pruned weights
                store.load_dense(i, blocks[i])
                dense_block = BlockContext(i, blocks[i].to(device), targets[i], calls[i], dense, placement)
                precision = dense_block.precision = block_dtype(dense_block, config, parallel)
                dense = dense_block.replay()
            finished = store.load(i, blocks[i])
            ctx = BlockContext(i, blocks[i].to(device), targets[i], calls[i], hidden, placement)
            # the dtype its passes run in, decided before the first (a finished block's as its dense pass's)
            ctx.precision = precision if precision is not None else block_dtype(ctx, config, parallel)
            if dense is not None and not resumed:
                ctx.reader = _reader(model, blocks_name, blocks, i, reader_name, store, device)
                if refit_skip_reason(ctx, config, parallel) is None:
                    ctx.dense_inputs = dense  # one pass: the statistics and the refit's targets
                else:  # solved as with the refit off; the dense outputs still feed the next blocks
                    ctx.dense = replay(ctx.block, dense, ctx.calls, placement, autocast=ctx.autocast)
            layers, rebuilt = _prune_block(ctx, solving) if finished is None else ([], None)
            if ctx.dense is not None:  # the dense block's outputs: the next block's dense inputs
                dense = ctx.dense
            hidden = ctx.replay()
            _warn_non_finite(i, hidden)
            blocks[i].to(home)
            if finished is None:
                seconds = round(time.perf_counter() - start, 3)
                finished = FinishedBlock(layers, seconds, rebuilt, dtype_name(ctx.pass_dtype))
                store.done(i, blocks[i], finished)
            store.release(i, blocks[i])
            result.add(finished)
    return result


def _capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    windows: Tensor,
    config: MAIHTConfig,
    store: BlockStore,
    placement: Placement,
) -> tuple[list[Tensor], list[list[BlockCall]], str | None]:
    """Block 0's inputs and every block's recorded calls, from this rank's ``windows``: block 0 and
    everything outside the blocks are on the compute device meanwhile, and moved back after. With block
    reconstruction, also the name of the norm by which a block reads the residual stream."""
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    store.load(0, blocks[0])
    move_outside_blocks(model, blocks, placement.compute)
    blocks[0].to(placement.compute)
    try:
        hidden, calls = capture_block_inputs(model, blocks, windows, config.batch_size, placement)
        reader = None
        if config.reconstruction_epochs > 0 and hidden:
            reader = first_reader(blocks[0], calls[0][0], placement.fetch(hidden[0]))
        return hidden, calls, reader
    finally:
        move_outside_blocks(model, blocks, home)
        blocks[0].to(home)


def _reader(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    index: int,
    name: str | None,
    store: BlockStore,
    device: torch.device,
) -> nn.Module | None:
    """A float32 copy, on ``device``, of the norm that reads block ``index``'s output next: block
    ``index + 1``'s ``name`` (its dense weights loaded: the store would load them for its turn anyway), or
    the final norm after the last block. ``None`` (the refit then measures the raw output) for a post-norm
    model or a final norm that cannot be told apart."""
    if name is None:
        reader = None
    elif index + 1 < len(blocks):
        store.load_dense(index + 1, blocks[index + 1])
        reader = blocks[index + 1].get_submodule(name)
    else:
        reader = final_norm(model, blocks_name)
    if reader is None:
        logger.info("block %d: the refit measures its raw output (no norm reading it was found)", index)
        return None
    return copy.deepcopy(reader).to(device, torch.float32).requires_grad_(False)


def _prune_block(ctx: BlockContext, solving: Solving) -> tuple[list[LayerReport], BlockReconstruction | None]:
    """Solve the block's targets and, with block reconstruction on, refit it. With ``ctx.dense_inputs`` the
    statistics come from the dense model's inputs, in the pass that also gives the refit its targets
    (docs/design.md, "Statistics from the dense model's inputs"); else from the pruned model's (the refit
    off, or a block it will skip: ``ctx.dense`` is then already there, or ``None`` when it is off). A block
    whose refit does not lower the held-out error is solved again on the pruned model's inputs: it ends
    exactly as with the refit off."""
    if ctx.dense_inputs is None:
        layers = solve_block(ctx.targets, ctx.replay, solving)
        if ctx.dense is None:  # the refit is off
            return layers, None
        solving.status(f"block {ctx.index}: reconstruction")
        return layers, reconstruct_block(ctx, layers, solving.config, solving.parallel)
    dense_weights = _copy_weights(ctx)
    layers = solve_block(ctx.targets, ctx.replay_dense, solving)
    if ctx.dense is None:  # no target was solved: no statistics pass ran
        ctx.replay_dense()
    solving.status(f"block {ctx.index}: reconstruction")
    rebuilt = reconstruct_block(ctx, layers, solving.config, solving.parallel)
    if rebuilt.skipped is not None or rebuilt.epochs > 0 or not _inputs_differ(ctx, solving.parallel):
        return layers, rebuilt  # (same inputs: the solves on the pruned inputs would be these again)
    solving.status(f"block {ctx.index}: solving again on the pruned inputs")
    start = time.perf_counter()
    with torch.no_grad():
        for weight, dense in dense_weights:
            weight.copy_(dense)
    layers = solve_block(ctx.targets, ctx.replay, solving)
    error = holdout_error(ctx, layers, solving.config, solving.parallel)
    logger.info(
        "block %d: solved again on the pruned model's inputs, held-out output error %.4g (%.4g with the "
        "solves on the dense model's inputs)",
        ctx.index,
        error,
        rebuilt.error_solved,
    )
    seconds = round(rebuilt.seconds + time.perf_counter() - start, 3)
    return layers, dataclasses.replace(rebuilt, error_refit=error, seconds=seconds, solved_again=True)


def _copy_weights(ctx: BlockContext) -> list[tuple[Tensor, Tensor]]:
    """Each target weight of the block (a fused experts tensor once) with a copy of its dense values, on the
    CPU (a block's weights: the GPU is left to the refit)."""
    return [(w, w.detach().to("cpu", copy=True)) for w in ctx.targets.parameters()]


def _inputs_differ(ctx: BlockContext, parallel: Parallel) -> bool:
    """Whether the pruned model's inputs to the block differ from the dense model's on some rank (they are
    the same until a pruned block changes them)."""
    assert ctx.dense_inputs is not None
    same = all(torch.equal(h, d) for h, d in zip(ctx.hidden, ctx.dense_inputs, strict=True))
    return parallel.sum([0.0 if same else 1.0])[0] > 0


def _warn_non_finite(index: int, hidden: list[Tensor]) -> None:
    if not all(bool(torch.isfinite(h).all()) for h in hidden):
        logger.warning(
            "block %d produced non-finite activations (fp16 overflow?); those tokens are left out of the "
            "next Gram matrices: load the model in bfloat16 or float32",
            index,
        )
