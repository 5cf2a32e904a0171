"""Which weights of the decoder blocks are pruned, and why every other matrix stays dense (docs/design.md,
"Targets, and what stays dense").

Targets are of two kinds, both found generically (no list of model names): linear layers (``nn.Linear``
and transformers' ``Conv1D``, per-expert ``nn.Linear`` modules of older MoE code included) and fused
mixture-of-experts parameters (3-D ``(num_experts, a, b)`` tensors of transformers 5, each expert slice its
own linear problem). ``MAIHTConfig.targets`` / ``ignore`` select among them by regex on the full name (the
module's name for a linear, the parameter's for a fused one), each search time-limited. Every other
matrix-shaped parameter inside the blocks is listed as kept dense with the reason, so that nothing is
skipped silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import nn

from .configuration import MAIHTConfig, search
from .experts import FusedExpertWeight, find_fused_experts
from .model_utils import block_prefix, linear_types
from .report import KeptDense

logger = logging.getLogger(__name__)

MOSTLY_DENSE = 0.5
"""Warn when the targets of a block cover less than this share of its matrix weights."""


@dataclass
class BlockTargets:
    """The weights of one decoder block to prune."""

    linears: dict[str, nn.Module] = field(default_factory=dict)
    """``{full module name: layer}``."""
    experts: list[FusedExpertWeight] = field(default_factory=list)
    """Fused expert parameters; each of their expert slices is pruned on its own."""

    def __bool__(self) -> bool:
        return bool(self.linears or self.experts)

    def parameters(self) -> list[nn.Parameter]:
        """Every target parameter once (a fused experts tensor holds several targets)."""
        found = [layer.weight for layer in self.linears.values()] + [w.param for w in self.experts]
        return list({id(p): p for p in found}.values())

    def weights(self) -> set[int]:
        """``id`` of every target parameter."""
        return {id(p) for p in self.parameters()}


def matching(patterns: list[str], name: str, field_name: str = "targets") -> str | None:
    """The first regex of ``patterns`` (the config field ``field_name``) that ``re.search``-matches
    ``name``, or ``None``; each search is time-limited (``configuration.search``)."""
    return next((p for p in patterns if search(p, name, field_name)), None)


def _wanted(config: MAIHTConfig, name: str) -> bool:
    return matching(config.targets, name) is not None and matching(config.ignore, name, "ignore") is None


def find_targets(
    model: nn.Module, blocks_name: str, blocks: nn.ModuleList, config: MAIHTConfig
) -> list[BlockTargets]:
    """Per block, the linear layers and fused expert parameters selected by ``targets`` / ``ignore``."""
    per_block = []
    for i, block in enumerate(blocks):
        prefix = block_prefix(blocks_name, i)
        linears = {
            prefix + n: m
            for n, m in block.named_modules()
            if isinstance(m, linear_types()) and _wanted(config, prefix + n)
        }
        experts = [w for w in find_fused_experts(block, prefix) if _wanted(config, w.name)]
        per_block.append(BlockTargets(linears, experts))
    if not any(per_block):
        raise ValueError(_no_target_message(model, blocks_name, config))
    return per_block


def _no_target_message(model: nn.Module, blocks_name: str, config: MAIHTConfig) -> str:
    outside = [n for n, m in model.named_modules() if isinstance(m, linear_types()) and _wanted(config, n)]
    hint = ""
    if outside:
        hint = f" ({outside[:3]} match, but only layers inside the decoder blocks are pruned"
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
            hint += "; lm_head is tied to the input embedding here: pruning it would zero the embedding"
        hint += ")"
    return (
        f"no target layers: targets={config.targets} and ignore={config.ignore} select no nn.Linear / "
        f"Conv1D / fused expert weight inside the decoder blocks '{blocks_name}'{hint}"
    )


def kept_dense_weights(
    blocks_name: str, blocks: nn.ModuleList, targets: list[BlockTargets], config: MAIHTConfig
) -> list[KeptDense]:
    """Every matrix-shaped parameter inside the blocks that is not a target, with the reason; warns when a
    block's targets leave most of its matrix weights dense."""
    kept = []
    for i, (block, block_targets) in enumerate(zip(blocks, targets, strict=True)):
        prefix = block_prefix(blocks_name, i)
        chosen = block_targets.weights()
        owners = {id(m.weight): n for n, m in block.named_modules() if isinstance(m, linear_types())}
        pruned = total = 0
        for pname, param in block.named_parameters():
            if param.dim() < 2:
                continue
            total += param.numel()
            if id(param) in chosen:
                pruned += param.numel()
                continue
            owner = prefix + owners[id(param)] if id(param) in owners else prefix + pname.rpartition(".")[0]
            reason = _dense_reason(owner, prefix + pname, param, config)
            kept.append(KeptDense(prefix + pname, list(param.shape), reason))
        if total and pruned < MOSTLY_DENSE * total:
            logger.warning(
                "block %d: the targets cover only %.0f%% of its matrix weights; the rest stays dense (listed "
                "in the report's kept_dense with the reasons)",
                i,
                100 * pruned / total,
            )
    return kept


def _dense_reason(owner: str, full: str, param: nn.Parameter, config: MAIHTConfig) -> str:
    """Why the parameter ``full`` (of module ``owner``) is not a target."""
    ignored = matching(config.ignore, owner, "ignore") or matching(config.ignore, full, "ignore")
    if ignored is not None:
        return f"ignored by the pattern {ignored!r}"
    if matching(config.targets, full if param.dim() == 3 else owner) is None:
        return f"not selected by targets={config.targets}"
    if full.endswith("bias"):
        return "a bias (biases stay dense)"
    return "not the weight of a linear layer or of fused experts (e.g. a router's own parameter)"
