"""The source checkpoint of a streamed run: its safetensors shards, read a tensor at a time, every header
entry checked before any data is used (docs/design.md, "Streaming and resume", "Files from elsewhere")."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..conversion import SAFETENSORS_DTYPES, read_headers
from ..files import read_json, read_safetensors_header
from ..model_utils import check_model_source

SAMPLE_BYTES = 1 << 16
"""Bytes read at each end of a shard's data for the fingerprint of the source checkpoint."""


class Checkpoint:
    """A model folder's safetensors weights: every tensor's header entry (no data read; the index may only
    name files inside the folder: :func:`optimum_maiht.conversion.read_headers`), and the tensors read on
    demand, one file open at a time."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.sources = read_headers(folder)
        self.files = sorted({source.file for source in self.sources.values()})
        self._open: tuple[Path, Any] | None = None

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` as stored (its file kept open for the next read)."""
        path = self.sources[name].file
        if self._open is None or self._open[0] != path:
            self._open = (path, safe_open(str(path), framework="pt"))
        return self._open[1].get_tensor(name)

    def close(self) -> None:
        self._open = None

    def first_float_dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor in the first shard's header (float32 when none)."""
        header = read_safetensors_header(self.files[0])
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype")) if name != "__metadata__" else None
            if dtype is not None and dtype.is_floating_point:
                return dtype
        return torch.float32

    def fingerprint(self) -> dict[str, Any]:
        """``config.json``'s hash and, per shard, its size and a hash of its header (names, shapes, dtypes
        and offsets of every tensor) and of the first and last :data:`SAMPLE_BYTES` of its data (other
        weights of the same shapes): cheap, and unchanged by copying the files."""
        shards = {}
        for path in self.files:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                f.seek(0)
                head = f.read(8 + length + SAMPLE_BYTES)
                f.seek(max(size - SAMPLE_BYTES, 0))
                tail = f.read()
            shards[path.name] = {"bytes": size, "sha256": _sha256(head + tail)}
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
    skipped = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.tflite"]
    return Path(huggingface_hub.snapshot_download(str(source), ignore_patterns=skipped)), str(source)


def empty_model(
    folder: Path, name: str, checkpoint: Checkpoint, dtype: str | torch.dtype | None
) -> nn.Module:
    """The causal LM of ``folder`` on the meta device (buffers real), in ``dtype`` (``"auto"``: the
    config's, else the checkpoint's first floating-point tensor's), with its generation config.
    ``config.json`` is read with bounds first (:func:`optimum_maiht.files.read_json`): a file from
    elsewhere that is huge, deeply nested or not an object is refused before transformers parses it."""
    read_json(folder / "config.json", what="config.json")
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
