"""The block context: what every stage of one decoder block works on, passed as one object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

    def replay(self, after_batch: Callable[[], None] | None = None) -> list[Tensor]:
        """The block's outputs on every calibration batch (no grad), parked."""
        return replay(self.block, self.hidden, self.calls, self.placement, after_batch)

    def replay_dense(self, after_batch: Callable[[], None] | None = None) -> list[Tensor]:
        """The block's outputs on the dense model's inputs (no grad), parked. The first call, before any
        target is pruned, runs the dense block: its outputs are kept as :attr:`dense`."""
        assert self.dense_inputs is not None, "replay_dense needs the dense model's inputs"
        outputs = replay(self.block, self.dense_inputs, self.calls, self.placement, after_batch)
        if self.dense is None:
            self.dense = outputs
        return outputs
