"""The statistics stage: the Gram matrix ``H = X^T X`` of every target of a block, from the calibration
inputs that reach it, turned into layer problems (docs/design.md, "The layer problem", "Mixture of
experts").

Linear layers get theirs from forward pre-hooks (:class:`GramCollector`); fused expert parameters from
:class:`optimum_maiht.experts.ExpertGramRecorder`, one group of experts per calibration pass, with the
starved experts' statistics taken from every token. With several ranks the statistics are summed over
the ranks before anything is decided on them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..configuration import MAIHTConfig
from ..distributed import Parallel
from ..experts import ExpertGramRecorder, FusedExpertWeight, weight_view
from ..gram import add_gram, finite_rows
from ..model_utils import weight_matrix
from ..report import layer_type

logger = logging.getLogger(__name__)


@dataclass
class LayerProblem:
    """One layer problem: the (out, in) view of a target's weight (solved in place) and its Gram matrix."""

    name: str
    weight: Tensor
    gram: Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    """Report fields the statistics add: ``tokens``, ``statistics``, ``transposed``."""


class GramCollector:
    """Accumulates ``H = X^T X`` (float32) for each target layer of a block through forward pre-hooks.

    Layers that receive the very same input tensor (q/k/v, gate/up) share one ``H``, computed once.
    Tokens whose activations are not finite (fp16 overflow) are left out, with a warning.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.gram: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        """Finite calibration rows in each layer's Gram matrix."""
        self.dropped_tokens: dict[str, int] = {}
        self._live: dict[int, tuple[Tensor, str]] = {}
        self._rows: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            shared = self._live.get(id(x))
            if shared is not None and shared[0] is x:
                self.gram.setdefault(name, self.gram[shared[1]])
                self.tokens[name] = self.tokens.get(name, 0) + self._rows[shared[1]]
                return
            self._live[id(x)] = (x, name)  # holding x keeps its id unique during this forward
            x, dropped = finite_rows(x.detach().reshape(-1, x.shape[-1]).float())
            if dropped:
                self.dropped_tokens[name] = self.dropped_tokens.get(name, 0) + dropped
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            add_gram(self.gram[name], x)
            self._rows[name] = x.shape[0]
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

        return hook

    def end_batch(self) -> None:
        self._live.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._live.clear()

    def problems(self, layers: dict[str, nn.Module], parallel: Parallel) -> list[LayerProblem]:
        """The layer problems of ``layers``, once the statistics are summed over the ranks."""
        parallel.reduce_statistics(self.gram, self.tokens, self.dropped_tokens)
        return [self._problem(name, layer) for name, layer in layers.items()]

    def _problem(self, name: str, layer: nn.Module) -> LayerProblem:
        if name not in self.gram:
            if ".*." not in layer_type(name):
                raise RuntimeError(
                    f"{name} was not called during calibration; add it to ignore to keep it dense"
                )
            # a per-expert module (inside a list of experts) that the router never chose
            logger.warning("%s: no calibration token reached this expert; pruned by magnitude", name)
            weight = weight_matrix(layer)
            gram = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
            return LayerProblem(name, weight, gram, {"tokens": 0, "statistics": "none (magnitude)"})
        if self.dropped_tokens.get(name):
            logger.warning(
                "%s: %d calibration tokens with non-finite activations were left out",
                name,
                self.dropped_tokens[name],
            )
        return LayerProblem(name, weight_matrix(layer), self.gram[name], {"tokens": self.tokens.get(name)})


def expert_problems(
    experts: list[FusedExpertWeight],
    group: list[int],
    run_block: Callable[..., Any],
    config: MAIHTConfig,
    collector: GramCollector | None,
    parallel: Parallel,
) -> list[LayerProblem]:
    """One calibration pass accumulating the Grams of the experts in ``group`` (and of the linear layers,
    with ``collector``), then the starved experts' all-token statistics: the group's layer problems. The
    routed counts are summed over the ranks first, so that the starved experts are the same on every
    rank."""
    with ExpertGramRecorder(experts, experts=group, keep_calls=config.min_expert_tokens > 0) as recorder:
        run_block(after_batch=collector.end_batch if collector else None)
        parallel.reduce_statistics(recorder.gram, recorder.tokens, recorder.dropped)
        parallel.union(recorder.layout)
        missing = [w.name for w in experts if w.name not in recorder.layout]
        if missing:
            raise RuntimeError(
                f"the fused expert weights {missing[:3]} were never applied per expert during calibration "
                "(their module fuses the experts in one kernel); add them to ignore to keep them dense"
            )
        forced = _all_token_statistics(recorder, recorder.starved(config.min_expert_tokens, group), parallel)
    return [_expert_problem(w, e, recorder, e in forced) for w in experts for e in group if e < w.num_experts]


def _all_token_statistics(recorder: ExpertGramRecorder, starved: list[int], parallel: Parallel) -> set[int]:
    """Send every calibration token through the starved experts (statistics only); the experts for which
    that worked. Where the routing cannot be forced, the routed tokens are used, with a warning. Each rank
    replays its own recorded calls; the ranks agree on the outcome and sum the statistics."""
    if not starved:
        return set()
    logger.warning(
        "experts %s received fewer calibration tokens than min_expert_tokens: their Gram matrices are "
        "built from every calibration token instead (see the report's 'statistics')",
        starved,
    )
    failure = None
    try:
        recorder.replay_all_tokens(starved)
    except ValueError as err:
        failure = str(err)
    failure = next((f for f in parallel.gather(failure) if f is not None), None)
    if failure is not None:
        logger.warning(
            "%s; pruning experts %s on their routed tokens (magnitude where none)", failure, starved
        )
        return set()
    parallel.reduce_statistics(recorder.gram_all, recorder.tokens_all)
    return set(starved)


def _expert_problem(
    fused: FusedExpertWeight, e: int, recorder: ExpertGramRecorder, all_tokens: bool
) -> LayerProblem:
    key = (fused.name, e)
    layout = recorder.layout[fused.name]
    weight = weight_view(fused, e, layout)
    if all_tokens:
        gram, tokens, statistics = recorder.gram_all[key], recorder.tokens_all[key], "all tokens"
    elif recorder.tokens.get(key, 0) > 0:
        gram, tokens, statistics = recorder.gram[key], recorder.tokens[key], "routed"
    else:  # no token and no forced routing: the identity Gram makes the solve magnitude pruning
        logger.warning("%s expert %d: no calibration token reached it; pruned by magnitude", fused.name, e)
        gram = torch.eye(weight.shape[1], dtype=torch.float32, device=weight.device)
        tokens, statistics = 0, "none (magnitude)"
    extra = {"tokens": tokens, "statistics": statistics, "transposed": layout == "in_out"}
    return LayerProblem(f"{fused.name}[{e}]", weight, gram, extra)
