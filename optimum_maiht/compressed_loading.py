"""Reading the compact format: validate everything, then allocate (docs/design.md, "On disk" and "Files
from elsewhere").

A compressed checkpoint comes from elsewhere, so its index and shard headers are checked against the
model's own parameters (built on the ``meta`` device from ``config.json``) before one dense weight is
built: every name, shape and dtype, every shard path (inside the folder), the tied aliases (only ties the
model itself declares), the format version and each layer's entry (booleans that are booleans, a known
encoding, float values). Then each pruned weight's bitmask is checked against its stored values (one
value per set bit, N per group of M) and only then decompressed, into exactly the parameter's size.
:func:`check_against_model` is shared by :func:`load_compressed_state_dict` and the transformers loader
(:mod:`optimum_maiht.quantizer`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .compressed import (
    COMPRESSED_INDEX_NAME,
    CORRUPTED_HINT,
    FORMAT_VERSION,
    HINT_START,
    MAIHT_FORMAT,
    QUANT_METHOD,
    CompressedCheckpointError,
    is_conv1d_weight,
)
from .configuration import MAX_GROUP
from .constants import CONFIG_ANNOTATION_KEY
from .files import UnsafeFileError, read_json, read_safetensors_header, resolve_inside
from .sparse_encoding import raw_bits, unpack_bitmask

_KNOWN_VERSIONS = (1, FORMAT_VERSION)
_FLOAT_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_PARTS = {
    "bitmask": ("compressed", "bitmask", "row_offsets", "shape"),
    "n:m": ("compressed", "bitmask", "shape"),
}
_ENTRY_KEYS = {"bitmask": {"encoding", "dtype"}, "n:m": {"encoding", "dtype", "n", "m", "transposed"}}
_FLOAT_ST = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_CHECK_BITS = 2**24
"""Bits unpacked at once when a bitmask is checked (16 MB of booleans)."""


@dataclass(frozen=True)
class LayerEntry:
    """One ``layers`` entry of the index, checked: how the pruned weight is encoded."""

    encoding: str
    dtype: str
    n: int = 0
    m: int = 0
    transposed: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        """The suffixes of its stored tensors (``P.compressed``, ``P.bitmask``, ...)."""
        return _PARTS[self.encoding]

    def view(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape it is stored in, for a parameter of ``shape``: (out, in) for N:M."""
        return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else tuple(shape)


@dataclass(frozen=True)
class CompressedIndex:
    """A compressed checkpoint's index, checked for format and types; every shard resolved in ``folder``."""

    folder: Path
    version: int
    layers: dict[str, LayerEntry]
    tied: dict[str, str]
    weight_map: dict[str, Path]

    @property
    def path(self) -> Path:
        return self.folder / COMPRESSED_INDEX_NAME

    def error(self, text: str) -> CompressedCheckpointError:
        return CompressedCheckpointError(f"{self.path}: {text}; {CORRUPTED_HINT}")


def read_index(folder: str | Path) -> CompressedIndex:
    """The index of a compressed checkpoint, checked before any shard is opened: the format and a known
    version, each ``layers`` entry, ``tied`` names, and every shard a plain file name inside ``folder``."""
    folder = Path(folder)
    path = folder / COMPRESSED_INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {COMPRESSED_INDEX_NAME}: it is not a complete optimum-maiht compressed "
            "checkpoint; copy or download the whole folder"
        )
    index = read_json(path, what=COMPRESSED_INDEX_NAME)
    metadata, weight_map = index.get("metadata"), index.get("weight_map")
    if not isinstance(metadata, dict) or not isinstance(weight_map, dict):
        raise CompressedCheckpointError(f"{path} lacks 'metadata' or 'weight_map'; {CORRUPTED_HINT}")
    if metadata.get("maiht_format") != MAIHT_FORMAT or not isinstance(metadata.get("layers"), dict):
        raise CompressedCheckpointError(
            f"{path} is not an optimum-maiht compressed index "
            f"(maiht_format={metadata.get('maiht_format')!r}); {CORRUPTED_HINT}"
        )
    version = _check_version(path, metadata.get("maiht_format_version"))
    layers = {name: layer_entry(name, info) for name, info in metadata["layers"].items()}
    tied = metadata.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(v, str) for v in tied.values()):
        raise CompressedCheckpointError(f"{path}: 'tied' must map names to names; {CORRUPTED_HINT}")
    what = f"shard named in {COMPRESSED_INDEX_NAME}"
    files: dict[str, Path] = {}
    for file in weight_map.values():
        if not isinstance(file, str) or file not in files:
            files[file] = resolve_inside(folder, file, what=what)
            if files[file].parent != folder:  # ours are plain file names
                raise CompressedCheckpointError(
                    f"{path}: shard {file!r} is not in the folder itself; {CORRUPTED_HINT}"
                )
    return CompressedIndex(folder, version, layers, tied, {n: files[f] for n, f in weight_map.items()})


def _check_version(path: Path, version: Any) -> int:
    """``maiht_format_version``: an integer this code knows (a newer one asks for an upgrade)."""
    if type(version) is int and version > FORMAT_VERSION:
        raise CompressedCheckpointError(
            f"{path} has maiht_format_version={version!r}; this optimum-maiht reads up to "
            f"{FORMAT_VERSION}: pip install -U optimum-maiht"
        )
    if type(version) is not int or version not in _KNOWN_VERSIONS:
        raise CompressedCheckpointError(
            f"{path}: maiht_format_version={version!r} is not a version of the format "
            f"({', '.join(map(str, _KNOWN_VERSIONS))}); {CORRUPTED_HINT}"
        )
    return version


def layer_entry(name: str, info: Any) -> LayerEntry:
    """One ``layers`` entry: a known encoding with exactly its keys, a float dtype name, for N:M integers
    ``0 < n < m`` and a boolean ``transposed``."""
    if not isinstance(info, dict) or info.get("encoding") not in _PARTS:
        encoding = info.get("encoding") if isinstance(info, dict) else info
        raise CompressedCheckpointError(f"{name}: unknown encoding {encoding!r}; {CORRUPTED_HINT}")
    keys = set(info)
    if keys != _ENTRY_KEYS[info["encoding"]]:
        raise CompressedCheckpointError(
            f"{name}: a {info['encoding']!r} entry has the keys {sorted(_ENTRY_KEYS[info['encoding']])}, got "
            f"{sorted(keys)}; {CORRUPTED_HINT}"
        )
    if info["dtype"] not in _FLOAT_NAMES:
        raise CompressedCheckpointError(
            f"{name}: stored values must be floating point ({', '.join(_FLOAT_NAMES)}), the index says "
            f"{info['dtype']!r}; {CORRUPTED_HINT}"
        )
    if info["encoding"] == "bitmask":
        return LayerEntry("bitmask", info["dtype"])
    n, m, transposed = info["n"], info["m"], info["transposed"]
    if not (type(n) is int and type(m) is int and 0 < n < m <= MAX_GROUP):
        raise CompressedCheckpointError(f"{name}: invalid N:M pattern n={n!r}, m={m!r}; {CORRUPTED_HINT}")
    if type(transposed) is not bool:
        raise CompressedCheckpointError(
            f"{name}: 'transposed' must be true or false, got {transposed!r}; {CORRUPTED_HINT}"
        )
    return LayerEntry("n:m", info["dtype"], n, m, transposed)


# --------------------------------------------------------------------------------------------------
# the index and the shard headers against the model


def check_against_model(index: CompressedIndex, model: nn.Module) -> None:
    """Check the index and every shard header against ``model``'s parameters (on ``meta``: only names,
    shapes and dtypes are read), then each pruned weight's bitmask against its values; raises
    :class:`CompressedCheckpointError` before anything as large as a weight is allocated."""
    params = model.state_dict()
    _check_layers(index, model, params)
    _check_tied(index, model, params)
    _check_coverage(index, model, params)
    shapes = _check_headers(index, params)
    for name, entry in index.layers.items():
        parts = read_parts(index, name, ("shape", "bitmask", "row_offsets"))
        check_parts(name, entry, parts, tuple(params[name].shape), shapes[f"{name}.compressed"])


def _check_layers(index: CompressedIndex, model: nn.Module, params: dict[str, Tensor]) -> None:
    for name, entry in index.layers.items():
        param = params.get(name)
        if param is None or param.dim() not in (2, 3) or not param.is_floating_point():
            found = "no such weight" if param is None else f"a {param.dim()}-D {param.dtype} tensor"
            raise index.error(
                f"layers names {name!r}, which is not a 2-D or 3-D floating point weight of the "
                f"{type(model).__name__} of config.json ({found})"
            )
        if param.dim() == 3 and index.version < 2:
            raise index.error(
                f"{name} is a 3-D weight, which maiht_format_version {index.version} cannot hold"
            )
        if entry.encoding == "n:m":
            if param.dim() == 2 and entry.transposed != is_conv1d_weight(model, name):
                raise index.error(
                    f"{name}: 'transposed' is {str(entry.transposed).lower()} but the layer stores its "
                    f"weight as {'(in, out)' if not entry.transposed else '(out, in)'}"
                )
            if entry.view(tuple(param.shape))[-1] % entry.m:
                raise index.error(
                    f"{name}: input size {entry.view(tuple(param.shape))[-1]} is not a multiple of "
                    f"M={entry.m}"
                )


def _check_tied(index: CompressedIndex, model: nn.Module, params: dict[str, Tensor]) -> None:
    """A tied alias is a weight the model itself ties to its source (``all_tied_weights_keys``, either
    way round), of the same shape, not stored, whose source is stored."""
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for alias, source in index.tied.items():
        allowed = declared.get(alias) == source or declared.get(source) == alias
        if not allowed or alias not in params or source not in params:
            raise index.error(f"'tied' makes {alias} a copy of {source}, which the model does not tie")
        if params[alias].shape != params[source].shape:
            raise index.error(f"'tied' makes {alias} a copy of {source}, of another shape")
        if alias in index.weight_map or alias in index.layers:
            raise index.error(f"{alias} is both stored and tied to {source}")
        if source not in index.weight_map and source not in index.layers:
            raise CompressedCheckpointError(
                f"{alias} is tied to {source}, which is not stored; {CORRUPTED_HINT}"
            )


def _check_coverage(index: CompressedIndex, model: nn.Module, params: dict[str, Tensor]) -> None:
    """Every stored tensor is a weight of the model or a part of a pruned one, and every weight of the
    model is stored, pruned or tied."""
    parts = {f"{name}.{suffix}" for name, entry in index.layers.items() for suffix in entry.parts}
    unexpected = sorted(n for n in index.weight_map if n not in params and n not in parts)
    if unexpected:
        raise index.error(f"stores tensors {unexpected[:5]} that are no weights of the model in config.json")
    clash = sorted(n for n in index.weight_map if n in index.layers)
    missing = sorted(parts - set(index.weight_map))
    if clash or missing:
        raise index.error(
            f"pruned weights {clash[:5]} are stored dense too"
            if clash
            else f"stored tensors {missing[:5]} of pruned weights are missing"
        )
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    provided = set(index.weight_map) | set(index.layers)
    provided |= {alias for alias in index.tied} | {k for k, v in declared.items() if v in provided}
    absent = sorted(set(params) - provided)
    if absent:
        raise index.error(f"lacks the weights {absent[:5]} of the model in config.json")


def _check_headers(index: CompressedIndex, params: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    """Each shard is ours and holds what the index says, with the dtypes and shapes the model implies;
    the stored shape of every tensor."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in index.weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing although {COMPRESSED_INDEX_NAME} lists it: the compressed checkpoint is "
                "incomplete; copy or download the whole folder"
            )
        header = read_safetensors_header(file)
        if (header.get("__metadata__") or {}).get("maiht_format") != MAIHT_FORMAT:
            raise CompressedCheckpointError(
                f"{file} is not an optimum-maiht compressed shard; {CORRUPTED_HINT}"
            )
        absent = sorted(set(names) - set(header))
        if absent:
            raise CompressedCheckpointError(
                f"{file} lacks tensors {absent[:5]} listed in {COMPRESSED_INDEX_NAME}; {CORRUPTED_HINT}"
            )
        for name in names:
            dtype, shape = header[name]["dtype"], header[name]["shape"]
            if not _fits(name, dtype, shape, index, params):
                raise CompressedCheckpointError(
                    f"{file}: {name} is stored as {dtype} {shape}, which does not fit "
                    f"{_describe(name, index, params)}; {CORRUPTED_HINT}"
                )
            shapes[name] = tuple(shape)
    return shapes


def _fits(name: str, dtype: str, shape: list[int], index: CompressedIndex, params: dict[str, Tensor]) -> bool:
    """Whether a stored tensor's header (dtype, shape) is what the model implies for it."""
    if name in params:
        return shape == list(params[name].shape) and _same_kind(dtype, params[name].dtype)
    base, _, suffix = name.rpartition(".")
    entry = index.layers[base]
    view = entry.view(tuple(params[base].shape))
    rows, cols = math.prod(view[:-1]), view[-1]
    if suffix == "shape":
        return dtype == "I64" and shape == [len(view)]
    if suffix == "bitmask":
        return dtype == "U8" and shape == [rows, -(-cols // 8)]
    if suffix == "row_offsets":
        return dtype == "I64" and shape == [rows]
    if dtype != _FLOAT_NAMES[entry.dtype]:
        return False
    if entry.encoding == "bitmask":
        return len(shape) == 1 and shape[0] <= rows * cols
    return shape == [rows, cols // entry.m * entry.n]


def _same_kind(stored: str, dtype: torch.dtype) -> bool:
    """A float parameter is stored as floats, an integer or boolean one as integers or booleans (transformers
    would cast ``int32`` or ``bool`` values into a float weight without a word)."""
    if dtype.is_floating_point:
        return stored in _FLOAT_ST
    return (stored == "BOOL") == (dtype == torch.bool) and stored not in _FLOAT_ST


def _describe(name: str, index: CompressedIndex, params: dict[str, Tensor]) -> str:
    base, _, suffix = name.rpartition(".")
    if name in params:
        return f"the model's {params[name].dtype} weight of shape {list(params[name].shape)}"
    entry = index.layers[base]
    return (
        f"the {suffix!r} part of the {entry.encoding} encoding of {base} ({entry.dtype}, weight shape "
        f"{list(params[base].shape)})"
    )


# --------------------------------------------------------------------------------------------------
# one pruned weight


def check_parts(
    name: str, entry: LayerEntry, parts: dict[str, Tensor], shape: tuple[int, ...], values: tuple[int, ...]
) -> None:
    """The stored ``shape`` is the parameter's, and the bitmask fits the stored values (of shape
    ``values``): one per set bit at the row offsets (unstructured), exactly N set bits per group of M and
    N values per group (N:M)."""
    view = entry.view(shape)
    if parts["shape"].tolist() != list(view):
        raise CompressedCheckpointError(
            f"{name}: stored shape {parts['shape'].tolist()} is not the model's {list(view)}; "
            f"{CORRUPTED_HINT}"
        )
    rows, cols = math.prod(view[:-1]), view[-1]
    if entry.encoding == "n:m":
        fits = values == (rows, cols // entry.m * entry.n)
        for mask in _mask_chunks(parts["bitmask"], cols) if fits else ():
            fits = fits and bool((mask.reshape(mask.shape[0], -1, entry.m).sum(-1) == entry.n).all())
        if not fits:
            raise CompressedCheckpointError(
                f"{name}: the stored {entry.n}:{entry.m} positions or values (shape {list(values)}) do not "
                "fit "
                f"the shape {list(view)}; {CORRUPTED_HINT}"
            )
        return
    counts = np.concatenate([mask.sum(1, dtype=np.int64) for mask in _mask_chunks(parts["bitmask"], cols)])
    kept = int(counts.sum())
    starts = np.cumsum(counts) - counts
    if values != (kept,) or not np.array_equal(parts["row_offsets"].numpy(), starts[:rows]):
        raise CompressedCheckpointError(
            f"{name}: {math.prod(values)} stored values and the row offsets do not match the bitmask "
            f"({kept} kept weights); {CORRUPTED_HINT}"
        )


def _mask_chunks(packed: Tensor, cols: int) -> Iterator[np.ndarray]:
    """The bitmask unpacked a few rows at a time (never more than :data:`_CHECK_BITS` booleans)."""
    step = max(1, _CHECK_BITS // max(cols, 1))
    if packed.shape[0] == 0:
        yield np.zeros((0, cols), dtype=bool)
    for start in range(0, packed.shape[0], step):
        yield unpack_bitmask(packed[start : start + step], cols).numpy()


def decompress(name: str, entry: LayerEntry, parts: dict[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """The dense weight of the parameter's ``shape`` from its stored parts, checked first (one pass over
    the bitmask more; the dense weight is the only allocation of its size)."""
    values = parts["compressed"]
    if str(values.dtype).removeprefix("torch.") != entry.dtype:
        raise CompressedCheckpointError(
            f"{name}: stored values are {values.dtype}, the index says {entry.dtype}; {CORRUPTED_HINT}"
        )
    check_parts(name, entry, parts, shape, tuple(values.shape))
    view = entry.view(shape)
    mask = unpack_bitmask(parts["bitmask"], view[-1]).numpy()
    bits = raw_bits(values)
    dense = np.zeros((math.prod(view[:-1]), view[-1]), dtype=bits.dtype)
    dense[mask] = bits.reshape(-1)
    weight = torch.from_numpy(dense).view(values.dtype).reshape(view)
    return weight.transpose(-1, -2).contiguous() if entry.transposed else weight


def read_parts(index: CompressedIndex, name: str, suffixes: tuple[str, ...]) -> dict[str, Tensor]:
    """Stored tensors of one pruned weight (``suffix -> tensor``), those of ``suffixes`` it has."""
    from safetensors import SafetensorError, safe_open

    entry = index.layers[name]
    parts = {}
    for suffix in (s for s in suffixes if s in entry.parts):
        full = f"{name}.{suffix}"
        try:
            with safe_open(str(index.weight_map[full]), framework="pt") as shard:
                parts[suffix] = shard.get_tensor(full)
        except SafetensorError as err:
            raise CompressedCheckpointError(
                f"{index.weight_map[full]} cannot be read ({err}): the file is damaged or truncated; "
                f"{CORRUPTED_HINT}"
            ) from None
    return parts


# --------------------------------------------------------------------------------------------------
# recognising a compressed folder


def is_compressed_config(config: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes a compressed checkpoint (older releases wrote the marker
    without ``quantization_config``)."""
    annotation = config.get(CONFIG_ANNOTATION_KEY)
    quantization = config.get("quantization_config")
    marker = config.get("transformers_weights")
    return (
        (isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD)
        or (isinstance(marker, str) and marker.startswith(HINT_START))
        or (isinstance(annotation, dict) and annotation.get("format") == "compressed")
    )


def is_compressed_folder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a compressed checkpoint (its index, or a ``config.json`` that says so); a
    ``config.json`` that cannot be read is left to the loader to report."""
    folder = Path(folder)
    if (folder / COMPRESSED_INDEX_NAME).is_file():
        return True
    try:
        return is_compressed_config(read_json(folder / "config.json", what="config.json"))
    except (OSError, UnsafeFileError):
        return False


# --------------------------------------------------------------------------------------------------
# the whole checkpoint, without transformers' loader


def meta_model(folder: str | Path) -> nn.Module:
    """The model ``config.json`` describes, built on the ``meta`` device (names, shapes, dtypes, ties)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    read_json(Path(folder) / "config.json", what="config.json")  # bounded, before transformers parses it
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=config.dtype)


def load_compressed_state_dict(folder: str | Path, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Read a compressed checkpoint back into dense CPU tensors, exactly as saved (``-0.0`` as ``+0.0``),
    after checking it against ``model`` (default: the model of its ``config.json``, on ``meta``).

    Tied aliases are included (the same tensor under both names), so ``model.load_state_dict(sd)`` works
    strictly.
    """
    index = read_index(folder)
    model = meta_model(folder) if model is None else model
    check_against_model(index, model)
    params = model.state_dict()
    state_dict: dict[str, Tensor] = {}
    for name, entry in index.layers.items():
        state_dict[name] = decompress(
            name, entry, read_parts(index, name, entry.parts), tuple(params[name].shape)
        )
    state_dict.update(_read_plain(index, {n for n in index.weight_map if n in params}))
    for alias, source in index.tied.items():
        state_dict[alias] = state_dict[source]
    return state_dict


def _read_plain(index: CompressedIndex, names: set[str]) -> dict[str, Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted({index.weight_map[n] for n in names}):
        with safe_open(str(file), framework="pt") as shard:
            tensors.update({n: shard.get_tensor(n) for n in sorted(names) if index.weight_map[n] == file})
    return tensors
