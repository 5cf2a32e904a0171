"""The store stage: where the decoder blocks' weights live around the per-block loop, and which blocks an
earlier, interrupted run already finished (docs/design.md, "The pipeline", "Streaming and resume")."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..configuration import MAIHTConfig
from ..report import BlockReconstruction, LayerReport


@dataclass
class FinishedBlock:
    """A pruned block's record: its layer reports, wall time, reconstruction report and the dtype of its
    passes."""

    layers: list[LayerReport]
    seconds: float
    reconstruction: BlockReconstruction | None = None
    dtype: str | None = None


class BlockStore:
    """Where the blocks' weights come from and go to.

    This base class is the in-memory path: the whole model is loaded, no block is finished before the run,
    and every hook does nothing. :class:`optimum_maiht.streaming.StreamingStore` reads each block from the
    checkpoint before its turn, writes it out when pruned, releases it, and resumes an interrupted run:
    resume is the store's business, the loop only asks :meth:`load` what it got.
    """

    def begin(self, input_ids: Tensor, config: MAIHTConfig) -> None:
        """Called once with the calibration windows and the configuration, before any block is loaded."""

    def finished(self, index: int) -> bool:
        """Whether an earlier, interrupted run already finished block ``index`` (never, in memory)."""
        return False

    def load_dense(self, index: int, block: nn.Module) -> None:
        """Give block ``index`` its dense weights, even when an earlier run pruned it (block reconstruction
        carries the dense model's activations through every block). In memory every block is dense until
        the loop prunes it."""

    def load(self, index: int, block: nn.Module) -> FinishedBlock | None:
        """Give block ``index`` the weights to run on the CPU: its dense ones, or the pruned ones of an
        earlier run that finished it, whose record is then returned (the loop only propagates the
        activations through it); ``None``: prune it."""
        return None

    def done(self, index: int, block: nn.Module, record: FinishedBlock) -> None:
        """Block ``index`` is pruned (its weights back on the CPU)."""

    def release(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is no longer needed."""


IN_MEMORY = BlockStore()
"""The store of a model held whole in memory."""
