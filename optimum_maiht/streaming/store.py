"""The store of a streamed run: blocks read from the checkpoint when their turn comes, written to the partial
folder when pruned, then released (docs/design.md, "Streaming and resume").

The model is built without weights (``meta``; non-persistent buffers such as rotary frequencies stay
real); everything outside the decoder blocks is read once. Host memory holds the outside weights, a block
or two and the calibration activations, whatever the number of blocks. The store is also the writer's
:class:`~optimum_maiht.writer.WeightSource`: at the end the output shards are assembled from the partial
folder's block files, one block at a time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..configuration import MAIHTConfig
from ..conversion import CheckpointConversion
from ..distributed import SINGLE, Parallel
from ..model_utils import block_prefix, dtype_name, find_decoder_blocks
from ..pipeline.store import BlockStore, FinishedBlock
from ..report import library_versions
from ..writer import segment_of
from .partial import PartialRun, check_folders, partial_folder
from .source import Checkpoint, empty_model, local_snapshot, tensor_sha256

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20
"""Streaming asks glibc to serve every allocation of at least this size with its own ``mmap``, so that
what a block frees goes back to the system at once (see :func:`return_freed_memory`)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

Slot = tuple[str, nn.Module, str]
"""One name of a parameter: ``(full name, owning module, attribute)``; tied parameters have several."""


def return_freed_memory() -> None:
    """Make freed buffers of :data:`MMAP_THRESHOLD_BYTES` or more return to the system (glibc only; a
    no-op elsewhere). By default glibc raises its mmap threshold up to 32 MiB as large buffers are freed,
    and its heap then keeps the solver's freed buffers between blocks: on the CPU benchmark the peak crept
    up by about 300 MB over the first blocks. The setting is process-wide and stays; it costs page faults
    (about a third more system time on a CPU run), nothing on results."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # another C library
        logger.debug("mallopt unavailable: freed memory may stay in the heap")


class StreamingStore(BlockStore):
    """Blocks read from a checkpoint when their turn comes, written to the partial folder when pruned, then
    released (:class:`optimum_maiht.pipeline.BlockStore`); finished blocks of an interrupted run are read
    back from the partial folder.

    Under ``torchrun`` (``parallel``) every rank reads the blocks from the checkpoint (one page cache per
    machine), and rank 0 alone owns the partial folder: it checks and writes it, shares the resume state,
    and broadcasts the finished blocks it reads back, so the other ranks need no access to it."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Checkpoint,
        partial: PartialRun,
        resume: bool,
        dtype: str,
        parallel: Parallel = SINGLE,
    ):
        self.model = model
        self.parallel = parallel
        self.checkpoint = checkpoint
        self.conversion = CheckpointConversion(model, checkpoint.sources)
        """transformers' conversion of this checkpoint (fused experts, renamed keys), block by block;
        building it checked every tensor's shape and dtype against the model, no data read."""
        self.partial = partial
        self.resume = resume
        self.dtype = dtype
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        self._done: dict[int, FinishedBlock] = {}
        self._loaded: set[int] = set()
        self._segments: dict[int | None, list[str]] = {}
        slots: dict[int, list[Slot]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            module_name, _, attr = name.rpartition(".")
            slots.setdefault(id(param), []).append((name, model.get_submodule(module_name), attr))
        self._tied = list(slots.values())
        """Every parameter as the list of names (and owners) it has: several when tied."""

    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        output: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        dtype: str | torch.dtype | None = "auto",
        base_model: str | None = None,
        parallel: Parallel = SINGLE,
    ) -> StreamingStore:
        """Check the output and the partial folder, then build the model without weights from ``source``
        (a folder or a Hub id; ``base_model``: the Hub id its config names instead, for a local copy) and
        load everything outside its decoder blocks. With several ranks, rank 0 checks the folders and
        downloads a Hub id first; a failure there stops every rank."""
        partial = PartialRun(partial_folder(output))
        resuming = parallel.on_main(lambda: check_folders(output, partial, resume, overwrite), share=True)
        folder, name = parallel.on_main(lambda: local_snapshot(source), share=True)
        if not parallel.is_main:  # after rank 0: a Hub id is in this machine's cache (or downloaded here)
            folder, name = local_snapshot(source)
        checkpoint = Checkpoint(folder)
        return_freed_memory()
        model = empty_model(folder, base_model or name, checkpoint, dtype)
        store = cls(model, checkpoint, partial, resuming, dtype_name(dtype), parallel)
        store._load_outside()
        return store

    def _prefix(self, index: int) -> str:
        return block_prefix(self.blocks_name, index)

    def _groups(self, index: int | None) -> list[list[Slot]]:
        """The parameters of block ``index`` (``None``: those outside the blocks)."""
        if index is not None:
            return [names for names in self._tied if names[0][0].startswith(self._prefix(index))]
        inside = tuple(self._prefix(i) for i in range(len(self.blocks)))
        return [names for names in self._tied if not names[0][0].startswith(inside)]

    @staticmethod
    def _put(groups: list[list[Slot]], value: Callable[[list[Slot], nn.Parameter], Tensor]) -> None:
        """Give every parameter of ``groups`` a new tensor, ``value(names, current)``, under all its names."""
        for names in groups:
            _, module, attr = names[0]
            current = module._parameters[attr]
            param = nn.Parameter(value(names, current), requires_grad=current.requires_grad)
            for _, owner, key in names:
                owner._parameters[key] = param

    def _assign(self, tensors: dict[str, Tensor], groups: list[list[Slot]]) -> None:
        """Give the parameters of ``groups`` (and the persistent buffers among ``tensors``) their tensors
        from the checkpoint, as ``from_pretrained`` holds them (dtypes included)."""
        self._put(groups, lambda names, meta: tensors[names[0][0]])
        params = {name for names in groups for name, _, _ in names}
        for name, value in tensors.items():
            if name not in params:
                module_name, _, attr = name.rpartition(".")
                self.model.get_submodule(module_name)._buffers[attr] = value

    def _load_block(self, index: int) -> None:
        """Block ``index``'s dense weights, converted from its own checkpoint tensors only."""
        self._assign(
            self.conversion.load_block(self._prefix(index), self.checkpoint.read), self._groups(index)
        )
        self.checkpoint.close()

    def _load_outside(self) -> None:
        """The weights outside the blocks (small: loaded once, never released)."""
        prefixes = [self._prefix(i) for i in range(len(self.blocks))]
        self._assign(self.conversion.load_outside(prefixes, self.checkpoint.read), self._groups(None))
        self.checkpoint.close()

    # -- the hooks ---------------------------------------------------------------------------------

    def fingerprint(self, input_ids: Tensor, config: MAIHTConfig) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one to end bit-identical to a run without
        interruption: the checkpoint, the dtype, the calibration windows, the configuration and the
        versions of optimum-maiht, torch and transformers."""
        versions = {k: v for k, v in library_versions().items() if k != "python"}
        return {
            "model": self.checkpoint.fingerprint(),
            "dtype": self.dtype,
            "calibration": tensor_sha256(input_ids),
            "config": config.to_dict(),
            "versions": versions,
        }

    def begin(self, input_ids: Tensor, config: MAIHTConfig) -> None:
        """Rank 0 starts the partial folder, or checks it against this run and reads its finished blocks;
        every rank gets them."""

        def start() -> dict[int, FinishedBlock]:
            fingerprint = self.fingerprint(input_ids, config)
            if self.resume:
                return self.partial.check_resumable(fingerprint, len(self.blocks), self.parallel.world_size)
            self.partial.start({**fingerprint, "world_size": self.parallel.world_size})
            return {}

        self._done = self.parallel.on_main(start, share=True)
        logger.info("partial state (for --resume) in %s", self.partial.folder)

    def finished(self, index: int) -> bool:
        return index in self._done

    def load_dense(self, index: int, block: nn.Module) -> None:
        if index in self._loaded and index not in self._done:
            return  # its dense weights are there already (loaded early as the refit's reader)
        self._load_block(index)
        self._loaded.discard(index)  # load() then gives the pruned weights of a finished block
        if index not in self._done:
            self._loaded.add(index)

    def load(self, index: int, block: nn.Module) -> FinishedBlock | None:
        if index not in self._loaded:
            groups = self._groups(index)
            if index not in self._done:
                self._load_block(index)
            elif self.parallel.world_size == 1 or self.parallel.is_main:
                with safe_open(str(self.partial.block_file(index)), framework="pt") as f:
                    self._put(groups, lambda names, meta: f.get_tensor(names[0][0]))
            else:  # rank 0 reads the finished block back and sends it to the others
                self._put(groups, lambda names, meta: torch.empty_like(meta, device="cpu"))
            if index in self._done and self.parallel.world_size > 1:
                self.parallel.broadcast([names[0][1]._parameters[names[0][2]] for names in groups])
            self._loaded.add(index)
        return self._done.get(index)

    def done(self, index: int, block: nn.Module, record: FinishedBlock) -> None:
        prefix = self._prefix(index)
        tensors = {prefix + k: v for k, v in block.state_dict().items()}
        self.parallel.on_main(lambda: self.partial.save_block(index, tensors, record))
        self._done[index] = record

    def release(self, index: int, block: nn.Module) -> None:
        self._put(self._groups(index), lambda names, param: torch.empty_like(param, device="meta"))
        self._loaded.discard(index)

    # -- the writer's source -----------------------------------------------------------------------

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The pruned tensors of ``names`` (one segment): a block's from its file in the partial folder,
        the rest from memory."""
        state = self.model.state_dict()
        if state[names[0]].device.type != "meta":
            return {name: state[name] for name in names}
        index = segment_of(self.model)(names[0])
        with safe_open(str(self.partial.block_file(index)), framework="pt") as f:
            return {name: f.get_tensor(name) for name in names}

    def saved_layout(self) -> dict[str, Tensor]:
        return self.conversion.saved_layout()

    def saved_segment(self, index: int | None) -> dict[str, Tensor]:
        """What ``save_pretrained`` writes for block ``index`` (``None``: outside the blocks) of the pruned
        model: its tensors from the partial folder, the checkpoint's layout restored."""
        if not self._segments:
            which = segment_of(self.model)
            for name in self.model.state_dict():
                self._segments.setdefault(which(name), []).append(name)
        return self.conversion.saved(self.read(self._segments[index]))

    @property
    def spill_folder(self) -> Path:
        """Where the compact format's encoded blocks wait until the output shards are written."""
        return self.partial.folder / "encoded"

    def close(self) -> None:
        """The run is saved: remove the partial folder."""
        shutil.rmtree(self.partial.folder, ignore_errors=True)
