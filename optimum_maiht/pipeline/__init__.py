"""The pruning pipeline, in stages around one block context (docs/design.md, "The pipeline"):

- :mod:`.capture`: what each block receives, recorded and replayed; where activations live;
- :mod:`.statistics`: the Gram matrices of a block's targets, as layer problems;
- :mod:`.solve`: the layer solver on every problem, shared out over the ranks;
- :mod:`.reconstruct`: the refit of a pruned block to the dense block's output;
- :mod:`.store`: where the blocks' weights live (in memory, or streamed), and resume;
- :mod:`.sequential`: the loop that moves data between them;
- :mod:`.run`: one run, calibration windows to report.
"""

from .capture import BlockCall, Placement
from .context import BlockContext
from .run import prune_model
from .sequential import SequentialResult, prune_sequential
from .store import IN_MEMORY, BlockStore, FinishedBlock

__all__ = [
    "IN_MEMORY",
    "BlockCall",
    "BlockContext",
    "BlockStore",
    "FinishedBlock",
    "Placement",
    "SequentialResult",
    "prune_model",
    "prune_sequential",
]
