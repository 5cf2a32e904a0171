"""Per-expert Gram matrices for fused mixture-of-experts weights (docs/design.md, "Mixture of experts").

What and why: transformers 5 stores the routed experts of most MoE families as 3-D ``nn.Parameter``s
``(num_experts, a, b)`` inside an ``...Experts`` module, not as ``nn.Linear``. Each slice ``p[e]`` is its own
linear problem whose inputs are the tokens the router sends to expert ``e``, so it needs its own
``H_e = X_e^T X_e``. ``find_fused_experts`` finds every 3-D floating-point parameter of a block;
``ExpertGramRecorder`` intercepts, with a ``TorchFunctionMode``, the ``F.linear(x, p[e])`` (layout
"out_in": ``p[e]`` is (out, in)) and ``x @ p[e]`` (layout "in_out": ``p[e]`` is (in, out)) calls of the eager
per-expert loop and accumulates ``x^T x`` in float32 from exactly the rows it applies ``p[e]`` to. The fused
implementations (``grouped_mm``, ``batched_mm``: the default of a model built from a config is
``grouped_mm``) never slice the parameter: run calibration under ``eager_experts(model)``; a call of an
experts module in which no slice was seen raises instead of returning empty statistics.

Starved experts: ``recorder.tokens`` counts the routed rows of every expert (selected or not) and
``recorder.starved(min_tokens, among)`` lists the experts below a threshold; the caller never skips them
silently.
For those, ``recorder.replay_all_tokens(ids)`` (with ``keep_calls=True``) replays every recorded call of
the experts modules with the routing forced to one expert, the routing-index tensor (the only 2-D integer
tensor of the call, ``(tokens, top_k)``) replaced by a ``(tokens, 1)`` column of ``e`` and the routing
weights of the same shape cut to their first column. So every calibration token reaches ``e`` exactly once:
``tokens_all[(name, e)]`` equals the number of calibration tokens and ``gram_all`` holds the Grams of that
dense routing (llm-compressor's default for every expert). The replay's outputs are discarded. An experts
module whose call has no such index tensor (routing computed inside the module, a 1-D index) cannot be
forced: ``replay_all_tokens`` raises ``ValueError`` and the caller falls back to the routed statistics
(or keeps the expert dense), and says so.

Memory: ``4 * len(experts) * sum_p in_p^2`` bytes for the selected experts' Grams (``in_p``: the input size
of fused parameter ``p``; the other experts only count tokens), ``4 * len(ids) * sum_p in_p^2`` more during a
replay, plus, with ``keep_calls``, references to the experts modules' inputs (hidden states and routing) of
every calibration call until the recorder exits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .gram import add_gram, finite_rows

logger = logging.getLogger(__name__)

Layout = Literal["out_in", "in_out"]

_LINEAR = {torch.nn.functional.linear}  # weight (out, in)
_MATMUL = {torch.matmul, torch.Tensor.matmul}  # ``x @ w`` arrives as Tensor.matmul; right operand (in, out)


@dataclass(frozen=True, eq=False)
class FusedExpertWeight:
    """One fused expert parameter ``(num_experts, a, b)``: its full name, the module that owns it and the
    attribute that holds it there."""

    name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        """The parameter the module holds now (a streamed run gives a block new tensors when it loads it)."""
        return self.module._parameters[self.attr]

    @property
    def num_experts(self) -> int:
        return self.param.shape[0]


def find_fused_experts(module: nn.Module, prefix: str = "") -> list[FusedExpertWeight]:
    """Every 3-D floating-point parameter under ``module``, named ``prefix + dotted name``."""
    found = []
    for owner_name, owner in module.named_modules():
        for param_name, param in owner.named_parameters(recurse=False):
            if param.dim() == 3 and param.is_floating_point():
                name = f"{prefix}{owner_name}.{param_name}" if owner_name else prefix + param_name
                found.append(FusedExpertWeight(name, owner, param_name))
    return found


GRAM_BUDGET_BYTES = 2 * 1024**3
"""With ``experts_per_pass=None``, as many experts per calibration pass as fit in 2 GiB of float32 Grams."""


def expert_groups(weights: Sequence[FusedExpertWeight], experts_per_pass: int | None) -> list[list[int]]:
    """The expert indices of a block in groups of ``experts_per_pass``, one calibration pass each (``None``:
    as many as :data:`GRAM_BUDGET_BYTES` allows, at least one; the input size of a slice is at most the
    larger of its two dimensions)."""
    count = max(w.num_experts for w in weights)
    if experts_per_pass is None:
        per_expert = 4 * sum(max(w.param.shape[1:]) ** 2 for w in weights)
        experts_per_pass = max(1, GRAM_BUDGET_BYTES // per_expert)
    return [list(range(s, min(s + experts_per_pass, count))) for s in range(0, count, experts_per_pass)]


def weight_view(fused: FusedExpertWeight, e: int, layout: Layout) -> Tensor:
    """Expert ``e``'s weight as an (out, in) view of the parameter (copying into it writes through)."""
    w = fused.param[e]
    return w if layout == "out_in" else w.t()


@contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Select transformers' per-expert loop (``eager``) on ``model`` (the top-level ``PreTrainedModel``: the
    setting lives in its config, shared by its experts modules), and restore the previous choice after."""
    if not hasattr(model, "set_experts_implementation"):
        yield
        return
    previous = model.get_experts_implementation()
    model.set_experts_implementation("eager")
    try:
        yield
    finally:
        model.set_experts_implementation(previous)


class _SliceMode(TorchFunctionMode):
    """Shows the recorder every linear / matmul call, then runs it unchanged (the mode is popped here)."""

    def __init__(self, recorder: ExpertGramRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR:
            self.recorder._observe(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), "out_in")
        elif func in _MATMUL:
            self.recorder._observe(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other"), "in_out")
        return func(*args, **kwargs)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]


class ExpertGramRecorder:
    """Context manager accumulating ``H = X^T X`` (float32) per (fused parameter, expert) from routed tokens.

    ``experts``: the expert indices whose Grams are accumulated (all when ``None``); every expert's routed
    rows are counted in ``tokens``. Non-finite input rows are left out and counted in ``dropped``.
    ``keep_calls``: record the experts modules' calls so that ``replay_all_tokens`` can force routing.
    Results, keyed by ``(name, expert)``: ``gram``, ``tokens``, ``dropped``, ``gram_all``, ``tokens_all``;
    ``layout[name]`` is "out_in" or "in_out" once the parameter has been seen. Enter it once around all the
    calibration forwards of the block (results accumulate; recorded calls are released on exit).
    """

    def __init__(
        self,
        weights: Sequence[FusedExpertWeight],
        experts: Iterable[int] | None = None,
        keep_calls: bool = False,
    ):
        self.weights = list(weights)
        self.experts = None if experts is None else set(experts)
        self.keep_calls = keep_calls
        self.gram: dict[tuple[str, int], Tensor] = {}
        self.tokens: dict[tuple[str, int], int] = {}
        self.dropped: dict[tuple[str, int], int] = {}
        self.gram_all: dict[tuple[str, int], Tensor] = {}
        self.tokens_all: dict[tuple[str, int], int] = {}
        self.layout: dict[str, Layout] = {}
        self._owners = list({id(w.module): w.module for w in self.weights}.values())
        self._by_storage: dict[tuple[torch.device, int], list[FusedExpertWeight]] = {}
        self._seen: dict[int, int] = {}
        self._seen_at_call: dict[int, int] = {}
        self._calls: dict[int, list[tuple[tuple, dict]]] = {}
        self._forced: int | None = None
        self._mode: _SliceMode | None = None
        self._handles: list = []

    # ---------------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> ExpertGramRecorder:
        self._by_storage.clear()
        for w in self.weights:
            self._by_storage.setdefault(_storage_key(w.param), []).append(w)
        for owner in self._owners:
            self._handles.append(owner.register_forward_pre_hook(self._before_call, with_kwargs=True))
            self._handles.append(owner.register_forward_hook(self._after_call, with_kwargs=True))
        self._mode = _SliceMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()
        for (name, e), count in sorted(self.dropped.items()):
            logger.warning(
                "%s expert %d: %d calibration rows with non-finite inputs left out", name, e, count
            )

    # ---------------------------------------------------------------------------------------------- queries

    def starved(self, min_tokens: int, among: Iterable[int]) -> list[int]:
        """The experts of ``among`` that fewer than ``min_tokens`` routed (finite) rows reached, for any
        tracked parameter (every expert's rows are counted in every pass, selected or not)."""
        return [e for e in among if any(self.tokens.get((w.name, e), 0) < min_tokens for w in self.weights)]

    def replay_all_tokens(self, expert_ids: Iterable[int]) -> None:
        """Replay every recorded experts call with all its tokens forced to each expert of ``expert_ids``,
        accumulating ``gram_all`` / ``tokens_all``. Needs ``keep_calls=True`` and an active recorder."""
        if self._mode is None or not self.keep_calls:
            raise RuntimeError(
                "replay_all_tokens needs an active ExpertGramRecorder built with keep_calls=True"
            )
        expert_ids = list(expert_ids)
        with torch.no_grad():
            for owner in self._owners:
                for args, kwargs in self._calls.get(id(owner), []):
                    for e in expert_ids:
                        forced_args, forced_kwargs = _force_routing(owner, args, kwargs, e)
                        self._forced = e
                        try:
                            owner(*forced_args, **forced_kwargs)
                        finally:
                            self._forced = None

    # ---------------------------------------------------------------------------------------------- hooks

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen_at_call[id(module)] = self._seen.get(id(module), 0)
        if self.keep_calls and self._forced is None:
            self._calls.setdefault(id(module), []).append((args, kwargs))

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._seen.get(id(module), 0) > self._seen_at_call.pop(id(module)):
            return
        inputs = [t for t in _tensors(args, kwargs) if t.is_floating_point()]
        if inputs and inputs[0].numel():
            implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
            raise RuntimeError(
                f"{type(module).__name__} applied its experts without slicing its fused weights (experts "
                f"implementation {implementation!r}); per-expert statistics need the eager loop: wrap "
                "calibration in eager_experts(model) "
                "(model.set_experts_implementation('eager') on the top-level model)"
            )

    def _match(self, w: Any) -> tuple[FusedExpertWeight, int] | None:
        if not isinstance(w, Tensor) or w.dim() != 2 or w.layout != torch.strided or w.is_meta:
            return None
        for fused in self._by_storage.get(_storage_key(w), ()):
            p = fused.param
            if w.shape != p.shape[1:] or w.stride() != p.stride()[1:]:
                continue
            offset = w.storage_offset() - p.storage_offset()
            if offset >= 0 and offset % p.stride(0) == 0 and offset // p.stride(0) < p.shape[0]:
                return fused, offset // p.stride(0)
        return None

    def _observe(self, x: Any, w: Any, layout: Layout) -> None:
        match = self._match(w)
        if match is None:
            return
        fused, e = match
        known = self.layout.setdefault(fused.name, layout)
        if known != layout:
            raise RuntimeError(f"{fused.name} is applied both as '{known}' and as '{layout}'")
        self._seen[id(fused.module)] = self._seen.get(id(fused.module), 0) + 1
        if self._forced is not None and e != self._forced:
            raise RuntimeError(
                f"{fused.name}: expert {e} ran while the routing was forced to expert {self._forced}; "
                f"{type(fused.module).__name__} does not take its routing from the index tensor"
            )
        key = (fused.name, e)
        x = x.detach().reshape(-1, w.shape[1] if layout == "out_in" else w.shape[0])
        x, bad = finite_rows(x)
        if bad and self._forced is None:
            self.dropped[key] = self.dropped.get(key, 0) + bad
        if self._forced is not None:
            gram, tokens = self.gram_all, self.tokens_all
        elif self.experts is None or e in self.experts:
            gram, tokens = self.gram, self.tokens
        else:
            self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            return
        tokens[key] = tokens.get(key, 0) + x.shape[0]
        x = x.float()
        if key not in gram:
            gram[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        add_gram(gram[key], x)


def _storage_key(t: Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _force_routing(owner: nn.Module, args: tuple, kwargs: dict, e: int) -> tuple[tuple, dict]:
    """The call with its ``(tokens, top_k)`` integer routing index replaced by a ``(tokens, 1)`` column of
    ``e``, and floating tensors of the index's shape (the routing weights) cut to their first column."""
    index = [
        t
        for t in _tensors(args, kwargs)
        if t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool
    ]
    if len(index) != 1:
        raise ValueError(
            f"{type(owner).__name__} is called with {len(index)} 2-D integer tensors, not one "
            "(tokens, top_k) routing index: its routing cannot be forced; use the routed-token statistics "
            "for its experts"
        )
    shape = index[0].shape
    forced = torch.full((shape[0], 1), e, dtype=index[0].dtype, device=index[0].device)

    def swap(value: Any) -> Any:
        if value is index[0]:
            return forced
        if isinstance(value, Tensor) and value.is_floating_point() and value.shape == shape:
            return value[:, :1]
        return value

    return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}
