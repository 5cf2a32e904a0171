"""Models larger than host memory: prune a checkpoint one decoder block at a time, straight from its
safetensors shards into the output folder, and resume a killed run (docs/design.md, "Streaming and
resume").

The model is built without weights (``meta`` device; non-persistent buffers such as rotary frequencies
stay real); everything outside the decoder blocks (embeddings, final norm, ``lm_head``) is read once. Each
block is read from the shards when its turn comes, pruned, written to the partial folder beside the output
(``<output>.maiht-partial/blocks/``) and released, so host memory holds the outside weights, a block or
two and the calibration activations, whatever the number of blocks. The partial folder is also the state
a killed run resumes from: the fingerprint of what it was started with, and per finished block its pruned
tensors and its reports. At the end the output shards are assembled tensor by tensor from those files
(dense, or encoded block by block in the compact format) into a temporary folder moved into place when
complete; then the partial folder is removed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .configuration import MAIHTConfig
from .distributed import SINGLE, Parallel
from .model_utils import block_prefix, check_model_source, find_decoder_blocks
from .report import BlockReconstruction, LayerReport, PruneReport
from .sequential import BlockStore, FinishedBlock

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".maiht-partial"
"""The partial folder of output ``out`` is ``out.maiht-partial``, beside it."""
SAMPLE_BYTES = 1 << 16
"""Bytes read at each end of a shard's data for the fingerprint of the source checkpoint."""
STATE_NAME = "state.json"
STATE_VERSION = 1
NO_STREAM = "prune it in memory instead (optimum-cli: --no-stream; Python: MAIHTPruner.from_pretrained)"

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


MMAP_THRESHOLD_BYTES = 1 << 20
"""Streaming asks glibc to serve every allocation of at least this size with its own ``mmap``, so that
what a block frees goes back to the system at once (see :func:`return_freed_memory`)."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


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


class StreamingUnsupportedError(ValueError):
    """The model cannot be streamed (its weights are renamed or fused on load); the message says to prune
    it in memory."""


class ResumeError(ValueError):
    """A partial run exists and was not asked to be resumed, or does not match the run resuming it."""


# --------------------------------------------------------------------------------------------------
# safetensors, one tensor at a time


def _read_header(path: Path) -> bytes:
    """The raw JSON header of a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return f.read(size)


def write_safetensors(
    path: Path, tensors: dict[str, Tensor], fetch: Callable[[str], Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file whose tensors have the shapes and dtypes of ``tensors`` (meta tensors
    will do), their values coming from ``fetch(name)`` one at a time: the header (8-byte little-endian
    length, JSON with each tensor's dtype, shape and byte range) is known from the shapes, so no more than
    one tensor is ever held. Tensors are laid out in the order given."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, planned in tensors.items():
            value = fetch(name)
            if value.shape != planned.shape or value.dtype != planned.dtype:
                raise RuntimeError(
                    f"{name}: got {value.dtype} {tuple(value.shape)}, planned {planned.dtype} "
                    f"{tuple(planned.shape)}"
                )
            f.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class _TensorFiles:
    """Reads named tensors from safetensors files, keeping only the last file opened."""

    def __init__(self, where: dict[str, Path]):
        self.where = where
        self._path: Path | None = None
        self._file: Any = None

    def get(self, name: str) -> Tensor:
        from safetensors import safe_open

        path = self.where[name]
        if path != self._path:
            self.close()
            self._file = safe_open(str(path), framework="pt")
            self._path = path
        return self._file.get_tensor(name)

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        return {name: self.get(name) for name in names}

    def close(self) -> None:
        self._file, self._path = None, None


# --------------------------------------------------------------------------------------------------
# the source checkpoint


class Checkpoint:
    """A model folder's safetensors weights: which file holds each tensor, read on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise StreamingUnsupportedError(
                f"{folder} has no safetensors weights (model.safetensors or its index); {NO_STREAM}"
            )
        self.files = sorted(set(weight_map.values()))
        self.tensors = _TensorFiles({name: folder / file for name, file in weight_map.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors.where

    def first_float_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor in the first shard (float32 when none)."""
        names = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
        header = json.loads(_read_header(self.folder / self.files[0]))
        for name, entry in header.items():
            dtype = names.get(entry.get("dtype")) if name != "__metadata__" else None
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return torch.float32

    def fingerprint(self) -> dict[str, Any]:
        """``config.json``'s hash and, per shard, its size and a hash of its header (names, shapes, dtypes
        and offsets of every tensor) and of the first and last :data:`SAMPLE_BYTES` of its data (other
        weights of the same shapes): cheap, and unchanged by copying the files."""
        shards = {}
        for file in self.files:
            path = self.folder / file
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8 + len(_read_header(path)) + SAMPLE_BYTES)
                f.seek(max(size - SAMPLE_BYTES, 0))
                tail = f.read()
            shards[file] = {"bytes": size, "sha256": _sha256(head + tail)}
        return {"config_sha256": _sha256((self.folder / "config.json").read_bytes()), "shards": shards}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor: Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (the calibration windows' identity)."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def local_snapshot(source: str | os.PathLike) -> tuple[Path, str]:
    """``(folder, name)``: a local model folder as is, or a Hub id's safetensors, config and tokenizer
    files downloaded with ``huggingface_hub.snapshot_download`` (other weight formats are skipped)."""
    folder = check_model_source(source)
    if folder is not None:
        return folder.resolve(), str(source)
    from huggingface_hub import snapshot_download

    skipped = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite"]
    return Path(snapshot_download(str(source), ignore_patterns=skipped)), str(source)


# --------------------------------------------------------------------------------------------------
# the partial folder


def partial_folder(output: str | os.PathLike) -> Path:
    """Where the resume state of a streaming run writing ``output`` lives: ``<output>.maiht-partial``."""
    target = Path(output).expanduser().resolve()
    return target.with_name(target.name + PARTIAL_SUFFIX)


class PartialRun:
    """The resume state: ``state.json`` (the fingerprint), and per finished block
    ``blocks/block-NNNNN.safetensors`` (its pruned tensors) then ``blocks/block-NNNNN.json`` (its reports
    and time, written last: a block counts as finished once its JSON exists). Files are written under a
    temporary name and renamed, so a kill never leaves a half-written file under a final name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.blocks = folder / "blocks"

    def finished(self) -> dict[int, FinishedBlock]:
        done = {}
        for path in sorted(self.blocks.glob("block-*.json")):
            data = json.loads(path.read_text())
            layers = [LayerReport.from_dict(layer) for layer in data["layers"]]
            rebuilt = data.get("reconstruction")
            rebuilt = None if rebuilt is None else BlockReconstruction.from_dict(rebuilt)
            done[int(path.stem.split("-")[1])] = FinishedBlock(layers, data["seconds"], rebuilt)
        return done

    def block_file(self, index: int) -> Path:
        return self.blocks / f"block-{index:05d}.safetensors"

    def start(self, fingerprint: dict[str, Any]) -> None:
        self.blocks.mkdir(parents=True, exist_ok=True)
        _write_atomic(
            self.folder / STATE_NAME, json.dumps({"version": STATE_VERSION, **fingerprint}, indent=2)
        )

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.folder / STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeError(
                f"{self.folder} is not a readable partial run ({err}); delete the folder to start again"
            ) from None

    def save_block(self, index: int, tensors: dict[str, Tensor], record: FinishedBlock) -> None:
        from safetensors.torch import save_file

        path = self.block_file(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        data: dict[str, Any] = {"layers": [r.to_dict() for r in record.layers], "seconds": record.seconds}
        if record.reconstruction is not None:
            data["reconstruction"] = record.reconstruction.to_dict()
        _write_atomic(path.with_suffix(".json"), json.dumps(data))


def _check_folders(output: str | os.PathLike, partial: PartialRun, resume: bool, overwrite: bool) -> bool:
    """Check the output folder and the partial folder beside it; whether there is a run to resume."""
    from .serialization import check_output_folder

    check_output_folder(output, overwrite)
    if partial.folder.exists() and not resume:
        done = len(partial.finished()) if partial.blocks.is_dir() else 0
        raise ResumeError(
            f"{partial.folder} holds an interrupted run ({done} blocks pruned): pass resume=True "
            "(optimum-cli: --resume) to continue it, or delete that folder to start again"
        )
    if resume and not partial.folder.exists():
        logger.info("nothing to resume in %s: starting from the first block", partial.folder)
    return resume and partial.folder.exists()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words."""
    found = []
    for part in ("model", "dtype", "calibration", "config", "versions"):
        before, now = old.get(part), new.get(part)
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):
            if part == "model":
                before, now = (
                    {"config.json": before.get("config_sha256"), **before.get("shards", {})},
                    {
                        "config.json": now.get("config_sha256"),
                        **now.get("shards", {}),
                    },
                )
            keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])
            found.append(f"{part} ({details})")
        else:
            found.append(f"{part} ({before!r} -> {now!r})")
    return found


# --------------------------------------------------------------------------------------------------
# the store the pipeline calls


class StreamingStore(BlockStore):
    """Blocks read from a checkpoint when their turn comes, written to the partial folder when pruned,
    then released (:class:`optimum_maiht.sequential.BlockStore`); finished blocks of an interrupted run
    are read back from the partial folder.

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
        self.partial = partial
        self.resume = resume
        self.dtype = dtype
        self.blocks_name, self.blocks = find_decoder_blocks(model)
        self._done: dict[int, FinishedBlock] = {}
        self._loaded: set[int] = set()
        slots: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            module_name, _, attr = name.rpartition(".")
            slots.setdefault(id(param), []).append((name, model.get_submodule(module_name), attr))
        self._tied = list(slots.values())
        """Every parameter as the list of names (and owners) it has: several when tied."""

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        source: str | os.PathLike,
        output: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        dtype: str | torch.dtype | None = "auto",
        parallel: Parallel = SINGLE,
    ) -> StreamingStore:
        """Check the output and the partial folder, then build the model without weights from ``source``
        (a folder or a Hub id) and load everything outside its decoder blocks. With several ranks, rank 0
        checks the folders and downloads a Hub id first; a failure there stops every rank."""
        partial = PartialRun(partial_folder(output))
        resuming = parallel.on_main(lambda: _check_folders(output, partial, resume, overwrite), share=True)
        folder, name = parallel.on_main(lambda: local_snapshot(source), share=True)
        if not parallel.is_main:  # after rank 0: a Hub id is in this machine's cache (or downloaded here)
            folder, name = local_snapshot(source)
        checkpoint = Checkpoint(folder)
        return_freed_memory()
        model = _empty_model(folder, name, checkpoint, dtype)
        store = cls(model, checkpoint, partial, resuming, _dtype_name(dtype), parallel)
        store._check_streamable()
        store._load_outside()
        return store

    def _check_streamable(self) -> None:
        """Refuse models whose checkpoint names differ from the model's (transformers converts them on
        load: fused experts, renamed keys) and fused experts: only the in-memory path handles them."""
        from transformers.core_model_loading import revert_weight_conversion

        from .experts import find_fused_experts

        fused = [w.name for i, b in enumerate(self.blocks) for w in find_fused_experts(b, self._prefix(i))]
        if fused:
            raise StreamingUnsupportedError(
                f"the model has fused mixture-of-experts weights ({fused[0]}...), which transformers "
                f"converts on load; streaming does not support them yet: {NO_STREAM}"
            )
        state = self.model.state_dict()
        if set(revert_weight_conversion(self.model, state)) != set(state):
            raise StreamingUnsupportedError(
                f"{type(self.model).__name__} renames its weights between checkpoint and model; streaming "
                f"does not support it: {NO_STREAM}"
            )
        # as after from_pretrained when no conversion applied: save_pretrained then writes the tensors
        # in transformers' sorted order, so the shards are cut the same way
        self.model._weight_conversions = []
        missing = [names[0][0] for names in self._tied if not any(n in self.checkpoint for n, _, _ in names)]
        if missing:
            raise StreamingUnsupportedError(
                f"{self.checkpoint.folder} lacks {len(missing)} weights of the model under their names "
                f"(e.g. {missing[0]}): an older naming or another layout; {NO_STREAM}"
            )

    def _prefix(self, index: int) -> str:
        return block_prefix(self.blocks_name, index)

    def _load_outside(self) -> None:
        """The parameters outside the blocks, and every persistent buffer the checkpoint holds (small:
        loaded once, never released)."""
        inside = tuple(self._prefix(i) for i in range(len(self.blocks)))
        self._assign([names for names in self._tied if not names[0][0].startswith(inside)], source=None)
        params = {name for names in self._tied for name, _, _ in names}
        for name in self.model.state_dict(keep_vars=True):
            if name not in params and name in self.checkpoint:
                module_name, _, attr = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                module._buffers[attr] = self.checkpoint.tensors.get(name).to(module._buffers[attr].dtype)
        self.checkpoint.tensors.close()

    def _assign(self, groups: list[list[tuple[str, nn.Module, str]]], source: Path | None) -> None:
        """Give the parameters ``groups`` their values: from the checkpoint (cast to the model's dtype,
        as transformers does), or from a block file of the partial folder (``source``)."""
        files = _TensorFiles({}) if source is not None else None
        for names in groups:
            _, module, attr = names[0]
            meta = module._parameters[attr]
            if files is not None:
                files.where[names[0][0]] = source
                value = files.get(names[0][0])
            else:
                name = next(n for n, _, _ in names if n in self.checkpoint)
                value = self.checkpoint.tensors.get(name)
                value = value.to(meta.dtype) if value.is_floating_point() else value
            param = nn.Parameter(value, requires_grad=meta.requires_grad)
            for _, owner, key in names:
                owner._parameters[key] = param
        self.checkpoint.tensors.close()
        if files is not None:
            files.close()

    @staticmethod
    def _assign_empty(groups: list[list[tuple[str, nn.Module, str]]]) -> None:
        """Give the parameters ``groups`` uninitialized CPU storage of their shapes (to be overwritten)."""
        for names in groups:
            _, module, attr = names[0]
            meta = module._parameters[attr]
            param = nn.Parameter(torch.empty_like(meta, device="cpu"), requires_grad=meta.requires_grad)
            for _, owner, key in names:
                owner._parameters[key] = param

    def _block_groups(self, index: int) -> list[list[tuple[str, nn.Module, str]]]:
        prefix = self._prefix(index)
        return [names for names in self._tied if names[0][0].startswith(prefix)]

    # -- the hooks ---------------------------------------------------------------------------------

    def fingerprint(self, input_ids: Tensor, config: MAIHTConfig) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one to end bit-identical to a run without
        interruption: the checkpoint, the dtype, the calibration windows, the configuration and the
        versions of optimum-maiht, torch and transformers."""
        from .report import library_versions

        versions = {k: v for k, v in library_versions().items() if k != "python"}
        return {
            "model": self.checkpoint.fingerprint(),
            "dtype": self.dtype,
            "calibration": tensor_sha256(input_ids),
            "config": config.to_dict(),
            "versions": versions,
        }

    def begin(self, input_ids: Tensor, config: MAIHTConfig) -> None:
        self._done = self.parallel.on_main(lambda: self._begin(input_ids, config), share=True)

    def _begin(self, input_ids: Tensor, config: MAIHTConfig) -> dict[int, FinishedBlock]:
        """Rank 0: start the partial folder, or check it against this run and read its finished blocks."""
        fingerprint = self.fingerprint(input_ids, config)
        world_size = self.parallel.world_size
        if self.resume:
            state = self.partial.state()
            differences = _differences(state, fingerprint)
            if differences:
                raise ResumeError(
                    f"cannot resume {self.partial.folder}: it was started with a different "
                    f"{'; '.join(differences)}. Resume with the same model, dtype, calibration data, "
                    "configuration and library versions, or delete that folder to start again"
                )
            done = self.partial.finished()
            if sorted(done) != list(range(len(done))):
                raise ResumeError(f"{self.partial.folder} is damaged (blocks {sorted(done)}); delete it")
            logger.info(
                "resuming %s: %d of %d blocks already pruned",
                self.partial.folder,
                len(done),
                len(self.blocks),
            )
            started = state.get("world_size", 1)
            if started != world_size:
                logger.warning(
                    "the interrupted run had %d processes and this one has %d: the blocks still to prune "
                    "will match an uninterrupted run up to floating-point summation order, not bit for bit",
                    started,
                    world_size,
                )
        else:
            self.partial.start({**fingerprint, "world_size": world_size})
            done = {}
        logger.info("partial state (for --resume) in %s", self.partial.folder)
        return done

    def finished(self, index: int) -> FinishedBlock | None:
        return self._done.get(index)

    def load(self, index: int, block: nn.Module) -> None:
        if index in self._loaded:
            return
        groups = self._block_groups(index)
        if index not in self._done:
            self._assign(groups, source=None)
        elif self.parallel.world_size == 1:
            self._assign(groups, source=self.partial.block_file(index))
        else:  # rank 0 reads the finished block back and sends it to the others
            if self.parallel.is_main:
                self._assign(groups, source=self.partial.block_file(index))
            else:
                self._assign_empty(groups)
            self.parallel.broadcast([names[0][1]._parameters[names[0][2]] for names in groups])
        self._loaded.add(index)

    def done(self, index: int, block: nn.Module, record: FinishedBlock) -> None:
        prefix = self._prefix(index)
        tensors = {prefix + k: v for k, v in block.state_dict().items()}
        self.parallel.on_main(lambda: self.partial.save_block(index, tensors, record))
        self._done[index] = record

    def load_dense(self, index: int, block: nn.Module) -> None:
        self._assign(self._block_groups(index), None)
        self._loaded.discard(index)  # load() then gives the pruned weights of a finished block

    def release(self, index: int, block: nn.Module) -> None:
        for names in self._block_groups(index):
            _, module, attr = names[0]
            param = module._parameters[attr]
            empty = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            for _, owner, key in names:
                owner._parameters[key] = empty
        self._loaded.discard(index)

    # -- the output --------------------------------------------------------------------------------

    def write_weights(
        self,
        folder: Path,
        model: nn.Module,
        config: MAIHTConfig,
        report: PruneReport,
        save_format: str,
        max_shard_size: str | int,
    ) -> None:
        """``serialization.save_pruned``'s weights writer: the shards assembled from the partial folder's
        block files, one tensor at a time, as the in-memory path would write them."""
        if save_format == "dense":
            self._write_dense(folder, max_shard_size)
        else:
            self._write_compressed(folder, config, report, max_shard_size)

    def _block_of(self, name: str) -> int | None:
        for i in range(len(self.blocks)):
            if name.startswith(self._prefix(i)):
                return i
        return None

    def _write_dense(self, folder: Path, max_shard_size: str | int) -> None:
        """Like ``PreTrainedModel.save_pretrained``: its config files (written by it, with no tensors),
        tied weights removed, shards cut by ``split_torch_state_dict_into_shards``, the same index."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.model.save_pretrained(folder, state_dict={})
        (folder / "model.safetensors").unlink(missing_ok=True)  # none is written for no tensors
        state = remove_tied_weights_from_state_dict(self.model.state_dict(), self.model)
        state = revert_weight_conversion(self.model, state)  # no renaming (checked): only the order
        where = {n: self.partial.block_file(i) for n in state if (i := self._block_of(n)) is not None}
        split = split_torch_state_dict_into_shards(
            state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        self._write_shards(folder, split, state, where, {"format": "pt"})
        if split.is_sharded:
            metadata = {"total_parameters": self.model.num_parameters(), **split.metadata}
            index = {"metadata": metadata, "weight_map": split.tensor_to_filename}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (folder / "model.safetensors.index.json").write_text(text)

    def _write_compressed(
        self, folder: Path, config: MAIHTConfig, report: PruneReport, max_shard_size: str | int
    ) -> None:
        """Like ``compressed.save_compressed``: each block encoded from its dense file into
        ``encoded/block-NNNNN.safetensors`` in the partial folder (one block in memory), then the shards
        assembled in state-dict order."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        from .compressed import COMPRESSED_WEIGHTS_PATTERN, plan_compression, write_configs, write_index
        from .serialization import compressed_layers

        state = self.model.state_dict()
        plan = plan_compression(self.model, state, *compressed_layers(config, report))
        encoded_dir = self.partial.folder / "encoded"
        encoded_dir.mkdir(exist_ok=True)
        planned: dict[str, Tensor] = {}
        where: dict[str, Path] = {}
        layers: dict[str, dict[str, Any]] = {}
        for index, names in _segments(state, self._block_of):
            part = {name: state[name] for name in names}
            if index is None:  # outside the blocks: in memory, stored as they are
                tensors, part_layers = plan.encode(part)
                planned.update(tensors)
            else:
                dense = _TensorFiles(dict.fromkeys(names, self.partial.block_file(index)))
                tensors, part_layers = plan.encode(dense.read(n for n in names if n not in plan.aliases))
                dense.close()
                path = encoded_dir / f"block-{index:05d}.safetensors"
                save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
                planned.update({n: torch.empty_like(t, device="meta") for n, t in tensors.items()})
                where.update(dict.fromkeys(tensors, path))
                del tensors
            layers.update(part_layers)
        split = split_torch_state_dict_into_shards(
            planned, filename_pattern=COMPRESSED_WEIGHTS_PATTERN, max_shard_size=max_shard_size
        )
        self._write_shards(folder, split, planned, where, plan.shard_metadata)
        write_index(folder, split, layers, plan.aliases, plan.version)
        write_configs(self.model, folder)

    @staticmethod
    def _write_shards(
        folder: Path, split: Any, planned: dict[str, Tensor], where: dict[str, Path], metadata: dict[str, str]
    ) -> None:
        files = _TensorFiles(where)

        def fetch(name: str) -> Tensor:
            return files.get(name) if name in where else planned[name]

        for filename, names in split.filename_to_tensors.items():
            write_safetensors(folder / filename, {n: planned[n] for n in names}, fetch, metadata)
        files.close()

    def close(self) -> None:
        """The run is saved: remove the partial folder."""
        shutil.rmtree(self.partial.folder, ignore_errors=True)


def _segments(
    state: dict[str, Tensor], block_of: Callable[[str], int | None]
) -> list[tuple[int | None, list[str]]]:
    """The state dict's names in order, cut into runs of the same block (``None``: outside the blocks)."""
    runs: list[tuple[int | None, list[str]]] = []
    for name in state:
        index = block_of(name)
        if runs and runs[-1][0] == index:
            runs[-1][1].append(name)
        else:
            runs.append((index, [name]))
    return runs


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    return "auto" if dtype in (None, "auto") else str(dtype).removeprefix("torch.")


def _empty_model(
    folder: Path, name: str, checkpoint: Checkpoint, dtype: str | torch.dtype | None
) -> nn.Module:
    """The causal LM of ``folder`` on the meta device (buffers real), in ``dtype`` (``"auto"``: the
    config's, else the checkpoint's first floating-point tensor's), with its generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(folder)
    config.name_or_path = name
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if not isinstance(dtype, torch.dtype):
            dtype = checkpoint.first_float_dtype()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped on the meta device inside the context; from_pretrained ties them
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
