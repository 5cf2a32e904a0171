"""The one shard writer: every safetensors file of a saved folder, in memory or streamed, is written here
(docs/design.md, "On disk").

A :class:`WeightSource` gives a pruned model's tensors one segment at a time (the tensors outside the
decoder blocks, then each block): the model in memory (:class:`ModelWeights`) or the blocks a streamed run
kept on disk (:class:`optimum_maiht.streaming.StreamingStore`). The writer plans the shards from shapes
alone (``huggingface_hub.split_torch_state_dict_into_shards``, as transformers does) and writes each shard
tensor by tensor, so that no more than one segment and one tensor are held at once.

safetensors' public API writes a whole file from tensors held in memory (``save_file``, ``serialize_file``):
a 5 GB shard would need 5 GB. :func:`write_safetensors` writes the same format (an 8-byte length, the JSON
header, then each tensor's bytes) one tensor at a time instead.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from huggingface_hub import split_state_dict_into_shards_factory, split_torch_state_dict_into_shards
from huggingface_hub.serialization import StateDictSplit
from torch import Tensor, nn

from .model_utils import find_decoder_blocks

DTYPE_NAMES = {
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
"""The safetensors names of the dtypes written (the format's header spells them so)."""


class WeightSource(Protocol):
    """A pruned model's tensors, segment by segment: what the writer saves."""

    model: nn.Module
    """The model (its parameters may be on ``meta``: the writer plans from shapes)."""
    spill_folder: Path | None
    """Where the compact format's encoded blocks may wait on disk (``None``: they stay in memory)."""

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The real tensors of the state-dict entries ``names`` (all in one segment; the compact format)."""
        ...

    def saved_layout(self) -> dict[str, Tensor]:
        """What ``save_pretrained`` writes, in its order and its names (tensors, or ``meta`` ones whose
        values :meth:`saved_segment` gives)."""
        ...

    def saved_segment(self, index: int | None) -> dict[str, Tensor]:
        """The real tensors of :meth:`saved_layout` in segment ``index`` (a block; ``None``: outside)."""
        ...


class ModelWeights:
    """The tensors of a model held whole in memory, by their state-dict names (what the compact format
    reads; :class:`optimum_maiht.serialization.ModelInMemory` adds the layout ``save_pretrained``
    writes)."""

    spill_folder = None

    def __init__(self, model: nn.Module):
        self.model = model
        self._state = model.state_dict()

    def read(self, names: list[str]) -> dict[str, Tensor]:
        return {name: self._state[name] for name in names}


def segment_of(model: nn.Module) -> Callable[[str], int | None]:
    """``name -> block index`` for the state-dict names of ``model`` (``None``: outside the blocks)."""
    blocks_name, blocks = find_decoder_blocks(model)
    prefixes = [f"{blocks_name}.{i}." if blocks_name else f"{i}." for i in range(len(blocks))]

    def which(name: str) -> int | None:
        return next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), None)

    return which


def segments(names: Iterable[str], which: Callable[[str], int | None]) -> list[tuple[int | None, list[str]]]:
    """``names`` in order, cut into runs of the same segment (``None``: outside the blocks)."""
    runs: list[tuple[int | None, list[str]]] = []
    for name in names:
        index = which(name)
        if runs and runs[-1][0] == index:
            runs[-1][1].append(name)
        else:
            runs.append((index, [name]))
    return runs


def write_safetensors(
    path: Path, tensors: dict[str, Tensor], fetch: Callable[[str], Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file whose tensors have the shapes and dtypes of ``tensors`` (meta tensors
    will do), their values coming from ``fetch(name)`` one at a time, in the order given."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {tensor.dtype} cannot be written to safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
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


def plan_shards(planned: dict[str, Tensor], pattern: str, max_shard_size: str | int) -> StateDictSplit:
    """The shards ``save_pretrained`` cuts for ``planned`` (in writing order): with real tensors, by
    ``huggingface_hub.split_torch_state_dict_into_shards`` itself; with ``meta`` ones (a streamed run plans
    before any data exists) by the same rule, which that function cannot apply on ``meta``: tensors that
    share a storage (views of one tensor, as reverting fused experts makes them) go in the shard of the
    first of them and count once, at the storage's size."""
    if not any(t.device.type == "meta" for t in planned.values()):
        return split_torch_state_dict_into_shards(
            planned, filename_pattern=pattern, max_shard_size=max_shard_size
        )
    return split_state_dict_into_shards_factory(
        dict(planned),
        get_storage_size=lambda tensor: tensor.untyped_storage().nbytes(),
        get_storage_id=lambda tensor: tensor.untyped_storage()._cdata,
        filename_pattern=pattern,
        max_shard_size=max_shard_size,
    )


def write_shards(
    folder: Path,
    planned: dict[str, Tensor],
    fetch: Callable[[str], Tensor],
    *,
    pattern: str,
    max_shard_size: str | int,
    metadata: dict[str, str],
) -> StateDictSplit:
    """Cut ``planned`` (name -> tensor or meta tensor, in writing order) into shards as transformers does
    (:func:`plan_shards`) and write them, each tensor's value from ``fetch``; the split (files, index
    metadata) is returned."""
    split = plan_shards(planned, pattern, max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(folder / filename, {n: planned[n] for n in names}, fetch, metadata)
    return split


def write_index(path: Path, metadata: dict[str, Any], weight_map: dict[str, str]) -> None:
    """A shard index as transformers writes it (sorted keys, two-space indent, a final newline)."""
    text = json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    path.write_text(text)
