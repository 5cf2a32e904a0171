"""The sequential pipeline: prune a causal LM one decoder block at a time (docs/design.md, "The pipeline").

Nothing here is model specific. The decoder blocks are the largest homogeneous ``nn.ModuleList``; the
targets inside them (linear layers, fused expert weights) are chosen in :mod:`optimum_maiht.targets`;
whatever keyword arguments each block receives (masks, rotary embeddings, per-layer sliding windows...)
are recorded from a real forward of the model and replayed, never rebuilt by hand. Fused experts get their
Gram matrices from :mod:`optimum_maiht.experts`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .configuration import MAIHTConfig
from .distributed import SINGLE, Parallel, SolveJob
from .experts import ExpertGramRecorder, FusedExpertWeight, eager_experts, expert_groups, weight_view
from .model_utils import find_decoder_blocks, weight_matrix
from .reconstruction import holdout_batches, refit_block
from .report import BlockReconstruction, KeptDense, LayerReport, layer_type
from .solvers import LayerSpec, maiht
from .targets import BlockTargets, find_targets, kept_dense_weights

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# capturing what each block receives


class _StopForward(Exception):
    pass


@dataclass
class _BlockCall:
    """One recorded call of a block: the other positional args and the keyword args."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_by_keyword: bool

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.hidden_by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: Tensor,
    batch_size: int,
    device: torch.device,
    activations: torch.device | None = None,
) -> tuple[list[Tensor], list[list[_BlockCall]]]:
    """Block 0's input hidden states per batch (kept on ``activations``, default ``device``), and every
    block's recorded call per batch.

    The blocks are replaced by recorders that pass the hidden states through unchanged, so one cheap
    forward per batch (embeddings and whatever the backbone computes between blocks) records exactly what
    each block receives; the last recorder stops the forward before the LM head. Block 0 runs once for
    real (it must be loaded, on ``device``) to learn what the model expects a block to return.
    """
    hidden: list[Tensor] = []
    calls: list[list[_BlockCall]] = [[] for _ in blocks]
    tuple_tail: list[int | None] = []  # learnt once from a real call: what the model expects back

    def recorder(i: int, real_forward):
        def forward(*args, **kwargs):
            by_keyword = not args
            h = kwargs.pop("hidden_states") if by_keyword else args[0]
            rest = args if by_keyword else args[1:]
            calls[i].append(_BlockCall(rest, kwargs, by_keyword))
            if i == 0:
                hidden.append(h if activations is None else h.to(activations))
                if not tuple_tail:
                    real = (
                        real_forward(*rest, hidden_states=h, **kwargs)
                        if by_keyword
                        else real_forward(h, *rest, **kwargs)
                    )
                    tuple_tail.append(len(real) - 1 if isinstance(real, tuple) else None)
            if i == len(blocks) - 1:
                raise _StopForward
            return h if tuple_tail[0] is None else (h,) + (None,) * tuple_tail[0]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i, block.forward)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    if len(hidden) != len(calls[-1]):
        raise RuntimeError("the model did not call every decoder block once per batch; it is not supported")
    return hidden, calls


# --------------------------------------------------------------------------------------------------
# Gram matrices


class GramCollector:
    """Accumulates ``H = X^T X`` (float32) for each target layer of a block through forward pre-hooks.

    Layers that receive the very same input tensor (q/k/v, gate/up) share one ``H``, computed once.
    Tokens whose activations are not finite (fp16 overflow) are left out, with a warning.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.gram: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        """Finite calibration rows in each layer's Gram matrix."""
        self.dropped_tokens: dict[str, int] = {}
        self._live: dict[int, tuple[Tensor, str]] = {}
        self._rows: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            shared = self._live.get(id(x))
            if shared is not None and shared[0] is x:
                self.gram.setdefault(name, self.gram[shared[1]])
                self.tokens[name] = self.tokens.get(name, 0) + self._rows[shared[1]]
                return
            self._live[id(x)] = (x, name)  # holding x keeps its id unique during this forward
            x = x.detach().reshape(-1, x.shape[-1]).float()
            finite = torch.isfinite(x).all(dim=1)
            if not bool(finite.all()):
                self.dropped_tokens[name] = self.dropped_tokens.get(name, 0) + int((~finite).sum())
                x = x[finite]
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.gram[name].addmm_(x.t(), x)
            self._rows[name] = x.shape[0]
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def end_batch(self) -> None:
        self._live.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._live.clear()


# --------------------------------------------------------------------------------------------------
# the loop


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, norms...)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside and buf.device != device:
                module._buffers[key] = buf.to(device)


@dataclass
class SequentialResult:
    """What :func:`prune_sequential` returns."""

    layers: list[LayerReport]
    kept_dense: list[KeptDense]
    block_seconds: list[float] = field(default_factory=list)
    reconstruction: list[BlockReconstruction] = field(default_factory=list)
    """Per block, when block reconstruction is on."""


@dataclass
class FinishedBlock:
    """A block pruned by an earlier, interrupted run: its reports and wall time (docs/design.md,
    "Streaming and resume")."""

    layers: list[LayerReport]
    seconds: float
    reconstruction: BlockReconstruction | None = None


class BlockStore:
    """Where the decoder blocks' weights live, around the per-block loop of :func:`prune_sequential`.

    This base class is the in-memory path: the whole model is loaded and every hook does nothing.
    :class:`optimum_maiht.streaming.StreamingStore` reads each block from the checkpoint before its turn,
    writes it out when pruned and releases it, and resumes an interrupted run.
    """

    def begin(self, input_ids: Tensor, config: MAIHTConfig) -> None:
        """Called once with the calibration windows and the configuration, before any block is loaded."""

    def finished(self, index: int) -> FinishedBlock | None:
        """The record of block ``index`` when an earlier run already pruned it (then :meth:`load` gives its
        pruned weights and the block is only run to propagate the activations); ``None``: prune it."""
        return None

    def load(self, index: int, block: nn.Module) -> None:
        """Give block ``index`` real weights on the CPU (no-op when it has them)."""

    def load_dense(self, index: int, block: nn.Module) -> None:
        """Give block ``index`` its dense weights even when an earlier run pruned it (block reconstruction
        carries the dense activations through finished blocks too); :meth:`load` then gives the pruned
        ones. In memory no block is finished, so there is nothing to do."""

    def done(self, index: int, block: nn.Module, record: FinishedBlock) -> None:
        """Block ``index`` is pruned (its weights back on the CPU)."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is no longer needed."""


IN_MEMORY = BlockStore()

OFFLOAD_SHARE = 0.5
"""``offload_activations=None`` keeps the activations on the GPU while they take at most this share of
its free memory (the block, its Gram matrices and the solver need the rest)."""


def activations_device(
    model: nn.Module, input_ids: Tensor, device: torch.device, offload: bool | None, sets: int = 2
) -> torch.device | None:
    """Where the calibration activations live between blocks: ``None`` (on ``device``) or the CPU.

    ``offload=None`` decides by size: the CPU when the activations (``sets`` of them: the input and output
    of a block, plus the dense model's activations with block reconstruction: ``sets * windows * length *
    hidden`` elements) would take more than :data:`OFFLOAD_SHARE` of the free memory of the CUDA
    ``device``. On a CPU device there is nothing to offload.
    """
    if device.type != "cuda" or offload is False:
        return None
    if offload is None:
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if not isinstance(hidden, int):
            return None
        needed = sets * input_ids.numel() * hidden * dtype.itemsize
        free, _ = torch.cuda.mem_get_info(device)
        if needed <= OFFLOAD_SHARE * free:
            return None
        logger.info(
            "calibration activations (%.2f GiB) kept on the CPU: more than %d%% of the GPU's free %.2f GiB",
            needed / 2**30,
            100 * OFFLOAD_SHARE,
            free / 2**30,
        )
    return torch.device("cpu")


def prune_sequential(
    model: nn.Module,
    input_ids: Tensor,
    config: MAIHTConfig,
    device: torch.device,
    progress: bool = True,
    parallel: Parallel = SINGLE,
    store: BlockStore = IN_MEMORY,
    offload_activations: bool | None = None,
) -> SequentialResult:
    """Prune ``model`` in place, block by block; return a report per target (a linear layer or an expert's
    slice of a fused parameter), the other matrices inside the blocks (kept dense, with the reason) and the
    time per block. ``parallel`` (:mod:`optimum_maiht.distributed`): under ``torchrun``, this rank's share
    of the windows is calibrated here and the statistics and solves are shared with the other ranks.
    ``store``: where the blocks' weights come from and go to (default: the model in memory; streaming
    from a checkpoint and resuming, :mod:`optimum_maiht.streaming`). ``offload_activations``: keep the
    calibration activations on the CPU between uses (``None``: when they would crowd the GPU)."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, blocks_name, blocks, config)
    kept = kept_dense_weights(blocks_name, blocks, targets, config)
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    store.begin(input_ids, config)
    sets = 3 if config.reconstruction_epochs > 0 else 2
    parked = activations_device(model, input_ids, device, offload_activations, sets)

    store.load(0, blocks[0])
    _move_outside_blocks(model, blocks, device)
    blocks[0].to(device)
    try:
        shard = parallel.shard_windows(input_ids, config.batch_size)
        hidden, calls = capture_block_inputs(model, blocks, shard, config.batch_size, device, parked)
    finally:
        _move_outside_blocks(model, blocks, home)
        blocks[0].to(home)

    result = SequentialResult(layers=[], kept_dense=kept)
    dense = list(hidden) if config.reconstruction_epochs > 0 else None  # the dense model's block inputs
    bar = tqdm(range(len(blocks)), desc="mAIHT: pruning blocks", unit="block", disable=not progress)

    def status(step: str) -> None:
        """The bar's postfix: what runs now (a layer's solve, a pass...) and the last block's time."""
        last = f", {result.block_seconds[-1]:.1f} s/block" if result.block_seconds else ""
        bar.set_postfix_str(f"{step}{last}")

    with eager_experts(model) if any(t.experts for t in targets) else contextlib.nullcontext():
        for i in bar:
            start = time.perf_counter()
            status(f"block {i}: calibration")
            finished = store.finished(i)
            if dense is not None:  # the dense block's outputs: the next dense inputs and the refit's targets
                (store.load if finished is None else store.load_dense)(i, blocks[i])
                dense = run_calibration(blocks[i].to(device), dense, calls[i], device=device)
            store.load(i, blocks[i])
            block = blocks[i].to(device)
            run_block = functools.partial(run_calibration, block, hidden, calls[i], device=device)
            layers = _prune_block(targets[i], run_block, config, parallel, status) if finished is None else []
            rebuilt = None
            if dense is not None and finished is None:
                status(f"block {i}: reconstruction")
                rebuilt = reconstruct_block(
                    i, block, targets[i], layers, hidden, calls[i], dense, config, parallel
                )
            hidden = run_calibration(block, hidden, calls[i], device=device)
            if not all(bool(torch.isfinite(h).all()) for h in hidden):
                logger.warning(
                    "block %d produced non-finite activations (fp16 overflow?); those tokens are left "
                    "out of the next Gram matrices: load the model in bfloat16 or float32",
                    i,
                )
            blocks[i].to(home)
            if finished is None:
                finished = FinishedBlock(layers, round(time.perf_counter() - start, 3), rebuilt)
                store.done(i, blocks[i], finished)
            store.release(i, blocks[i])
            result.layers += finished.layers
            result.block_seconds.append(finished.seconds)
            if finished.reconstruction is not None:
                result.reconstruction.append(finished.reconstruction)
    return result


def run_calibration(
    block: nn.Module,
    hidden: list[Tensor],
    calls: list[_BlockCall],
    after_batch: Callable[[], None] | None = None,
    device: torch.device | None = None,
) -> list[Tensor]:
    """Run every calibration batch through ``block`` (no grad) and return its outputs; ``after_batch`` is
    called after each batch (the Gram collector's bookkeeping). With ``device``, each batch is moved there
    for the block and its output back to where the batch was (activations offloaded to the CPU)."""
    outputs = []
    with torch.no_grad():
        for h, call in zip(hidden, calls, strict=True):
            out = call.run(block, h if device is None else h.to(device))
            outputs.append(out.to(h.device))
            if after_batch is not None:
                after_batch()
    return outputs


# --------------------------------------------------------------------------------------------------
# block reconstruction


def reconstruct_block(
    index: int,
    block: nn.Module,
    targets: BlockTargets,
    layers: list[LayerReport],
    hidden: list[Tensor],
    calls: list[_BlockCall],
    dense: list[Tensor],
    config: MAIHTConfig,
    parallel: Parallel = SINGLE,
) -> BlockReconstruction:
    """Refit the kept weights of the pruned targets of ``block`` (on its compute device) so that its output
    on the pruned inputs ``hidden`` approaches the dense block's ``dense`` (docs/design.md, "Block
    reconstruction"). The block runs in float32 (a half-precision block is cast and cast back); the zero
    pattern of every pruned weight is kept exactly."""
    start = time.perf_counter()
    pruned = {layer.name.partition("[")[0] for layer in layers if layer.skipped is None}
    params = [m.weight for n, m in targets.linears.items() if n in pruned]
    params += [w.param for w in targets.experts if w.name in pruned]
    counts = parallel.gather(len(hidden))
    held_batches = set(holdout_batches(counts, config.reconstruction_holdout, parallel.rank))
    skipped = None
    if not params:
        skipped = "no pruned layer"
    elif sum(counts) < 2:
        skipped = (
            f"{sum(counts)} calibration batch: none can be held out to choose the epochs; raise num_samples "
            "or lower batch_size"
        )
        logger.warning("block %d: block reconstruction skipped: %s", index, skipped)
    if skipped is not None:
        return BlockReconstruction(index, 0.0, 0.0, 0, 0, 0.0, skipped=skipped)
    device = params[0].device
    with _float32(block, params) as leaves:
        masks = [p != 0 for p in leaves]
        calls32 = [_float32_call(call) for call in calls]
        pieces = _refit_pieces(index, block, hidden, calls32, config.reconstruction_batch_size, device)
        holdout = [j for j, piece in enumerate(pieces) if piece.batch in held_batches]
        train = [j for j, piece in enumerate(pieces) if piece.batch not in held_batches]

        def forward(j: int) -> Tensor:
            piece = pieces[j]
            return piece.call.run(block, hidden[piece.batch][piece.rows].to(device, torch.float32))

        fit = refit_block(
            forward,
            leaves,
            masks,
            [dense[piece.batch][piece.rows] for piece in pieces],
            train,
            holdout,
            config.reconstruction_lr,
            config.reconstruction_epochs,
            config.seed + index,
            parallel,
        )
    seconds = round(time.perf_counter() - start, 3)
    if fit.epochs == 0:
        logger.info(
            "block %d: the refit never lowered the held-out output error (%.4g); the weights of the layer "
            "solves are kept",
            index,
            fit.error_before,
        )
    else:
        logger.info(
            "block %d: block reconstruction, held-out output error %.4g -> %.4g (epoch %d of %d, %.1fs)",
            index,
            fit.error_before,
            fit.error_after,
            fit.epochs,
            fit.epochs_run,
            seconds,
        )
    return BlockReconstruction(index, fit.error_before, fit.error_after, fit.epochs, fit.epochs_run, seconds)


@dataclass
class _Piece:
    """The windows ``rows`` of calibration batch ``batch``: one step of the refit, with its call."""

    batch: int
    rows: slice
    call: _BlockCall


def _refit_pieces(
    index: int,
    block: nn.Module,
    hidden: list[Tensor],
    calls: list[_BlockCall],
    size: int,
    device: torch.device,
) -> list[_Piece]:
    """The calibration batches cut into pieces of ``size`` windows, one Adam step each: the same tokens per
    epoch in more, smaller steps. The first cut call is checked against the whole batch's forward; a model
    whose call cannot be cut by rows (a per-window tensor the rule of :func:`_rows_call` misses) falls back
    to whole batches, with a warning."""
    whole = [_Piece(k, slice(None), call) for k, call in enumerate(calls)]
    if all(len(h) <= size for h in hidden):
        return whole
    pieces = [
        _Piece(k, slice(start, start + size), _rows_call(call, slice(start, start + size), len(h)))
        for k, (h, call) in enumerate(zip(hidden, calls, strict=True))
        for start in range(0, len(h), size)
    ]
    first = next(p for p in pieces if p.rows.stop < len(hidden[p.batch]))
    h = hidden[first.batch].to(device, torch.float32)
    try:
        with torch.no_grad():
            full = calls[first.batch].run(block, h)[first.rows]
            cut = first.call.run(block, h[first.rows])
        gap = float((cut - full).norm() / full.norm().clamp_min(1e-30))
    except (RuntimeError, ValueError, IndexError) as err:
        gap, reason = math.inf, f"{type(err).__name__}: {err}"
    else:
        reason = f"relative difference {gap:.3g}"
    if gap > 1e-4:
        logger.warning(
            "block %d: its calibration batches cannot be cut into pieces of %d windows for the refit (%s); "
            "refitting on whole batches (batch_size)",
            index,
            size,
            reason,
        )
        return whole
    return pieces


@contextlib.contextmanager
def _float32(block: nn.Module, params: list[nn.Parameter]):
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


def _map_call(call: _BlockCall, fn: Callable[[Tensor], Tensor]) -> _BlockCall:
    """``call`` with ``fn`` applied to every tensor of its args and kwargs (inside tuples, lists, dicts)."""

    def apply(value: Any) -> Any:
        if isinstance(value, Tensor):
            return fn(value)
        if isinstance(value, (tuple, list)):
            return type(value)(apply(v) for v in value)
        if isinstance(value, dict):
            return {k: apply(v) for k, v in value.items()}
        return value

    return _BlockCall(apply(call.args), apply(call.kwargs), call.hidden_by_keyword)


def _float32_call(call: _BlockCall) -> _BlockCall:
    """``call`` with its floating-point tensors (rotary tables, additive masks) in float32."""
    return _map_call(call, lambda t: t.float() if t.is_floating_point() else t)


def _rows_call(call: _BlockCall, rows: slice, batch: int) -> _BlockCall:
    """``call`` cut to the windows ``rows`` of its batch of ``batch``: every tensor of two or more
    dimensions whose first is ``batch`` (attention masks, position ids, per-window rotary tables) is sliced;
    the rest (shared rotary tables of batch 1, cache positions) is kept. :func:`_refit_pieces`' check
    catches a model whose call this rule gets wrong."""
    return _map_call(call, lambda t: t[rows] if t.dim() >= 2 and t.shape[0] == batch else t)


def _no_status(step: str) -> None:
    pass


def _prune_block(
    targets: BlockTargets,
    run_block: Callable[..., Any],
    config: MAIHTConfig,
    parallel: Parallel = SINGLE,
    status: Callable[[str], None] = _no_status,
) -> list[LayerReport]:
    """Collect the Gram matrices of one block's targets from the dense block and prune them.

    The linear layers' Grams come from the first calibration pass; fused experts are handled in groups of
    ``experts_per_pass`` (one pass each, so that only that many experts' Grams are held at once) and
    solved right after their pass: an expert's inputs depend only on the layers before the router and on
    its own first projection, so pruning one group does not change the next group's statistics. The
    linear layers are solved last, so every pass sees the same dense block. With several ranks, the
    statistics are summed over the ranks before anything is decided or solved (``parallel``). ``status``
    is told the name of each layer before its solve (the progress bar).
    """
    if not targets:
        return []
    collector = GramCollector(targets.linears) if targets.linears else None
    reports: list[LayerReport] = []
    try:
        groups = expert_groups(targets.experts, config.experts_per_pass) if targets.experts else [[]]
        for number, group in enumerate(groups):
            first = number == 0
            if not group:
                run_block(after_batch=collector.end_batch if collector else None)
            else:
                reports += _prune_expert_group(
                    targets.experts, group, run_block, config, collector if first else None, parallel, status
                )
            if first and collector is not None:
                collector.remove()
    finally:
        if collector is not None:
            collector.remove()
    if collector is not None:
        parallel.reduce_statistics(collector.gram, collector.tokens, collector.dropped_tokens)
        jobs = [_linear_job(n, m, collector) for n, m in targets.linears.items()]
        reports = _solve_all(jobs, config, parallel, status) + reports
    return reports


_Job = tuple[SolveJob, dict[str, Any]]
"""A layer problem and the report fields it adds (``tokens``, ``statistics``, ``transposed``)."""


def _solve_all(
    jobs: list[_Job], config: MAIHTConfig, parallel: Parallel, status: Callable[[str], None] = _no_status
) -> list[LayerReport]:
    """Solve the jobs (spread over the ranks by ``parallel``) and complete their reports."""
    split_rows = config.formulation == "constraint" and (config.nm is not None or config.scope == "row")

    def solve(name: str, weight: Tensor, gram: Tensor) -> LayerReport:
        status(name)
        return _solve(name, weight, gram, config=config)

    reports = parallel.solve([job for job, _ in jobs], solve, split_rows=split_rows)
    for report, (_, extra) in zip(reports, jobs, strict=True):
        for key, value in extra.items():
            setattr(report, key, value)
    return reports


def _prune_expert_group(
    experts: list[FusedExpertWeight],
    group: list[int],
    run_block: Callable[..., Any],
    config: MAIHTConfig,
    collector: GramCollector | None,
    parallel: Parallel = SINGLE,
    status: Callable[[str], None] = _no_status,
) -> list[LayerReport]:
    """One calibration pass accumulating the Grams of the experts in ``group`` (and of the linear layers,
    with ``collector``), then the starved experts' all-token statistics, then the solves. The routed
    counts are summed over the ranks first, so that the starved experts are the same on every rank."""
    keep_calls = config.min_expert_tokens > 0
    with ExpertGramRecorder(experts, experts=group, keep_calls=keep_calls) as recorder:
        run_block(after_batch=collector.end_batch if collector else None)
        parallel.reduce_statistics(recorder.gram, recorder.tokens, recorder.dropped)
        parallel.union(recorder.layout)
        missing = [w.name for w in experts if w.name not in recorder.layout]
        if missing:
            raise RuntimeError(
                f"the fused expert weights {missing[:3]} were never applied per expert during calibration "
                "(their module fuses the experts in one kernel); add them to ignore to keep them dense"
            )
        starved = [
            e
            for e in group
            if min(recorder.tokens.get((w.name, e), 0) for w in experts) < config.min_expert_tokens
        ]
        forced = _all_token_statistics(recorder, starved, parallel)
        jobs = [_expert_job(w, e, recorder, e in forced) for w in experts for e in group if e < w.num_experts]
        return _solve_all(jobs, config, parallel, status)


def _all_token_statistics(
    recorder: ExpertGramRecorder, starved: list[int], parallel: Parallel = SINGLE
) -> set[int]:
    """Send every calibration token through the starved experts (statistics only); the experts for which
    that worked. Where the routing cannot be forced, the routed tokens are used, with a warning. Each rank
    replays its own recorded calls; the ranks agree on the outcome and sum the statistics."""
    if not starved:
        return set()
    logger.warning(
        "experts %s received fewer calibration tokens than min_expert_tokens: their Gram matrices are "
        "built from every calibration token instead (see the report's 'statistics')",
        starved,
    )
    failure = None
    try:
        recorder.replay_all_tokens(starved)
    except ValueError as err:
        failure = str(err)
    failure = next((f for f in parallel.gather(failure) if f is not None), None)
    if failure is not None:
        logger.warning(
            "%s; pruning experts %s on their routed tokens (magnitude where none)", failure, starved
        )
        return set()
    parallel.reduce_statistics(recorder.gram_all, recorder.tokens_all)
    return set(starved)


def _expert_job(fused: FusedExpertWeight, e: int, recorder: ExpertGramRecorder, all_tokens: bool) -> _Job:
    key = (fused.name, e)
    layout = recorder.layout[fused.name]
    weight = weight_view(fused, e, layout)
    if all_tokens:
        gram, tokens, statistics = recorder.gram_all[key], recorder.tokens_all[key], "all tokens"
    elif recorder.tokens.get(key, 0) > 0:
        gram, tokens, statistics = recorder.gram[key], recorder.tokens[key], "routed"
    else:  # no token and no forced routing: the identity Gram makes mAIHT magnitude pruning
        logger.warning("%s expert %d: no calibration token reached it; pruned by magnitude", fused.name, e)
        gram = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        tokens, statistics = 0, "none (magnitude)"
    extra = {"tokens": tokens, "statistics": statistics, "transposed": layout == "in_out"}
    return SolveJob(f"{fused.name}[{e}]", weight, gram), extra


def _linear_job(name: str, layer: nn.Module, collector: GramCollector) -> _Job:
    if name not in collector.gram:
        if ".*." not in layer_type(name):
            raise RuntimeError(f"{name} was not called during calibration; add it to ignore to keep it dense")
        # a per-expert module (inside a list of experts) that the router never chose
        logger.warning("%s: no calibration token reached this expert; pruned by magnitude", name)
        weight = weight_matrix(layer)
        gram = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        return SolveJob(name, weight, gram), {"tokens": 0, "statistics": "none (magnitude)"}
    if collector.dropped_tokens.get(name):
        logger.warning(
            "%s: %d calibration tokens with non-finite activations were left out",
            name,
            collector.dropped_tokens[name],
        )
    return SolveJob(name, weight_matrix(layer), collector.gram[name]), {"tokens": collector.tokens.get(name)}


def _solve(name: str, weight: Tensor, gram: Tensor, config: MAIHTConfig) -> LayerReport:
    """Prune the (out, in) view ``weight`` in place with mAIHT on the Gram matrix ``gram``."""
    shape = list(weight.shape)
    nm = config.nm
    if nm is not None and shape[1] % nm[1]:
        reason = f"input size {shape[1]} is not a multiple of M={nm[1]} for pattern {config.pattern}"
        logger.warning("skipping %s: %s", name, reason)
        return LayerReport(name, shape, 0.0, 0.0, 0.0, 0, 0.0, skipped=reason)
    start = time.perf_counter()
    result = maiht(
        weight.detach(),
        gram,
        LayerSpec(config.sparsity, nm, config.scope),
        iterations=config.iterations,
        refit_iterations=config.refit_iterations,
        ridge=config.ridge,
        formulation=config.formulation,
        seed=config.seed,
    )
    with torch.no_grad():
        weight.copy_(result.weight)
    seconds = time.perf_counter() - start
    sparsity = float((result.weight == 0).float().mean())
    logger.info(
        "%s: sparsity %.3f, relative error %.4g -> %.4g (%.2fs)",
        name,
        sparsity,
        result.error_wanda,
        result.error,
        seconds,
    )
    return LayerReport(
        name, shape, sparsity, result.error_wanda, result.error, result.iterations, seconds, result.history
    )
