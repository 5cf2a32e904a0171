"""The compact sparse checkpoint format: kept values plus a packed bitmask per pruned layer.

A 50% sparse model saved dense is as big as the original. Here every pruned weight ``P`` (a parameter
name such as ``model.layers.0.mlp.up_proj.weight``) is stored as safetensors tensors that follow the
legacy compressed-tensors conventions:

- unstructured (``sparse-bitmask``): ``P.compressed`` (1-D, the kept values in row-major order),
  ``P.bitmask`` (uint8 ``[rows, ceil(cols / 8)]``, one bit per weight, little bit order, packed per row),
  ``P.row_offsets`` (int64 ``[rows]``, index in ``P.compressed`` of each row's first value) and
  ``P.shape`` (int64 ``[2]``), in the parameter's own layout;
- N:M (the ``sparse-24-bitmask`` idea): ``P.compressed`` (``[out, in * N / M]``, exactly N values per
  group of M consecutive input weights), ``P.bitmask`` (the positions kept in each group, packed as
  above) and ``P.shape`` (``[out, in]``), always in the (out, in) view of the linear map: a transformers
  ``Conv1D`` weight (stored as (in, out)) is transposed first and the index records ``"transposed": true``.

A weight is "kept" where it is not zero (NaN is kept), so the round trip restores every value exactly;
a negative zero (pruning by multiplying with a mask leaves ``-0.0``) comes back as ``+0.0``, equal under
``torch.equal`` and in every product and sum. Everything else (embeddings, norms, biases, dense layers)
is stored as usual, a tensor tied to another one is written once, and the shards are cut with
``huggingface_hub.split_torch_state_dict_into_shards`` like transformers does. The shards and their index
have their own names (``COMPRESSED_WEIGHTS_NAME``, ``COMPRESSED_INDEX_NAME``), and ``config.json`` names
an invalid ``transformers_weights`` file whose text says to use
:class:`optimum_maiht.MAIHTModelForCausalLM`: a plain ``AutoModelForCausalLM`` refuses the folder with
that message (older transformers: "no file named model.safetensors") instead of loading random weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .constants import CONFIG_ANNOTATION_KEY
from .model_utils import is_conv1d

logger = logging.getLogger(__name__)

MAIHT_FORMAT = "maiht-compressed"
FORMAT_VERSION = 1
COMPRESSED_WEIGHTS_PATTERN = "model-compressed{suffix}.safetensors"
COMPRESSED_WEIGHTS_NAME = COMPRESSED_WEIGHTS_PATTERN.format(suffix="")
COMPRESSED_INDEX_NAME = COMPRESSED_WEIGHTS_NAME + ".index.json"
LOADER_HINT = (
    f"this folder holds an optimum-maiht compressed sparse checkpoint ({COMPRESSED_INDEX_NAME}); "
    "load it with optimum_maiht.MAIHTModelForCausalLM.from_pretrained(...) (pip install optimum-maiht)"
)
"""Stored as ``transformers_weights`` in ``config.json``: transformers rejects the value (it is not a
``.safetensors`` name) with an error that quotes it, before it reads any weight."""

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SUFFIXES = {"bitmask": ("compressed", "bitmask", "row_offsets", "shape"),
             "n:m": ("compressed", "bitmask", "shape")}
_CORRUPTED = "the checkpoint is corrupted: save or download it again"


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint is incomplete, inconsistent or damaged."""


# --------------------------------------------------------------------------------------------------
# one tensor (numpy does the masking and bit packing: several times faster than torch on CPU)


def pack_bitmask(mask: Tensor) -> Tensor:
    """Pack a bool ``[rows, cols]`` mask into uint8 ``[rows, ceil(cols / 8)]``, little bit order."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1, bitorder="little"))


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_bitmask`: a bool ``[rows, cols]`` mask."""
    return torch.from_numpy(_unpack(packed, cols))


def _unpack(packed: Tensor, cols: int) -> np.ndarray:
    return np.unpackbits(packed.numpy(), axis=1, count=cols, bitorder="little").view(bool)


def _bits(tensor: Tensor) -> np.ndarray:
    """The tensor's raw bits as a numpy integer array (numpy has no bfloat16)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]).numpy()


def _kept(weight: Tensor) -> np.ndarray:
    """Where the weight is not zero (``+0.0`` and ``-0.0`` are zeros, NaN is kept), as numpy bools."""
    if not weight.is_floating_point():
        raise TypeError(f"only floating point weights can be compressed, got {weight.dtype}")
    return (weight != 0).numpy()


def compress_unstructured(weight: Tensor) -> dict[str, Tensor]:
    """Bitmask encoding of a 2-D weight in its own layout (suffix -> tensor)."""
    weight = weight.detach().cpu().contiguous()
    mask = _kept(weight)
    counts = mask.sum(1, dtype=np.int64)
    values = torch.from_numpy(_bits(weight)[mask]).view(weight.dtype)
    return {"compressed": values, "bitmask": torch.from_numpy(np.packbits(mask, axis=1, bitorder="little")),
            "row_offsets": torch.from_numpy(np.cumsum(counts) - counts),
            "shape": torch.tensor(weight.shape, dtype=torch.int64)}


def compress_nm(weight: Tensor, n: int, m: int, name: str = "weight") -> dict[str, Tensor]:
    """N:M encoding of an (out, in) weight: exactly N values per group of M and the packed positions.

    A group with fewer than N nonzeros is padded with its first zeros; a group with more is an error.
    """
    weight = weight.detach().cpu().contiguous()
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"{name}: input size {inp} is not a multiple of M={m}; "
                         "declare it unstructured (None) in sparse_layers")
    mask = _kept(weight).reshape(out, inp // m, m)
    counts = mask.sum(-1)
    worst = int(counts.max()) if counts.size else 0
    if worst > n:
        raise ValueError(f"{name} is not {n}:{m} sparse: a group of {m} input weights has {worst} nonzeros; "
                         "declare it unstructured (None) in sparse_layers or check the pruning pattern")
    if counts.size and int(counts.min()) < n:
        zeros = ~mask
        mask |= zeros & (np.cumsum(zeros, -1) <= (n - counts)[..., None])
    mask = mask.reshape(out, inp)
    values = torch.from_numpy(_bits(weight)[mask].reshape(out, inp // m * n)).view(weight.dtype)
    return {"compressed": values, "bitmask": torch.from_numpy(np.packbits(mask, axis=1, bitorder="little")),
            "shape": torch.tensor([out, inp], dtype=torch.int64)}


def decompress(name: str, info: dict[str, Any], tensors: dict[str, Tensor]) -> Tensor:
    """Rebuild the dense weight ``name`` from its stored tensors, checking that they fit together."""
    shape = tensors["shape"].tolist()
    values, packed = tensors["compressed"], tensors["bitmask"]
    if (len(shape) != 2 or min(shape) < 0 or packed.dtype != torch.uint8
            or tuple(packed.shape) != (shape[0], -(-shape[1] // 8))):
        raise CompressedCheckpointError(f"{name}: bitmask of shape {tuple(packed.shape)} does not match the "
                                        f"weight shape {shape}; {_CORRUPTED}")
    if str(values.dtype).removeprefix("torch.") != info.get("dtype"):
        raise CompressedCheckpointError(f"{name}: stored values are {values.dtype}, the index says "
                                        f"{info.get('dtype')}; {_CORRUPTED}")
    mask = _unpack(packed, shape[1])
    if info["encoding"] == "n:m":
        n, m = info["n"], info["m"]
        fits = shape[1] % m == 0 and tuple(values.shape) == (shape[0], shape[1] // m * n)
        if not fits or not (mask.reshape(shape[0], -1, m).sum(-1) == n).all():
            raise CompressedCheckpointError(f"{name}: the stored {n}:{m} positions or values (shape "
                                            f"{tuple(values.shape)}) do not fit the shape {shape}; "
                                            f"{_CORRUPTED}")
    else:
        counts = mask.sum(1, dtype=np.int64)
        kept = int(counts.sum())
        starts = np.cumsum(counts) - counts
        if values.dim() != 1 or values.numel() != kept or not np.array_equal(tensors["row_offsets"], starts):
            raise CompressedCheckpointError(f"{name}: {values.numel()} stored values and the row offsets do "
                                            f"not match the bitmask ({kept} kept weights); {_CORRUPTED}")
    bits = _bits(values)
    dense = np.zeros(shape, dtype=bits.dtype)
    dense[mask] = bits.reshape(-1)
    weight = torch.from_numpy(dense).view(values.dtype)
    return weight.t().contiguous() if info.get("transposed") else weight


# --------------------------------------------------------------------------------------------------
# whole model


def _tied_aliases(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, str]:
    """``{alias: kept name}`` for state-dict entries that are the same tensor (tied weights): written once.

    Like transformers, the name kept is the tie's source (``model.all_tied_weights_keys`` maps target ->
    source); without that information, the first name in sorted order.
    """
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel():
            key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                   tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            groups.setdefault(key, []).append(name)
    aliases = {}
    for names in groups.values():
        if len(names) > 1:
            keep = ([n for n in sorted(names) if n not in declared] or sorted(names))[0]
            aliases.update({n: keep for n in names if n != keep})
    return aliases


def _is_conv1d_weight(model: nn.Module, name: str) -> bool:
    """Whether the weight ``name`` belongs to a ``Conv1D`` (stored (in, out): transposed for N:M)."""
    try:
        module = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
    except AttributeError:
        return False
    return is_conv1d(module)


def _check_pattern(name: str, pattern: Any) -> tuple[int, int]:
    valid = (isinstance(pattern, (tuple, list)) and len(pattern) == 2
             and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
             and 0 < pattern[0] < pattern[1])
    if not valid:
        raise ValueError(f"sparse_layers[{name!r}] must be (N, M) with 0 < N < M, e.g. (2, 4), or None for "
                         f"unstructured; got {pattern!r}")
    return int(pattern[0]), int(pattern[1])


def save_compressed(
    model: nn.Module,
    folder: str | Path,
    sparse_layers: dict[str, tuple[int, int] | None],
    max_shard_size: int | str = "5GB",
) -> None:
    """Write ``model`` into ``folder`` in the compact format: weight shards + index, ``config.json`` and
    ``generation_config.json`` (tokenizer and reports are up to the caller).

    ``sparse_layers`` maps each pruned weight's parameter name to its ``(N, M)`` pattern, or ``None`` for
    unstructured sparsity; every other tensor is stored as it is. ``config.json`` is the model's config plus
    a ``transformers_weights`` entry that makes a plain ``AutoModelForCausalLM`` refuse the folder with a
    message naming :class:`optimum_maiht.MAIHTModelForCausalLM`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    if getattr(model, "config", None) is None:
        raise TypeError(f"save_compressed needs a transformers model (with .config), "
                        f"got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clashing = sorted(p.name for p in folder.iterdir() if p.name.startswith(("model.safetensors", "model-")))
    if clashing:
        raise FileExistsError(f"{folder} already holds model weights {clashing}; save into an empty folder")
    state_dict = model.state_dict()
    offloaded = [name for name, tensor in state_dict.items() if tensor.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{len(offloaded)} weights (e.g. {offloaded[0]}) are offloaded (meta device); load "
                         "the whole model into memory (no device_map offloading) before saving it compressed")
    aliases = _tied_aliases(model, state_dict)
    pending: dict[str, tuple[int, int] | None] = {}
    for name, pattern in sparse_layers.items():  # a tied weight is stored under the name that is kept
        pending[aliases.get(name, name)] = pattern
    unknown = sorted(set(pending) - set(state_dict))
    if unknown:
        raise ValueError(f"sparse_layers names {unknown[:5]}, which are not parameters of the model; give "
                         "weight names such as 'model.layers.0.mlp.up_proj.weight'")

    layers: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    written: set[tuple] = set()
    for name, tensor in state_dict.items():
        if name in aliases:
            continue
        if name not in pending:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            # safetensors refuses tensors that share memory: copy views of a storage already written
            shared = storage in written and tensor.numel() > 0
            tensors[name] = tensor.detach().clone() if shared else tensor.detach()
            written.add(storage)
            continue
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise ValueError(f"sparse_layers[{name!r}]: only 2-D floating point weights can be compressed, "
                             f"got shape {tuple(tensor.shape)} and dtype {tensor.dtype}")
        if pending[name] is None:
            parts, info = compress_unstructured(tensor), {"encoding": "bitmask"}
        else:
            n, m = _check_pattern(name, pending[name])
            transposed = _is_conv1d_weight(model, name)
            parts = compress_nm(tensor.t() if transposed else tensor, n, m, name)
            info = {"encoding": "n:m", "n": n, "m": m, "transposed": transposed}
        layers[name] = {**info, "dtype": str(tensor.dtype).removeprefix("torch.")}
        tensors.update({f"{name}.{suffix}": part for suffix, part in parts.items()})

    split = split_torch_state_dict_into_shards(tensors, filename_pattern=COMPRESSED_WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    metadata = {"format": "pt", "maiht_format": MAIHT_FORMAT, "maiht_format_version": str(FORMAT_VERSION)}
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / filename), metadata=metadata)
    index = {
        "metadata": {**split.metadata, "maiht_format": MAIHT_FORMAT, "maiht_format_version": FORMAT_VERSION,
                     "layers": layers, "tied": aliases},
        "weight_map": split.tensor_to_filename,
    }
    (folder / COMPRESSED_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    model.config.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["transformers_weights"] = LOADER_HINT
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    logger.info("saved %d compressed layers in %d shard(s) to %s", len(layers),
                len(split.filename_to_tensors), folder)


# --------------------------------------------------------------------------------------------------
# reading


def is_compressed_config(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes a compressed checkpoint."""
    annotation = config.get(CONFIG_ANNOTATION_KEY)
    return config.get("transformers_weights") == LOADER_HINT or (
        isinstance(annotation, dict) and annotation.get("format") == "compressed")


def is_compressed_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a compressed checkpoint (its index, or a ``config.json`` that says so)."""
    folder = Path(folder)
    if (folder / COMPRESSED_INDEX_NAME).is_file():
        return True
    try:
        return is_compressed_config(json.loads((folder / "config.json").read_text()))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_index(folder: str | Path) -> dict[str, Any]:
    """The compressed checkpoint's index, checked for format and version."""
    path = Path(folder) / COMPRESSED_INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {COMPRESSED_INDEX_NAME}: it is not a complete "
                                "optimum-maiht compressed checkpoint; copy or download the whole folder")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CompressedCheckpointError(f"{path} is not valid JSON ({err}); {_CORRUPTED}") from None
    metadata = index.get("metadata") if isinstance(index, dict) else None
    if not isinstance(metadata, dict) or not isinstance(index.get("weight_map"), dict):
        raise CompressedCheckpointError(f"{path} lacks 'metadata' or 'weight_map'; {_CORRUPTED}")
    if metadata.get("maiht_format") != MAIHT_FORMAT or not isinstance(metadata.get("layers"), dict):
        raise CompressedCheckpointError(f"{path} is not an optimum-maiht compressed index "
                                        f"(maiht_format={metadata.get('maiht_format')!r}); {_CORRUPTED}")
    version = metadata.get("maiht_format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CompressedCheckpointError(f"{path} has maiht_format_version={version!r}; this optimum-maiht "
                                        f"reads up to {FORMAT_VERSION}: pip install -U optimum-maiht")
    return index


def load_compressed_state_dict(folder: str | Path) -> dict[str, Tensor]:
    """Read a compressed checkpoint back into dense CPU tensors, exactly as saved (``-0.0`` as ``+0.0``).

    Tied aliases are included (the same tensor under both names), so ``model.load_state_dict(sd)`` works
    strictly.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = read_index(folder)
    metadata, weight_map = index["metadata"], index["weight_map"]
    stored: dict[str, Tensor] = {}
    for filename in sorted(set(weight_map.values())):
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing although {COMPRESSED_INDEX_NAME} lists it: the "
                                    "compressed checkpoint is incomplete; copy or download the whole folder")
        expected = {n for n, f in weight_map.items() if f == filename}
        try:
            with safe_open(str(path), framework="pt") as shard:
                if (shard.metadata() or {}).get("maiht_format") != MAIHT_FORMAT:
                    raise CompressedCheckpointError(f"{path} is not an optimum-maiht compressed shard; "
                                                    f"{_CORRUPTED}")
                absent = sorted(expected - set(shard.keys()))
                if absent:
                    raise CompressedCheckpointError(f"{path} lacks tensors {absent[:5]} listed in "
                                                    f"{COMPRESSED_INDEX_NAME}; {_CORRUPTED}")
                stored.update({n: shard.get_tensor(n) for n in expected})
        except SafetensorError as err:
            raise CompressedCheckpointError(f"{path} cannot be read ({err}): the file is damaged or "
                                            f"truncated; {_CORRUPTED}") from None

    state_dict: dict[str, Tensor] = {}
    for name, info in metadata["layers"].items():
        suffixes = _SUFFIXES.get(info.get("encoding"))
        if suffixes is None:
            raise CompressedCheckpointError(f"{name}: unknown encoding {info.get('encoding')!r}; "
                                            f"{_CORRUPTED}")
        missing = [s for s in suffixes if f"{name}.{s}" not in stored]
        if missing:
            raise CompressedCheckpointError(f"{name}: stored tensors {missing} are missing; {_CORRUPTED}")
        state_dict[name] = decompress(name, info, {s: stored.pop(f"{name}.{s}") for s in suffixes})
    state_dict.update(stored)
    for alias, source in metadata.get("tied", {}).items():
        if source not in state_dict:
            raise CompressedCheckpointError(f"{alias} is tied to {source}, which is not stored; {_CORRUPTED}")
        state_dict[alias] = state_dict[source]
    return state_dict
