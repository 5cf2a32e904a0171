"""The compact sparse checkpoint format: kept values plus a packed bitmask per pruned weight (docs/design.md,
"On disk").

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

Fused mixture-of-experts weights (transformers 5 stores the routed experts as one 3-D parameter
``(E, a, b)``, each slice ``P[e]`` one expert's matrix) are stored as E stacked matrices, with the same
tensors and the same index fields: ``P.shape`` has three entries and the rows of ``P.bitmask`` (and of
``P.compressed`` and ``P.row_offsets``) run over the E * a rows of all experts in order. Unstructured:
in the parameter's own layout (``P.shape`` = ``[E, a, b]``). N:M: along each expert's input, in the
(out, in) view of every slice (``P.shape`` = ``[E, out, in]``); slices stored (in, out), like GPT-OSS's
(``x @ P[e]``), are transposed first and recorded ``"transposed": true``. Such a checkpoint is written
with ``maiht_format_version`` 2, so that an older optimum-maiht asks for an upgrade instead of calling it
corrupted; one without 3-D weights is still written as version 1, byte for byte as before.

A weight is "kept" where it is not zero (NaN is kept), so the round trip restores every value exactly;
a negative zero (pruning by multiplying with a mask leaves ``-0.0``) comes back as ``+0.0``, equal under
``torch.equal`` and in every product and sum. Everything else (embeddings, norms, biases, dense layers)
is stored as usual, a tensor tied to another one is written once, and the shards are cut with
``huggingface_hub.split_torch_state_dict_into_shards`` like transformers does. The shards and their index
have their own names (``COMPRESSED_WEIGHTS_NAME``, ``COMPRESSED_INDEX_NAME``). ``config.json`` carries a
``quantization_config`` of our own method, which :mod:`optimum_maiht.quantizer` registers with
transformers (``AutoModelForCausalLM`` then loads the folder), and an invalid ``transformers_weights``
file whose text names this package: without it, transformers refuses the folder with that message instead
of loading random weights. Reading (checked against the model first): :mod:`optimum_maiht.compressed_loading`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .model_utils import is_conv1d
from .sparse_encoding import compress_nm, compress_unstructured
from .writer import ModelWeights, WeightSource, segment_of, segments, write_shards
from .writer import write_index as write_index_file

if TYPE_CHECKING:
    from huggingface_hub.serialization import StateDictSplit

logger = logging.getLogger(__name__)

MAIHT_FORMAT = "maiht-compressed"
FORMAT_VERSION = 2
"""The newest ``maiht_format_version`` this code reads. A checkpoint is written with the lowest version
that describes it: 1 when every compressed weight is 2-D (readable by every release), 2 when it holds
fused expert weights (3-D)."""
_FIRST_VERSION = 1
_EXPERTS_VERSION = 2
COMPRESSED_WEIGHTS_PATTERN = "model-compressed{suffix}.safetensors"
COMPRESSED_WEIGHTS_NAME = COMPRESSED_WEIGHTS_PATTERN.format(suffix="")
COMPRESSED_INDEX_NAME = COMPRESSED_WEIGHTS_NAME + ".index.json"
HINT_START = "this folder holds an optimum-maiht compressed sparse checkpoint"
LOADER_HINT = (
    f"{HINT_START} ({COMPRESSED_INDEX_NAME}): pip install optimum-maiht and import optimum_maiht before "
    "transformers' AutoModelForCausalLM.from_pretrained(...), or load it with "
    "optimum_maiht.MAIHTModelForCausalLM.from_pretrained(...)"
)
"""Stored as ``transformers_weights`` in ``config.json``. With optimum-maiht imported, its quantizer
(:mod:`optimum_maiht.quantizer`) points transformers at the index instead; without it, transformers skips
the unknown ``quantization_config`` and rejects this value (it is not a ``.safetensors`` name) with an
error that quotes it, before it reads any weight."""
QUANT_METHOD = "maiht"
"""``quantization_config.quant_method`` of a compressed folder: transformers' registry key of our format."""

CORRUPTED_HINT = "the checkpoint is corrupted: save or download it again"


class CompressedCheckpointError(ValueError):
    """A compressed checkpoint is incomplete, inconsistent or damaged."""


# --------------------------------------------------------------------------------------------------
# writing a whole model


@dataclass(frozen=True)
class _Target:
    """How one pruned weight is encoded: its N:M pattern (``None``: unstructured) and, for N:M, whether
    its stored layout is (in, out) and is transposed to the (out, in) view first."""

    pattern: tuple[int, int] | None
    transposed: bool = False


def save_compressed(
    model: nn.Module,
    folder: str | Path,
    sparse_layers: Mapping[str, tuple[int, int] | None],
    max_shard_size: int | str = "5GB",
    *,
    transposed: Collection[str] = (),
) -> None:
    """Write ``model`` into ``folder`` in the compact format: weight shards + index, ``config.json`` and
    ``generation_config.json`` (tokenizer and reports are up to the caller).

    ``sparse_layers`` maps each pruned weight's parameter name to its ``(N, M)`` pattern, or ``None`` for
    unstructured sparsity; every other tensor is stored as it is. A pruned weight is a 2-D matrix or a
    fused expert parameter ``(E, a, b)`` (3-D), whose slices ``p[e]`` are (out, in) matrices unless the
    parameter is named in ``transposed`` (slices stored (in, out), used as ``x @ p[e]``, e.g. GPT-OSS):
    N:M groups then run along dimension 1 of each slice. A ``Conv1D`` weight (2-D, (in, out)) is detected
    by itself. ``config.json`` is the model's config plus a ``transformers_weights`` entry that makes a
    plain ``AutoModelForCausalLM`` refuse the folder with a message naming
    :class:`optimum_maiht.MAIHTModelForCausalLM`.

    Everything is checked and encoded in memory before the first file is written; ``folder`` must not
    hold model weights already.
    """
    if getattr(model, "config", None) is None:
        raise TypeError(
            f"save_compressed needs a transformers model (with .config), got {type(model).__name__}"
        )
    folder = Path(folder)
    _refuse_existing_weights(folder)
    _state_dict_in_memory(model)
    write_compressed(folder, ModelWeights(model), sparse_layers, transposed, max_shard_size)


def write_compressed(
    folder: Path,
    source: WeightSource,
    sparse_layers: Mapping[str, tuple[int, int] | None],
    transposed: Collection[str] = (),
    max_shard_size: int | str = "5GB",
    spill: Path | None = None,
) -> None:
    """The compact format of ``source``'s model (see :func:`save_compressed`), encoded one segment (the
    tensors outside the blocks, then each block) at a time and written by the one shard writer. With
    ``spill``, each block's encoded tensors wait there on disk (a streamed run: one block in memory)."""
    model = source.model
    state = model.state_dict()
    plan = plan_compression(model, state, sparse_layers, transposed)
    planned: dict[str, Tensor] = {}
    spilled: dict[str, Path] = {}
    layers: dict[str, dict[str, Any]] = {}
    for index, names in segments(state, segment_of(model)):
        tensors, part_layers = plan.encode(source.read([n for n in names if n not in plan.aliases]))
        layers.update(part_layers)
        if spill is None or index is None:
            planned.update(tensors)
            continue
        spill.mkdir(exist_ok=True)
        path = spill / f"block-{index:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(path))
        planned.update({n: torch.empty_like(t, device="meta") for n, t in tensors.items()})
        spilled.update(dict.fromkeys(tensors, path))
    folder.mkdir(parents=True, exist_ok=True)  # only once everything is encoded
    with _SpilledTensors(spilled) as read:
        fetch = lambda name: read(name) if name in spilled else planned[name]  # noqa: E731
        split = write_shards(
            folder,
            planned,
            fetch,
            pattern=COMPRESSED_WEIGHTS_PATTERN,
            max_shard_size=max_shard_size,
            metadata=plan.shard_metadata,
        )
    write_index(folder, split, layers, plan.aliases, plan.version)
    write_configs(model, folder)
    logger.info(
        "saved %d compressed layers in %d shard(s) to %s", len(layers), len(split.filename_to_tensors), folder
    )


class _SpilledTensors:
    """Reads encoded tensors back from their spill files, keeping the last file open."""

    def __init__(self, where: dict[str, Path]):
        self.where = where
        self._open: tuple[Path, Any] | None = None

    def __enter__(self) -> Callable[[str], Tensor]:
        return self.read

    def __exit__(self, *exc: object) -> None:
        self._open = None

    def read(self, name: str) -> Tensor:
        path = self.where[name]
        if self._open is None or self._open[0] != path:
            self._open = (path, safe_open(str(path), framework="pt"))
        return self._open[1].get_tensor(name)


@dataclass(frozen=True)
class CompressionPlan:
    """How a model's state dict is written: the tied aliases left out, the encoding of each pruned weight,
    and the format version. Streaming (:mod:`optimum_maiht.streaming`) encodes one block at a time with
    it; :func:`save_compressed` the whole state dict at once."""

    aliases: dict[str, str]
    targets: dict[str, _Target]
    version: int

    def encode(self, state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """The tensors to write for (part of) the state dict, in its order, and their index ``layers``."""
        return _encode_state_dict(state_dict, self.aliases, self.targets)

    @property
    def shard_metadata(self) -> dict[str, str]:
        """The safetensors metadata of every shard."""
        return {"format": "pt", "maiht_format": MAIHT_FORMAT, "maiht_format_version": str(self.version)}


def plan_compression(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    sparse_layers: Mapping[str, tuple[int, int] | None],
    transposed: Collection[str] = (),
) -> CompressionPlan:
    """Check ``sparse_layers`` / ``transposed`` against the model and plan the encoding (see
    :func:`save_compressed`); the state dict's tensors may be on the meta device (only shapes are read)."""
    aliases = _tied_aliases(model, state_dict)
    targets = _plan_targets(model, state_dict, aliases, sparse_layers, transposed)
    version = _EXPERTS_VERSION if any(state_dict[name].dim() == 3 for name in targets) else _FIRST_VERSION
    return CompressionPlan(aliases, targets, version)


def _refuse_existing_weights(folder: Path) -> None:
    """Refuse a file, and a folder that already holds weights (shards of two saves must not mix)."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; save into an empty folder")
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    clashing = sorted(name for name in names if name.startswith(("model.safetensors", "model-")))
    if clashing:
        raise FileExistsError(f"{folder} already holds model weights {clashing}; save into an empty folder")


def _state_dict_in_memory(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()``, refused when weights are offloaded (on the meta device: nothing to write)."""
    state_dict = model.state_dict()
    offloaded = [name for name, tensor in state_dict.items() if tensor.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} weights (e.g. {offloaded[0]}) are offloaded (meta device); load the whole "
            "model into memory (no device_map offloading) before saving it compressed"
        )
    return state_dict


def _tied_aliases(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, str]:
    """``{alias: kept name}`` for state-dict entries that are the same tensor (tied weights): written once.

    Like transformers, the name kept is the tie's source (``model.all_tied_weights_keys`` maps target ->
    source); without that information, the first name in sorted order. A tensor on the meta device (a
    block not loaded, when streaming) has no storage: it is recognised by the model's parameter object.
    """
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        if tensor.device.type == "meta":
            groups.setdefault(("meta", id(model.get_parameter_or_buffer(name))), []).append(name)
        elif tensor.numel():
            key = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tensor.dtype,
            )
            groups.setdefault(key, []).append(name)
    aliases = {}
    for names in groups.values():
        if len(names) > 1:
            keep = ([n for n in sorted(names) if n not in declared] or sorted(names))[0]
            aliases.update({n: keep for n in names if n != keep})
    return aliases


def _plan_targets(
    model: nn.Module,
    state_dict: dict[str, Tensor],
    aliases: dict[str, str],
    sparse_layers: Mapping[str, tuple[int, int] | None],
    transposed: Collection[str],
) -> dict[str, _Target]:
    """Check the caller's ``sparse_layers`` and ``transposed`` against the model and decide how each
    pruned weight is encoded; a tied weight is stored (and planned) under the name that is kept."""
    pending = {aliases.get(name, name): pattern for name, pattern in sparse_layers.items()}
    unknown = sorted(set(pending) - set(state_dict))
    if unknown:
        raise ValueError(
            f"sparse_layers names {unknown[:5]}, which are not parameters of the model; give weight names "
            "such as 'model.layers.0.mlp.up_proj.weight'"
        )
    flipped = _check_transposed(state_dict, aliases, transposed)
    targets = {}
    for name, pattern in pending.items():
        tensor = state_dict[name]
        if tensor.dim() not in (2, 3) or not tensor.is_floating_point():
            raise ValueError(
                f"sparse_layers[{name!r}]: only 2-D floating point weights (and 3-D fused expert weights) "
                f"can be compressed, got shape {tuple(tensor.shape)} and dtype {tensor.dtype}"
            )
        if pattern is None:
            targets[name] = _Target(None)
            continue
        in_out = name in flipped if tensor.dim() == 3 else is_conv1d_weight(model, name)
        targets[name] = _Target(_check_pattern(name, pattern), in_out)
    return targets


def _check_transposed(
    state_dict: dict[str, Tensor], aliases: dict[str, str], transposed: Collection[str]
) -> set[str]:
    """The kept names of the ``transposed`` parameters, each checked to be a 3-D weight of the model."""
    if isinstance(transposed, str):
        raise TypeError(f"transposed must be a collection of parameter names, got the string {transposed!r}")
    flipped = {aliases.get(name, name) for name in transposed}
    unknown = sorted(flipped - set(state_dict))
    if unknown:
        raise ValueError(
            f"transposed names {unknown[:5]}, which are not parameters of the model; give fused expert "
            "weight names such as 'model.layers.0.mlp.experts.gate_up_proj'"
        )
    flat = sorted(name for name in flipped if state_dict[name].dim() != 3)
    if flat:
        raise ValueError(
            f"transposed names {flat[:5]}, which are not 3-D fused expert weights; only those are declared "
            "(a Conv1D weight is recognised by itself)"
        )
    return flipped


def is_conv1d_weight(model: nn.Module, name: str) -> bool:
    """Whether the weight ``name`` belongs to a ``Conv1D`` (stored (in, out): transposed for N:M)."""
    try:
        module = model.get_submodule(name.rsplit(".", 1)[0] if "." in name else "")
    except AttributeError:
        return False
    return is_conv1d(module)


def _check_pattern(name: str, pattern: Any) -> tuple[int, int]:
    """``pattern`` as ``(N, M)`` integers with ``0 < N < M``, or a ``ValueError`` naming the weight."""
    valid = (
        isinstance(pattern, (tuple, list))
        and len(pattern) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in pattern)
        and 0 < pattern[0] < pattern[1]
    )
    if not valid:
        raise ValueError(
            f"sparse_layers[{name!r}] must be (N, M) with 0 < N < M, e.g. (2, 4), or None for unstructured; "
            f"got {pattern!r}"
        )
    return int(pattern[0]), int(pattern[1])


def _encode_state_dict(
    state_dict: dict[str, Tensor], aliases: dict[str, str], targets: dict[str, _Target]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The tensors to write (in state-dict order: the shards depend on it) and the index's ``layers``.

    Aliases are left out; a pruned weight becomes its encoded parts ``name.suffix``; any other tensor is
    written as it is (a copy when it shares memory with one already written: safetensors refuses that).
    """
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    written: set[tuple] = set()
    for name, tensor in state_dict.items():
        if name in aliases:
            continue
        if name in targets:
            layers[name], parts = _encode_weight(name, tensor, targets[name])
            tensors.update({f"{name}.{suffix}": part for suffix, part in parts.items()})
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        shared = storage in written and tensor.numel() > 0
        tensors[name] = tensor.detach().clone() if shared else tensor.detach()
        written.add(storage)
    return tensors, layers


def _encode_weight(name: str, weight: Tensor, target: _Target) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One pruned weight's index entry and stored tensors (suffix -> tensor)."""
    if target.pattern is None:
        info: dict[str, Any] = {"encoding": "bitmask"}
        parts = compress_unstructured(weight)
    else:
        n, m = target.pattern
        view = weight.transpose(-1, -2) if target.transposed else weight
        info = {"encoding": "n:m", "n": n, "m": m, "transposed": target.transposed}
        parts = compress_nm(view, n, m, name)
    info["dtype"] = str(weight.dtype).removeprefix("torch.")
    return info, parts


def write_index(
    folder: Path,
    split: StateDictSplit,
    layers: dict[str, dict[str, Any]],
    aliases: dict[str, str],
    version: int,
) -> None:
    """The index: transformers' (``metadata.total_size``, ``weight_map``) plus the format, its version,
    how each pruned weight is encoded (``layers``) and the tied aliases (``tied``)."""
    metadata = {
        **split.metadata,
        "maiht_format": MAIHT_FORMAT,
        "maiht_format_version": version,
        "layers": layers,
        "tied": aliases,
    }
    write_index_file(folder / COMPRESSED_INDEX_NAME, metadata, split.tensor_to_filename)


def write_configs(model: nn.Module, folder: Path) -> None:
    """``config.json`` with our ``quantization_config`` and the ``transformers_weights`` marker (both
    explained at :data:`LOADER_HINT`), and ``generation_config.json``."""
    model.config.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["transformers_weights"] = LOADER_HINT
    config["quantization_config"] = {"quant_method": QUANT_METHOD}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
