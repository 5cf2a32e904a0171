"""Models larger than host memory: prune a checkpoint one decoder block at a time, straight from its
safetensors shards into the output folder, and resume a killed run (docs/design.md, "Streaming and
resume").

- :mod:`.source`: the source checkpoint, every tensor checked against the model before it is used;
- :mod:`.partial`: the partial folder beside the output (what the run was started with, the finished
  blocks), from which a killed run resumes;
- :mod:`.store`: :class:`StreamingStore`, the pipeline's store for a streamed run and the writer's source.
"""

from ..conversion import CheckpointMismatchError
from .partial import PARTIAL_SUFFIX, ResumeError, partial_folder
from .store import StreamingStore

__all__ = ["PARTIAL_SUFFIX", "CheckpointMismatchError", "ResumeError", "StreamingStore", "partial_folder"]
