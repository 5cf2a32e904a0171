"""`MAIHTConfig`: what to prune and how, validated at construction and stored as `maiht_config.json`."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .constants import CONFIG_NAME, SOLVER_NAMES, START_NAMES
from .files import read_json

logger = logging.getLogger(__name__)

_PATTERN = re.compile(r"([0-9]+):([0-9]+)")
MAX_GROUP = 1024
"""Largest M of an N:M pattern (the compact format's limit too)."""

# lm_head and embeddings stay dense (tied weights!); MoE routers ("mlp.gate", "mlp.router") and the
# one-output gate of a shared expert are tiny and decide where every token goes.
DEFAULT_IGNORE = [r"(^|\.)lm_head$", r"embed", r"(^|\.)(gate|router|shared_expert_gate)$"]


# Validation tables, checked in this order by MAIHTConfig.__post_init__ (after pattern and sparsity).
# A new field of one of these kinds needs one line here.
_CHOICES = {
    "solver": SOLVER_NAMES,
    "start": START_NAMES,
    "scope": ("row", "layer"),
    "formulation": ("constraint", "penalty"),
    "compute_dtype": ("auto", "float32", "bfloat16"),
}
# field: (smallest, largest allowed value, whether None is allowed). The largest values are far beyond any
# useful run; they stop a value from a downloaded maiht_config.json (or a typo) from running for days,
# overflowing a generator seed or allocating without bound.
_INTEGERS = {
    "iterations": (0, 10_000, False),
    "refit_iterations": (0, 10_000, False),
    "num_samples": (1, 1_000_000, False),
    "sequence_length": (2, 2**20, False),
    "batch_size": (1, 65_536, False),
    "seed": (0, 2**32 - 1, False),
    "min_expert_tokens": (0, 2**31 - 1, False),
    "experts_per_pass": (1, 1_000_000, True),
    "reconstruction_epochs": (0, 1_000, False),
    "reconstruction_batch_size": (1, 65_536, False),
}
MAX_RIDGE = 1e6
MAX_REFIT_GIB = 2.0**20
_REGEX_LISTS = ("targets", "ignore")
MAX_PATTERNS = 256
MAX_PATTERN_CHARS = 1000
PROBE_NAMES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.mlp.experts.gate_up_proj",
    "transformer.h.3.attn.c_attn",
    "model.decoder.layers.0.self_attn_layer_norm_extra_long_module_name",
)
"""Module names every pattern is tried on when the config is built: a pattern whose matching explodes
(catastrophic backtracking) is refused there, before any model is loaded."""
MATCH_TIMEOUT = 0.1
"""Seconds one regex search may take (the ``regex`` engine's own time limit; it overshoots by up to about
8x under load, so one search ends within a second)."""


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"start": "wanda", "reconstruction_epochs": 0},
}
"""Named starting points (``MAIHTConfig.from_preset``, ``optimum-cli maiht prune --preset``): ``"default"``
is the dataclass's defaults (SparseGPT's start, mAIHT, two epochs of the block refit); ``"fast"`` is mAIHT
alone from Wanda's mask (5 iterations, 5 conjugate-gradient steps), no block refit: 0.88-0.92x SparseGPT's
perplexity in 0.52-0.62x its time on SmolLM2-135M and Gemma3-270M at 2:4 and 50% (README, "Benchmarks")."""

MAX_CONFIG_BYTES = 2**20
"""Largest ``maiht_config.json`` read (ours are under 2 KB)."""


RENAMED = {"reconstruction_precision": "compute_dtype"}
"""Fields renamed since a release wrote them into ``maiht_config.json``: old name -> new name."""


def _renamed(config_dict: dict[str, Any]) -> dict[str, Any]:
    """``config_dict`` with the fields of :data:`RENAMED` under their new names (a warning says so); both
    names at once is an error."""
    found = [old for old in RENAMED if old in config_dict]
    if not found:
        return config_dict
    config_dict = dict(config_dict)
    for old in found:
        new = RENAMED[old]
        if new in config_dict:
            raise ValueError(f"{old} and {new} are the same field (renamed to {new}); give only {new}")
        logger.warning("MAIHTConfig field %s is now called %s; read as %s", old, new, new)
        config_dict[new] = config_dict.pop(old)
    return config_dict


def _shown(value: Any) -> str:
    """``value`` for an error message: its repr cut to 60 characters (a huge integer by its size)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def search(pattern: str, name: str, field_name: str) -> bool:
    """Whether ``pattern`` matches ``name`` (``re.search`` semantics), within :data:`MATCH_TIMEOUT`.

    The ``regex`` package (a transformers dependency, ``re``-compatible syntax) is used for its time limit:
    a pattern from a file or a flag cannot hang the run. A pattern that times out is a ``ValueError``
    naming the field and the pattern.
    """
    import regex

    try:
        return regex.search(pattern, name, timeout=MATCH_TIMEOUT) is not None
    except TimeoutError:
        raise ValueError(
            f"{field_name} pattern {pattern!r} takes more than {MATCH_TIMEOUT} s to match the module name "
            f"{name!r} (catastrophic backtracking, e.g. nested or overlapping repeats such as '(a|aa)+'); "
            "simplify it"
        ) from None


def _regex_list(name: str, value: Any) -> list[str]:
    """``value`` as a list of regular expressions (a single string is a list of one), each compiled and
    tried on :data:`PROBE_NAMES`."""
    import regex

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of regular expressions, got {value!r}")
    if len(value) > MAX_PATTERNS or any(len(v) > MAX_PATTERN_CHARS for v in value):
        raise ValueError(
            f"{name} holds {len(value)} patterns of up to {max(map(len, value))} characters; the limits are "
            f"{MAX_PATTERNS} patterns of {MAX_PATTERN_CHARS} characters"
        )
    for pattern in value:
        try:
            regex.compile(pattern)
        except regex.error as err:
            raise ValueError(f"{name} has an invalid regular expression {pattern!r}: {err}") from None
        for probe in PROBE_NAMES:
            search(pattern, probe, name)
    return list(value)


@dataclass
class MAIHTConfig:
    """Configuration of a mAIHT pruning run.

    Args:
        solver: the layer solver (docs/design.md, "Layer solvers"): ``"maiht"`` (default), or the baselines
            ``"sparsegpt"``, ``"wanda"`` and ``"magnitude"``, run in the same pipeline on the same
            calibration. ``start``, ``iterations``, ``refit_iterations``, ``ridge`` and ``formulation`` are
            mAIHT's.
        start: where mAIHT starts each layer: ``"sparsegpt"`` (default: SparseGPT's masks and weights on
            the same Gram matrix; the monotone iteration can only lower that layer error) or ``"wanda"``
            (Wanda's mask, the paper's start, faster: no SparseGPT solve).
        sparsity: fraction of weights set to zero in every target layer, ``0 < sparsity < 1``. Defaults to
            0.5 for unstructured and to ``1 - N/M`` for an N:M pattern (which it must equal if given).
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``, ...: keep N of every M consecutive
            input weights of a row). Layers whose input size is not a multiple of M are skipped, with a
            warning, and listed as skipped in the report.
        layer_sparsity: a per-layer sparsity plan, ``{regex: sparsity}``: a target whose full name (e.g.
            ``model.layers.3.mlp.down_proj``, or an expert slice ``...experts.gate_up_proj[5]``) matches a
            regex (``re.search``, the first that matches) is pruned to that sparsity instead of
            ``sparsity``; unstructured patterns only. Default: none (uniform).
        scope: unstructured comparison group: ``"row"`` (per output channel, Wanda's choice) or ``"layer"``.
        formulation: ``"constraint"`` (project onto the sparsity set, monotone) or ``"penalty"`` (the
            paper's l0-penalty form with adaptive lambda; unstructured only).
        iterations: mAIHT iterations per layer. 5 (default): from SparseGPT's start and under the block
            refit, 20 iterations and 30 CG steps left the first blocks' refitted errors within 1% on the
            demo model and Gemma3-270M at 2:4, for twice the solve time
            (``benchmarks/results/refit_schedule.md``).
        refit_iterations: conjugate-gradient steps that refit the kept weights on the final mask (5).
        ridge: added to the unit diagonal of the column-scaled Gram matrix (keeps the problem well-posed).
            0.01 (like SparseGPT's 1% dampening) gave lower layer errors than the paper's 0.1 on SmolLM2.
        targets: regexes (``re.search`` on the full module name); a linear layer inside a decoder block is
            pruned if it matches one of them and none of ``ignore``.
        ignore: regexes of layers to keep dense. Default: ``lm_head``, embeddings and MoE routers.
        num_samples: calibration windows.
        sequence_length: tokens per calibration window (capped at the model's context length).
        batch_size: calibration windows per forward pass. Without block reconstruction it is memory only
            (the Gram sums' order changes, nothing else); with it, whole batches are what is held out to
            choose the epochs, so it changes which windows the refit trains on.
        seed: seeds the choice of calibration windows and the power iteration.
        compute_dtype: the dtype of the matrix products of a float32 block's passes: its calibration passes
            (the statistics, the refit's dense targets, the propagation to the next block) and the block
            refit's forward and backward passes. ``"float32"``, ``"bfloat16"`` (autocast: the outputs, the
            weights, Adam and the Gram matrices stay float32), or ``"auto"`` (default): bfloat16 where the
            compute device multiplies it natively (a CUDA GPU with bfloat16, a CPU with AVX512-BF16 or AMX),
            float32 elsewhere. A half-precision block runs its passes in its own dtype (the refit's weights
            are float32 then, under this autocast). The dtype of every block is in the report
            (``block_dtypes``). Formerly ``reconstruction_precision`` (an older ``maiht_config.json`` is
            read with the new name, with a warning).
        experts_per_pass: mixture-of-experts blocks: the experts whose Gram matrices are accumulated in one
            calibration pass through the block (memory: this many times the sum of the squared input sizes
            of an expert's matrices, in float32). ``None``: as many as fit in 2 GiB.
        min_expert_tokens: an expert that the router sends fewer calibration tokens to gets its Gram
            matrices from every calibration token instead (statistics only; its outputs are unchanged);
            0 always uses the routed tokens.
        reconstruction_epochs: block reconstruction (docs/design.md, "Block reconstruction"): after the
            masks of a block are chosen, refit the kept weights of all its pruned layers jointly to the
            dense model's block output (as the next norm reads it) with Adam, for at most this many epochs
            over the calibration batches. The epoch kept is the one with the lowest error on held-out
            calibration batches (possibly none: the weights of the layer solves are kept). Costs one more
            forward per block (the dense outputs), one more set of activations, and the epochs' forward
            and backward passes. 2 (default: with the decay below and bfloat16, 3-18% lower held-out block
            errors than one float32 epoch at a constant rate, in 1.2-1.4x its time; docs/design.md, "Block
            reconstruction"); 0: off (the ``"fast"`` preset).
        reconstruction_lr: Adam's learning rate of the reconstruction relative to each weight tensor's
            scale, ``> 0``: a tensor's rate is this times the RMS of its kept weights, so the step is the
            same on every model whatever its weights' size. 1e-2 (default): over 64 windows of 256 at 2:4,
            perplexity 99.57 on SmolLM2-135M and 65.21 on Gemma3-270M, against 102.73 / 64.83 at 5e-3 and
            103.15 / 74.45 with the former absolute rate 1e-3 (docs/design.md, "Block reconstruction").
        reconstruction_decay: share of the refit's steps (all its epochs), at the end, over which the rate
            falls linearly to 0, in [0, 1); 0: a constant rate. 0.25 (default): a quarter (docs/design.md,
            "Block reconstruction").
        reconstruction_holdout: share of the calibration batches held out to choose the epoch, in (0, 1);
            at least one batch is held out. With fewer than two batches the reconstruction is skipped, with
            a warning (raise ``num_samples`` or lower ``batch_size``).
        reconstruction_batch_size: calibration windows per Adam step of the reconstruction: each batch of
            ``batch_size`` windows is cut into pieces of this many, so an epoch over the same tokens takes
            more, smaller steps (``>= batch_size``: one step per batch). The held-out windows are the same
            either way. On the demo model, 1 lowered perplexity by 3.6% at 50% and 10% at 2:4 against
            whole batches of 8.
        reconstruction_max_gib: a block whose refit would hold more than this many GiB (its pruned
            weights' float32 copy, the best weights saved, gradients, Adam's two moments and two masks:
            22 bytes per weight) keeps the weights of its layer solves, with a warning and the reason in
            the report. 32 (default) refits every block of a dense model up to Llama-3-70B (17.5 GiB) and
            of Mixtral-8x7B (30 GiB); a DeepSeek-V3 block (11.3 billion expert weights, 232 GiB) keeps its
            solved weights. ``None``: no limit.
    """

    solver: str = "maiht"
    start: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "row"
    formulation: str = "constraint"
    iterations: int = 5
    refit_iterations: int = 5
    ridge: float = 0.01
    targets: list[str] = field(default_factory=lambda: [r".*"])
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    num_samples: int = 128
    sequence_length: int = 2048
    batch_size: int = 8
    seed: int = 0
    compute_dtype: str = "auto"
    experts_per_pass: int | None = None
    min_expert_tokens: int = 128
    reconstruction_epochs: int = 2
    reconstruction_lr: float = 1e-2
    reconstruction_decay: float = 0.25
    reconstruction_holdout: float = 0.125
    reconstruction_batch_size: int = 1
    reconstruction_max_gib: float | None = 32.0
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nm = self._check_pattern_and_sparsity()
        self._check_choices(nm)
        self._check_integers()
        self._check_ridge()
        self._check_reconstruction()
        self._check_regex_lists()
        self._check_layer_sparsity(nm)

    def _check_pattern_and_sparsity(self) -> tuple[int, int] | None:
        """Parse ``pattern`` (surrounding spaces dropped, stored as ``"N:M"`` or ``"unstructured"``);
        default ``sparsity`` to 0.5 or the pattern's ``1 - N/M``, and check it."""
        if isinstance(self.pattern, str) and self.pattern.strip().lower() == "unstructured":
            self.pattern = "unstructured"
        nm = self._parse_pattern(self.pattern.strip() if isinstance(self.pattern, str) else self.pattern)
        if nm is not None:
            self.pattern = f"{nm[0]}:{nm[1]}"
        implied = None if nm is None else 1.0 - nm[0] / nm[1]
        if self.sparsity is None:
            self.sparsity = 0.5 if implied is None else implied
        if not _is_number(self.sparsity):
            raise ValueError(f"sparsity must be a number in (0, 1), got {_shown(self.sparsity)}")
        self.sparsity = float(self.sparsity)
        if not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}; e.g. sparsity=0.5")
        if implied is not None and abs(self.sparsity - implied) > 1e-9:
            raise ValueError(
                f"sparsity={self.sparsity} does not match pattern={self.pattern!r}, which keeps "
                f"{nm[0]} of {nm[1]} (sparsity {implied:g}); drop sparsity or set it to {implied:g}"
            )
        return nm

    def _check_choices(self, nm: tuple[int, int] | None) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")
        if self.formulation == "penalty" and nm is not None:
            raise ValueError("formulation='penalty' applies to pattern='unstructured' only")

    def _check_integers(self) -> None:
        for name, (low, high, none_allowed) in _INTEGERS.items():
            value = getattr(self, name)
            if value is None and none_allowed:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high:,}, got {_shown(value)}")

    def _check_ridge(self) -> None:
        if not _is_number(self.ridge) or not 0 <= self.ridge <= MAX_RIDGE:  # also rejects NaN
            raise ValueError(f"ridge must be a number from 0 to {MAX_RIDGE:g}, got {_shown(self.ridge)}")
        self.ridge = float(self.ridge)

    def _check_reconstruction(self) -> None:
        lr, holdout = self.reconstruction_lr, self.reconstruction_holdout
        if not _is_number(lr) or not 0 < lr < float("inf"):  # a large rate diverges, which the refit detects
            raise ValueError(f"reconstruction_lr must be a finite number > 0, got {_shown(lr)}; e.g. 1e-2")
        if not _is_number(holdout) or not 0 < holdout < 1:
            raise ValueError(
                f"reconstruction_holdout must be a share in (0, 1) of the calibration batches, got "
                f"{holdout!r}; e.g. 0.125 (one batch in eight)"
            )
        decay = self.reconstruction_decay
        if not _is_number(decay) or not 0 <= decay < 1:
            raise ValueError(
                f"reconstruction_decay must be a share in [0, 1) of the refit's steps, got {_shown(decay)}; "
                "e.g. 0.25 (the last quarter), 0 (a constant rate)"
            )
        self.reconstruction_lr, self.reconstruction_holdout = float(lr), float(holdout)
        self.reconstruction_decay = float(decay)
        limit = self.reconstruction_max_gib
        if limit is not None:
            if not _is_number(limit) or not 0 < limit <= MAX_REFIT_GIB:
                raise ValueError(
                    f"reconstruction_max_gib must be a number of GiB in (0, {MAX_REFIT_GIB:g}] or None (no "
                    f"limit), got {_shown(limit)}; e.g. 32"
                )
            self.reconstruction_max_gib = float(limit)

    def _check_regex_lists(self) -> None:
        """``targets`` and ``ignore``: a string or a list of valid regexes, stored as a list."""
        for name in _REGEX_LISTS:
            setattr(self, name, _regex_list(name, getattr(self, name)))
        if not self.targets:
            raise ValueError("targets must name at least one regular expression, e.g. ['.*']")

    def _check_layer_sparsity(self, nm: tuple[int, int] | None) -> None:
        """``layer_sparsity``: ``{regex: sparsity in (0, 1)}``, unstructured patterns only."""
        plan = self.layer_sparsity
        if not isinstance(plan, dict) or not all(isinstance(k, str) for k in plan):
            raise ValueError(
                f"layer_sparsity must map regexes to sparsities, e.g. {{'mlp.down_proj': 0.4}}; got {plan!r}"
            )
        if plan and nm is not None:
            raise ValueError(
                f"layer_sparsity applies to pattern='unstructured' only (pattern={self.pattern!r} fixes "
                "every layer's sparsity); drop layer_sparsity or the N:M pattern"
            )
        _regex_list("layer_sparsity", list(plan))
        for regex, value in plan.items():
            if not _is_number(value) or not 0.0 < value < 1.0:
                raise ValueError(f"layer_sparsity[{regex!r}] must be a sparsity in (0, 1), got {value!r}")
        self.layer_sparsity = {regex: float(value) for regex, value in plan.items()}

    @staticmethod
    def _parse_pattern(pattern: Any) -> tuple[int, int] | None:
        if pattern == "unstructured":
            return None
        match = _PATTERN.fullmatch(pattern) if isinstance(pattern, str) else None
        if match is None or not 0 < int(match[1]) < int(match[2]) <= MAX_GROUP:
            raise ValueError(
                f"pattern must be 'unstructured' or 'N:M' with 0 < N < M <= {MAX_GROUP} (e.g. '2:4', '4:8'), "
                f"got {_shown(pattern)}"
            )
        return int(match[1]), int(match[2])

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, ``None`` for unstructured."""
        return self._parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_preset(cls, name: str, **fields: Any) -> MAIHTConfig:
        """The preset ``name`` (:data:`PRESETS`: ``"default"``, ``"fast"``), ``fields`` overriding it."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **fields})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> MAIHTConfig:
        if not isinstance(config_dict, dict):
            raise ValueError(
                f"a MAIHTConfig is built from a dict of fields, got {type(config_dict).__name__}"
            )
        config_dict = _renamed(config_dict)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"unknown MAIHTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**config_dict)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``maiht_config.json`` into ``save_directory`` (created if needed)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(self.to_json_string())
        return path / CONFIG_NAME

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **hub_kwargs: Any) -> MAIHTConfig:
        """Read ``maiht_config.json`` from a local folder, a file path, or a Hub repo id."""
        path = Path(pretrained)
        if path.is_file():
            file = path
        elif path.is_dir():
            file = path / CONFIG_NAME
            if not file.is_file():
                raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; was it saved by optimum-maiht?")
        else:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(str(pretrained), CONFIG_NAME, **hub_kwargs))
        data = read_json(file, what=CONFIG_NAME, max_bytes=MAX_CONFIG_BYTES)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
