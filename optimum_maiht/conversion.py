"""transformers' checkpoint weight conversions, applied one decoder block at a time (for streaming), and
reverted block by block the way ``save_pretrained`` writes them.

Why private API: transformers 5 converts checkpoints while loading (fused experts, renamed keys) and
reverts that on save, but only for a whole state dict at once (``from_pretrained`` /
``save_pretrained``). Pruning a checkpoint larger than memory needs the same conversion for one block's
tensors at a time, so this module, and only this module, uses what those two functions are built on:
``transformers.conversion_mapping.get_model_conversion_mapping`` (the mapping for the model type),
``transformers.core_model_loading`` (``rename_source_key``, ``WeightConverter.convert``,
``build_glob_alternation``, ``dot_natural_key``, ``revert_weight_conversion``),
``transformers.modeling_utils.remove_tied_weights_from_state_dict``, ``PreTrainedModel._get_dtype_plan``
and ``model._weight_conversions``. Written against transformers 5.25; the grouping and casting below
mirror ``convert_and_load_state_dict_in_model`` of that version, and the tests compare every tensor with
``from_pretrained`` / ``save_pretrained`` for each supported family, so a change there shows up as a
failing test, not as wrong weights.

What the families of the tests need (transformers 5.25):

- Mixtral: ``.block_sparse_moe.`` renamed ``.mlp.``; per expert ``w1`` / ``w3`` stacked over the experts
  and concatenated into ``experts.gate_up_proj`` (E, 2I, H), ``w2`` stacked into ``experts.down_proj``
  (E, H, I).
- Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3: ``experts.N.gate_proj`` / ``up_proj`` stacked and concatenated
  into ``experts.gate_up_proj``, ``down_proj`` stacked (shared experts and dense MLPs untouched).
- GPT-NeoX: ``embed_out`` renamed ``lm_head`` (outside the blocks).
- GPT-OSS, Llama, Mistral, Qwen2, Qwen3, Gemma3 (text), Phi-3, GPT-2, OPT: none (identity; only the
  legacy ``LayerNorm.gamma`` / ``beta`` renamings would apply, to old checkpoints). GPT-OSS checkpoints in
  transformers' layout already hold fused experts; the Hub's MXFP4 ones need a quantizer (not handled).
- No conversion of these families combines tensors of different blocks: every group of source tensors
  produces parameters of one block (checked when loading: a group that straddles blocks is an error).

Reads: a block reads exactly the checkpoint tensors its parameters are made of, each once, so a whole
run reads the checkpoint's data once. The tensors of one conversion are read file by file, so a reader that
keeps one file open reopens a shard at most once per conversion group and block that uses it. A reopen
costs the parse of the shard's JSON header, not its data: about 106 bytes per tensor in the shard, 3 ms
for a shard of 560 tensors and 52 ms for one of 5,000 (``safe_open`` + ``keys()``, measured on this
project's 2-core CPU), so even a few hundred reopens over a run cost seconds against reading the weights.
Memory: a group's source tensors are all read before it is converted (as ``from_pretrained`` does); a
fused expert weight then peaks at about twice its size (the stacked experts and the concatenation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    build_glob_alternation,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from .files import read_safetensors_header, read_weight_map, resolve_inside

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""The safetensors dtypes a model weight can be stored in (8-bit floats and the like need a quantizer)."""
INDEX_NAME = "model.safetensors.index.json"
MAX_NAME_LENGTH = 1024
"""A longer tensor name in a header is refused (names go through transformers' regular expressions)."""

Reader = Callable[[str], Tensor]
"""Reads one checkpoint tensor by name."""


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: a tensor missing, or of the wrong shape or dtype."""


@dataclass(frozen=True)
class SourceTensor:
    """A checkpoint tensor as its safetensors header describes it (no data read)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: "BF16", "F32", ...

    def describe(self, name: str) -> str:
        return f"{name} ({self.dtype} {list(self.shape)}) in {self.file}"


def read_headers(folder: str | Path) -> dict[str, SourceTensor]:
    """Every tensor of a safetensors checkpoint folder (``model.safetensors.index.json`` or
    ``model.safetensors``), from the files' headers only (bounded reads, :mod:`optimum_maiht.files`). The
    index may only name files inside the folder (``files.read_weight_map``), and each tensor must be in
    the file the index says, once."""
    folder = Path(folder)
    if (folder / INDEX_NAME).is_file():
        weight_map: dict[str, Path] | None = read_weight_map(folder, INDEX_NAME)
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, [resolve_inside(folder, "model.safetensors", what="weights file")]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or {INDEX_NAME}")
    sources: dict[str, SourceTensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointMismatchError(f"{folder / INDEX_NAME}: {path.name!r} is not a file in {folder}")
        sources.update(_file_header(path, sources))
    for name, path in (weight_map or {}).items():
        if name not in sources or sources[name].file != path:
            raise CheckpointMismatchError(
                f"{folder / INDEX_NAME} puts {name} in {path.name}, which does not hold it"
            )
    return sources


def _file_header(path: Path, seen: Mapping[str, SourceTensor]) -> dict[str, SourceTensor]:
    found = {}
    for name, entry in read_safetensors_header(path).items():
        if name == "__metadata__":
            continue
        if len(name) > MAX_NAME_LENGTH:
            raise CheckpointMismatchError(f"{path}: a tensor name of {len(name)} characters")
        if name in seen:
            raise CheckpointMismatchError(f"{name} is in both {seen[name].file} and {path}")
        found[name] = SourceTensor(path, tuple(entry["shape"]), entry["dtype"])
    return found


@dataclass
class _Group:
    """Checkpoint tensors that make model tensors together, as transformers groups them: under the name
    of the first model tensor (``first``), through a converter, or one tensor under a (new) name."""

    first: str
    converter: WeightConverter | None
    dtype: torch.dtype  # every source is cast to it before converting, as transformers does
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint name, source pattern)
    targets: tuple[str, ...] = ()  # the model tensors it produces (known from the check on meta)


class CheckpointConversion:
    """transformers' conversion of one checkpoint into one model (on ``meta``), planned and checked from
    the checkpoint's headers: the model tensors of a block can then be made from that block's checkpoint
    tensors alone, and a block's (pruned) tensors turned into what ``save_pretrained`` writes for them.

    Building it checks every needed checkpoint tensor's shape and dtype (no data read) and sets
    ``model._weight_conversions`` to the transforms the checkpoint uses, as ``from_pretrained`` does, so
    that the model saves in the checkpoint's layout."""

    def __init__(
        self, model: PreTrainedModel, sources: Mapping[str, SourceTensor], dtype: torch.dtype | None = None
    ):
        self.model = model
        self.sources = dict(sources)
        self.dtype = dtype or model.dtype
        self._meta = {name: t.to("meta") for name, t in model.state_dict().items()}
        self._ties = _tie_groups(model, list(self._meta))
        mapping = get_model_conversion_mapping(model)  # from_pretrained's: no key_mapping nor quantizer
        self.groups, unexpected = self._plan(mapping)
        self.used = [transform for transform in mapping if transform.was_used()]
        model._weight_conversions = self.used  # what from_pretrained leaves for save_pretrained
        self._as_loaded: dict[str, Tensor] = {}  # on meta, as from_pretrained holds them (views included)
        for group in self.groups:
            self._check(group)
        self._drop_tied_duplicates()
        self._check_complete()
        ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
        kept = {name: t for name, t in self._meta.items() if name not in ignore}
        # the model names save_pretrained writes (before reverting): no tied aliases, no ignored keys
        self._kept = set(remove_tied_weights_from_state_dict(kept, model))
        if unexpected:
            logger.warning(
                "%d checkpoint tensors match no weight of %s and are not read (e.g. %s)",
                len(unexpected),
                type(model).__name__,
                unexpected[0],
            )

    # -- planning ----------------------------------------------------------------------------------

    def _plan(self, mapping: list) -> tuple[list[_Group], list[str]]:
        """Group the checkpoint names as ``convert_and_load_state_dict_in_model`` does (sorted, renamed,
        collected under the first target's name), with the dtype each is cast to."""
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = self.model.base_model_prefix
        plan = self.model._get_dtype_plan(self.dtype) or {}
        policy = build_glob_alternation(list(plan)) if plan else None
        groups: dict[str, _Group] = {}
        unexpected = []
        for name in sorted(self.sources, key=dot_natural_key):
            key, pattern = rename_source_key(name, renamings, converters, prefix, self._meta)
            if key not in self._meta and name in self._meta:
                key, pattern = rename_source_key(
                    name, [], [], base_model_prefix=prefix, meta_state_dict=self._meta
                )
            if key not in self._meta:
                unexpected.append(name)
                continue
            if key not in groups:
                matched = policy[0].search(key) if policy else None
                dtype = plan[policy[1][matched.lastgroup]] if matched else self._meta[key].dtype
                converter = deepcopy(by_pattern[pattern]) if pattern is not None else None
                groups[key] = _Group(key, converter, dtype)
            elif groups[key].converter is None or pattern is None:
                other = groups[key].sources[0][0]
                raise CheckpointMismatchError(
                    f"{self._where(name)} and {self._where(other)} both load {key}; remove one of them"
                )
            groups[key].sources.append((name, pattern or name))
        return list(groups.values()), unexpected

    def _where(self, name: str) -> str:
        return f"{name} in {self.sources[name].file}"

    def _check(self, group: _Group) -> None:
        """Check the group's source dtypes, then run its conversion on ``meta`` tensors of the header
        shapes: it must give model tensors of the model's shapes. Sets ``group.targets``."""
        float_target = group.dtype.is_floating_point
        for name, _ in group.sources:
            dtype = SAFETENSORS_DTYPES.get(self.sources[name].dtype)
            if dtype is None or dtype.is_floating_point != float_target:
                kind = "a floating-point (F32/F16/BF16/F64)" if float_target else f"a {group.dtype}"
                raise CheckpointMismatchError(
                    f"{self.sources[name].describe(name)}: {group.first} needs {kind} tensor; "
                    "a quantized or damaged checkpoint is not supported"
                )
        try:
            produced = self._convert(
                group, lambda n: torch.empty(self.sources[n].shape, dtype=group.dtype, device="meta")
            )
        except (RuntimeError, ValueError, IndexError, KeyError) as err:
            raise CheckpointMismatchError(self._explain(group, f"conversion failed ({err})")) from err
        for target, tensor in produced.items():
            if target not in self._meta:
                raise CheckpointMismatchError(
                    self._explain(group, f"converted to {target}, not a weight of the model")
                )
            if tensor.shape != self._meta[target].shape:
                got = f"converted to {target} of shape {list(tensor.shape)}"
                raise CheckpointMismatchError(
                    self._explain(group, f"{got}, the model's is {list(self._meta[target].shape)}")
                )
        group.targets = tuple(produced)
        self._as_loaded.update(produced)

    def _explain(self, group: _Group, problem: str) -> str:
        """An error for a group that failed its check, naming the tensor at fault where the names are
        those ``save_pretrained`` writes: a missing one, or one whose shape differs from the expected."""
        names = [n for n, _ in group.sources]
        expected = self._expected_sources(group)
        missing = [n for n in expected if n not in self.sources]
        if missing and set(names) & set(expected):
            return f"the checkpoint lacks {missing[0]} (needed for {group.first}; in the model's layout)"
        for name in names:
            if name in expected and self.sources[name].shape != expected[name].shape:
                return (
                    f"{self.sources[name].describe(name)} should have shape {list(expected[name].shape)} "
                    f"for {group.first}; does the checkpoint belong to this config.json?"
                )
        listed = ", ".join(self.sources[n].describe(n) for n in names[:4]) + (
            " ..." if len(names) > 4 else ""
        )
        return f"{listed}: {problem}; does the checkpoint belong to this config.json?"

    def _expected_sources(self, group: _Group) -> dict[str, Tensor]:
        """What ``save_pretrained`` writes for the model tensors a group should give (its first target's
        converter run backwards on ``meta``)."""
        targets = [group.first]
        if group.converter is not None:
            pattern = group.converter.target_patterns[0]
            targets = [group.first.replace(pattern, p) for p in group.converter.target_patterns]
        state = {t: self._meta[t] for t in targets if t in self._meta}
        return revert_weight_conversion(self.model, state)

    def _drop_tied_duplicates(self) -> None:
        """Tied tensors (one parameter under several names) come from the first of their names the
        checkpoint has; a checkpoint tensor for another of the names is not read."""
        for names in self._ties:
            given = [n for n in names if n in self._as_loaded]
            for extra in given[1:]:
                group = next(g for g in self.groups if extra in g.targets)
                if group.targets != (extra,):
                    raise CheckpointMismatchError(f"{extra} is tied to {given[0]} but converted with others")
                logger.info("%s is tied to %s: the checkpoint's %s is not read", extra, given[0], extra)
                self.groups.remove(group)
            self._as_loaded.update(dict.fromkeys(names, self._as_loaded[given[0]]) if given else {})

    def _check_complete(self) -> None:
        """Every parameter must come from the checkpoint (a persistent buffer it lacks keeps the model's
        value, as ``from_pretrained`` leaves it)."""
        params = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        missing = [n for n in self._meta if n in params and n not in self._as_loaded]
        if missing:
            saved = list(revert_weight_conversion(self.model, {missing[0]: self._meta[missing[0]]}))
            shown = ", ".join(saved[:2]) + (f" and {len(saved) - 2} more" if len(saved) > 2 else "")
            raise CheckpointMismatchError(
                f"the checkpoint lacks {missing[0]} (saved by transformers as {shown}; {len(missing)} "
                f"weight(s) of {type(self.model).__name__} missing in all): another model or a damaged file"
            )

    # -- loading -----------------------------------------------------------------------------------

    def _convert(self, group: _Group, fetch: Reader) -> dict[str, Tensor]:
        """The group's model tensors, its sources fetched by name (already cast to ``group.dtype``)."""
        if group.converter is None:
            return {group.first: fetch(group.sources[0][0])}
        converter = deepcopy(group.converter)
        for name, pattern in group.sources:
            converter.add_tensor(group.first, name, pattern, fetch(name))
        out = converter.convert(group.first, model=self.model, config=self.model.config)
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def _select(self, inside: Callable[[str], bool]) -> list[_Group]:
        chosen = []
        for group in self.groups:
            where = {inside(t) for t in group.targets}
            if len(where) > 1:
                raise CheckpointMismatchError(
                    f"the conversion giving {', '.join(group.targets)} combines tensors of several blocks; "
                    "it cannot be done block by block"
                )
            if where == {True}:
                chosen.append(group)
        return chosen

    def block_sources(self, prefix: str) -> list[str]:
        """The checkpoint tensors :meth:`load_block` reads for the block under ``prefix``, in order."""
        return [n for g in self._select(lambda t: t.startswith(prefix)) for n in self._read_order(g)]

    def _read_order(self, group: _Group) -> list[str]:
        """A group's sources file by file (a reader that keeps one file open switches once per file)."""
        return sorted((n for n, _ in group.sources), key=lambda n: str(self.sources[n].file))

    def load_block(self, prefix: str, read: Reader) -> dict[str, Tensor]:
        """The model tensors under ``prefix`` (e.g. ``"model.layers.3."``) as ``from_pretrained`` puts
        them in the model (same values and dtypes), reading only the checkpoint tensors they come from."""
        return self._load(self._select(lambda t: t.startswith(prefix)), read)

    def load_outside(self, prefixes: Sequence[str], read: Reader) -> dict[str, Tensor]:
        """The model tensors under none of ``prefixes`` (the blocks): embeddings, final norm, head."""
        return self._load(self._select(lambda t: not t.startswith(tuple(prefixes))), read)

    def _load(self, groups: list[_Group], read: Reader) -> dict[str, Tensor]:
        loaded: dict[str, Tensor] = {}
        for group in groups:  # the group's sources, all read before converting as in from_pretrained
            values = {name: read(name).to(group.dtype) for name in self._read_order(group)}
            loaded.update(self._convert(group, values.pop))
        for names in self._ties:  # every name of a tied parameter, as the model holds it
            given = [n for n in names if n in loaded]
            loaded.update(dict.fromkeys(names, loaded[given[0]]) if given else {})
        return loaded

    # -- saving ------------------------------------------------------------------------------------

    def saved_layout(self) -> dict[str, Tensor]:
        """What ``save_pretrained`` writes for the whole model, in its order, as ``meta`` tensors (names,
        shapes, dtypes), tied weights removed and the conversion reverted, so that shards can be planned
        (:func:`optimum_maiht.writer.plan_shards`) before any data exists. Dtypes are those loading gives
        (``_keep_in_fp32_modules`` included); tensors that would share a storage (views of one tensor,
        as reverting a fused conversion makes them) share one here too."""
        return self._to_saved({name: self._as_loaded.get(name, t) for name, t in self._meta.items()})

    def saved(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tensors ``save_pretrained`` writes for ``tensors`` (a block's, named as in the model, e.g.
        after pruning): tied aliases dropped, the conversion reverted (fused experts split again...)."""
        return self._to_saved(dict(tensors))

    def _to_saved(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return revert_weight_conversion(self.model, {n: t for n, t in state.items() if n in self._kept})


def saved_state(model: PreTrainedModel) -> dict[str, Tensor]:
    """What ``save_pretrained`` writes for a model held in memory, in its order: the state dict without
    ``_keys_to_ignore_on_save`` and tied aliases, its checkpoint layout restored (fused experts split
    again... as views of the model's tensors, so nothing is copied)."""
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    state = {name: t for name, t in model.state_dict().items() if name not in ignore}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def _tie_groups(model: PreTrainedModel, names: list[str]) -> list[list[str]]:
    """The state-dict names that share one tensor (tied weights), in state-dict order, when several do."""
    by_tensor: dict[int, list[str]] = {}
    for name in names:
        by_tensor.setdefault(id(model.get_parameter_or_buffer(name)), []).append(name)
    return [group for group in by_tensor.values() if len(group) > 1]
