"""The capture stage: what each decoder block receives, recorded from real forwards of the model and
replayed later (docs/design.md, "The pipeline").

Nothing here is model specific: whatever keyword arguments a block gets (masks, rotary embeddings,
per-layer sliding windows...) is recorded as a :class:`BlockCall`, never rebuilt by hand. :class:`Placement`
says where the blocks run and where the calibration activations wait between uses.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..model_utils import is_norm

logger = logging.getLogger(__name__)

OFFLOAD_SHARE = 0.5
"""``offload_activations=None`` keeps the activations on the GPU while they take at most this share of
its free memory (the block, its Gram matrices and the solver need the rest)."""


@dataclass(frozen=True)
class Placement:
    """Where a block runs (``compute``) and where the calibration activations wait between uses
    (``parked``; ``None``: on ``compute``). Moves are exact, so the result does not depend on it."""

    compute: torch.device
    parked: torch.device | None = None

    def fetch(self, tensor: Tensor) -> Tensor:
        """An activation on the compute device, for a block to read."""
        return tensor.to(self.compute)

    def park(self, tensor: Tensor) -> Tensor:
        """An activation where it waits until its next use."""
        return tensor if self.parked is None else tensor.to(self.parked)


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


@dataclass
class BlockCall:
    """One recorded call of a block: its other positional arguments and its keyword arguments."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_by_keyword: bool

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """The block's output hidden states for ``hidden`` under this call's arguments."""
        if self.hidden_by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> BlockCall:
        """This call with ``fn`` applied to every tensor of its arguments (inside tuples, lists, dicts)."""

        def apply(value: Any) -> Any:
            if isinstance(value, Tensor):
                return fn(value)
            if isinstance(value, (tuple, list)):
                return type(value)(apply(v) for v in value)
            if isinstance(value, dict):
                return {k: apply(v) for k, v in value.items()}
            return value

        return BlockCall(apply(self.args), apply(self.kwargs), self.hidden_by_keyword)

    def float32(self) -> BlockCall:
        """This call with its floating-point tensors (rotary tables, additive masks) in float32."""
        return self.map_tensors(lambda t: t.float() if t.is_floating_point() else t)

    def rows(self, rows: slice, batch: int) -> BlockCall:
        """This call cut to the windows ``rows`` of its batch of ``batch``: every tensor of two or more
        dimensions whose first is ``batch`` (attention masks, position ids, per-window rotary tables) is
        sliced; the rest (shared rotary tables of batch 1, cache positions) is kept. The reconstruct
        stage checks the cut against the whole batch, so a model this rule gets wrong is caught."""
        return self.map_tensors(lambda t: t[rows] if t.dim() >= 2 and t.shape[0] == batch else t)


class _StopForward(Exception):
    pass


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor, batch_size: int, placement: Placement
) -> tuple[list[Tensor], list[list[BlockCall]]]:
    """Block 0's input hidden states per batch (parked by ``placement``), and every block's recorded call
    per batch.

    The blocks are replaced by recorders that pass the hidden states through unchanged, so one cheap
    forward per batch (embeddings and whatever the backbone computes between blocks) records exactly what
    each block receives; the last recorder stops the forward before the LM head. Block 0 runs once for
    real (it must be loaded, on the compute device) to learn what the model expects a block to return.
    """
    hidden: list[Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    tuple_tail: list[int | None] = []  # learnt once from a real call: what the model expects back

    def recorder(i: int, real_forward):
        def forward(*args, **kwargs):
            by_keyword = not args
            h = kwargs.pop("hidden_states") if by_keyword else args[0]
            rest = args if by_keyword else args[1:]
            calls[i].append(BlockCall(rest, kwargs, by_keyword))
            if i == 0:
                hidden.append(placement.park(h))
                if not tuple_tail:
                    out = (
                        real_forward(*rest, hidden_states=h, **kwargs)
                        if by_keyword
                        else real_forward(h, *rest, **kwargs)
                    )
                    tuple_tail.append(len(out) - 1 if isinstance(out, tuple) else None)
            if i == len(blocks) - 1:
                raise _StopForward
            return h if tuple_tail[0] is None else (h,) + (None,) * tuple_tail[0]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i, block.forward)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids=placement.fetch(input_ids[start : start + batch_size]), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    if len(hidden) != len(calls[-1]):
        raise RuntimeError("the model did not call every decoder block once per batch; it is not supported")
    return hidden, calls


def first_reader(block: nn.Module, call: BlockCall, hidden: Tensor) -> str | None:
    """The name (inside ``block``) of the normalisation layer that reads the block's input first, as a
    forward of ``block`` on ``hidden`` shows: in a pre-norm transformer, how every block reads the residual
    stream (``input_layernorm``, ``ln_1``...). ``None`` when the first module to read it is not a norm (a
    post-norm block reads the raw stream)."""
    names = {module: name for name, module in block.named_modules() if name}
    found: list[str] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("hidden_states")
        if not found and first is hidden:
            found.append(names[module])

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in names]
    try:
        with torch.no_grad():
            call.run(block, hidden)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found and is_norm(block.get_submodule(found[0])) else None


def replay(
    block: nn.Module,
    hidden: list[Tensor],
    calls: list[BlockCall],
    placement: Placement | None = None,
    after_batch: Callable[[], None] | None = None,
    autocast: torch.dtype | None = None,
) -> list[Tensor]:
    """Run every calibration batch through ``block`` (no grad) and return its outputs, parked where the
    inputs were; ``after_batch`` is called after each batch (the Gram collector's bookkeeping).
    ``autocast``: the dtype its matrix products run in (the outputs keep the inputs' dtype); ``None``: the
    block's own."""
    outputs = []
    with torch.no_grad():
        for h, call in zip(hidden, calls, strict=True):
            x = h if placement is None else placement.fetch(h)
            with contextlib.nullcontext() if autocast is None else torch.autocast(x.device.type, autocast):
                out = call.run(block, x).to(h.dtype)
            outputs.append(out if placement is None else placement.park(out))
            if after_batch is not None:
                after_batch()
    return outputs


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, norms...)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside and buf.device != device:
                module._buffers[key] = buf.to(device)
