"""The block context: what every stage of one decoder block works on, passed as one object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..targets import BlockTargets
from .capture import BlockCall, Placement, replay


@dataclass
class BlockContext:
    """One decoder block while its stages run (docs/design.md, "The pipeline")."""

    index: int
    block: nn.Module
    """On the compute device."""
    targets: BlockTargets
    calls: list[BlockCall]
    """Its recorded call, per calibration batch."""
    hidden: list[Tensor]
    """The pruned model's inputs to this block, per batch (parked by ``placement``)."""
    placement: Placement
    dense: list[Tensor] | None = None
    """The dense model's outputs of this block, per batch: the reconstruct stage's targets and the next
    block's dense inputs, kept from the first statistics pass (``None`` before it, and when block
    reconstruction is off)."""
    dense_inputs: list[Tensor] | None = None
    """The dense model's inputs to this block, per batch, when block reconstruction is on (parked): the
    statistics pass runs the dense block on them (:meth:`replay_dense`)."""
    reader: nn.Module | None = None
    """The normalisation layer that reads this block's output next (the next block's input norm, the final
    norm after the last block), a float32 copy on the compute device: the reconstruct stage measures the
    output error through it, as the model reads it. ``None``: on the raw output."""
    precision: torch.dtype | None = None
    """The dtype of its passes (``compute_dtype`` resolved, probed and agreed before its first pass:
    :func:`~.precision.block_dtype`); ``None``: not decided (its own dtype, float32 for a refit)."""

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype of the matrix products of its calibration passes: :attr:`precision` where that is
        bfloat16 and the block float32 (a half-precision block runs in its own dtype); ``None``: its own."""
        if self.precision in (None, torch.float32):
            return None
        own = {p.dtype for p in self.block.parameters() if p.is_floating_point()}
        return self.precision if own == {torch.float32} else None

    @property
    def pass_dtype(self) -> torch.dtype:
        """The dtype of the matrix products of its calibration passes: :attr:`autocast`, else its weights'
        (the first floating-point one's)."""
        own = next((p.dtype for p in self.block.parameters() if p.is_floating_point()), torch.float32)
        return self.autocast or own

    def replay(self, after_batch: Callable[[], None] | None = None) -> list[Tensor]:
        """The block's outputs on every calibration batch (no grad), parked."""
        return replay(self.block, self.hidden, self.calls, self.placement, after_batch, self.autocast)

    def replay_dense(self, after_batch: Callable[[], None] | None = None) -> list[Tensor]:
        """The block's outputs on the dense model's inputs (no grad), parked. The first call, before any
        target is pruned, runs the dense block: its outputs are kept as :attr:`dense`."""
        assert self.dense_inputs is not None, "replay_dense needs the dense model's inputs"
        inputs = self.dense_inputs
        outputs = replay(self.block, inputs, self.calls, self.placement, after_batch, self.autocast)
        if self.dense is None:
            self.dense = outputs
        return outputs
