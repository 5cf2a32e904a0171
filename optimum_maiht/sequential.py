"""The sequential pipeline: prune a causal LM one decoder block at a time (docs/design.md, "Pipeline").

Nothing here is model specific. The decoder blocks are the largest homogeneous ``nn.ModuleList``; the
target layers are the ``nn.Linear`` / transformers ``Conv1D`` modules inside them; whatever keyword
arguments each block receives (masks, rotary embeddings, per-layer sliding windows...) are recorded from a
real forward of the model and replayed, never rebuilt by hand.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .configuration import MAIHTConfig
from .model_utils import block_prefix, find_decoder_blocks, linear_types, weight_matrix
from .report import KeptDense, LayerReport
from .solver import maiht_prune

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# finding target layers


def _matches(patterns: list[str], name: str) -> str | None:
    """The first regex of ``patterns`` that ``re.search``-matches ``name``."""
    return next((p for p in patterns if re.search(p, name)), None)


def find_target_layers(
    model: nn.Module, blocks_name: str, blocks: nn.ModuleList, config: MAIHTConfig
) -> list[dict[str, nn.Module]]:
    """Per block, ``{full name: layer}`` of the layers to prune, selected by ``targets`` / ``ignore``."""
    linear = linear_types()

    def wanted(name: str) -> bool:
        return _matches(config.targets, name) is not None and _matches(config.ignore, name) is None

    per_block = []
    for i, block in enumerate(blocks):
        prefix = block_prefix(blocks_name, i)
        per_block.append(
            {prefix + n: m for n, m in block.named_modules() if isinstance(m, linear) and wanted(prefix + n)}
        )
    if not any(per_block):
        outside = [n for n, m in model.named_modules() if isinstance(m, linear) and wanted(n)]
        hint = ""
        if outside:
            hint = f" ({outside[:3]} match, but only layers inside the decoder blocks are pruned"
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
                hint += "; lm_head is tied to the input embedding here: pruning it would zero the embedding"
            hint += ")"
        raise ValueError(
            f"no target layers: targets={config.targets} and ignore={config.ignore} select no nn.Linear / "
            f"Conv1D inside the decoder blocks '{blocks_name}'{hint}"
        )
    return per_block


def kept_dense_weights(
    blocks_name: str, blocks: nn.ModuleList, targets: list[dict[str, nn.Module]], config: MAIHTConfig
) -> list[KeptDense]:
    """Every matrix-shaped parameter inside the blocks that is not a target weight, with the reason."""
    target_weights = {id(layer.weight) for layers in targets for layer in layers.values()}
    kept = []
    for i, block in enumerate(blocks):
        prefix = block_prefix(blocks_name, i)
        owners = {id(m.weight): n for n, m in block.named_modules() if isinstance(m, linear_types())}
        for pname, param in block.named_parameters():
            if param.dim() < 2 or id(param) in target_weights:
                continue
            name = prefix + pname
            module_name = prefix + owners[id(param)] if id(param) in owners else name
            kept.append(KeptDense(name, list(param.shape), _dense_reason(module_name, param, config)))
    return kept


def _dense_reason(name: str, param: nn.Parameter, config: MAIHTConfig) -> str:
    ignored = _matches(config.ignore, name)
    if ignored is not None:
        return f"ignored by the pattern {ignored!r}"
    if _matches(config.targets, name) is None:
        return f"not selected by targets={config.targets}"
    if param.dim() == 3:
        return "fused expert weights (3-D): not a linear layer the pipeline prunes"
    return "not the weight of an nn.Linear / Conv1D layer"


# --------------------------------------------------------------------------------------------------
# capturing what each block receives


class _StopForward(Exception):
    pass


@dataclass
class _BlockCall:
    """One recorded call of a block: the other positional args and the keyword args."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_by_keyword: bool

    def run(self, block: nn.Module, hidden: Tensor) -> Tensor:
        if self.hidden_by_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor, batch_size: int, device: torch.device
) -> tuple[list[Tensor], list[list[_BlockCall]]]:
    """Block 0's input hidden states per batch, and every block's recorded call per batch.

    The blocks are replaced by recorders that pass the hidden states through unchanged, so one cheap
    forward per batch (embeddings and whatever the backbone computes between blocks) records exactly what
    each block receives; the last recorder stops the forward before the LM head.
    """
    hidden: list[Tensor] = []
    calls: list[list[_BlockCall]] = [[] for _ in blocks]
    tuple_tail: list[int | None] = []  # learnt once from a real call: what the model expects back

    def recorder(i: int, real_forward):
        def forward(*args, **kwargs):
            by_keyword = not args
            h = kwargs.pop("hidden_states") if by_keyword else args[0]
            rest = args if by_keyword else args[1:]
            calls[i].append(_BlockCall(rest, kwargs, by_keyword))
            if i == 0:
                hidden.append(h)
                if not tuple_tail:
                    real = (
                        real_forward(*rest, hidden_states=h, **kwargs)
                        if by_keyword
                        else real_forward(h, *rest, **kwargs)
                    )
                    tuple_tail.append(len(real) - 1 if isinstance(real, tuple) else None)
            if i == len(blocks) - 1:
                raise _StopForward
            return h if tuple_tail[0] is None else (h,) + (None,) * tuple_tail[0]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i, block.forward)
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for block in blocks:
            del block.forward
    if len(hidden) != len(calls[-1]):
        raise RuntimeError("the model did not call every decoder block once per batch; it is not supported")
    return hidden, calls


# --------------------------------------------------------------------------------------------------
# Gram matrices


class GramCollector:
    """Accumulates ``H = X^T X`` (float32) for each target layer of a block through forward pre-hooks.

    Layers that receive the very same input tensor (q/k/v, gate/up) share one ``H``, computed once.
    Tokens whose activations are not finite (fp16 overflow) are left out, with a warning.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.gram: dict[str, Tensor] = {}
        self.dropped_tokens: dict[str, int] = {}
        self._live: dict[int, tuple[Tensor, str]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            shared = self._live.get(id(x))
            if shared is not None and shared[0] is x:
                self.gram.setdefault(name, self.gram[shared[1]])
                return
            self._live[id(x)] = (x, name)  # holding x keeps its id unique during this forward
            x = x.detach().reshape(-1, x.shape[-1]).float()
            finite = torch.isfinite(x).all(dim=1)
            if not bool(finite.all()):
                self.dropped_tokens[name] = self.dropped_tokens.get(name, 0) + int((~finite).sum())
                x = x[finite]
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.gram[name].addmm_(x.t(), x)

        return hook

    def end_batch(self) -> None:
        self._live.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._live.clear()


# --------------------------------------------------------------------------------------------------
# the loop


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder blocks (embeddings, norms...)."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside and buf.device != device:
                module._buffers[key] = buf.to(device)


def prune_sequential(
    model: nn.Module,
    input_ids: Tensor,
    config: MAIHTConfig,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[LayerReport], list[KeptDense]]:
    """Prune ``model`` in place, block by block; return a report per target layer and the list of the
    other matrices inside the blocks, kept dense, with the reason."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets = find_target_layers(model, blocks_name, blocks, config)
    kept = kept_dense_weights(blocks_name, blocks, targets, config)
    home = next(model.parameters()).device
    nm = config.nm

    _move_outside_blocks(model, blocks, device)
    try:
        hidden, calls = capture_block_inputs(model, blocks, input_ids, config.batch_size, device)
    finally:
        _move_outside_blocks(model, blocks, home)

    reports: list[LayerReport] = []
    bar = tqdm(range(len(blocks)), desc="mAIHT: pruning blocks", unit="block", disable=not progress)
    for i in bar:
        block = blocks[i].to(device)
        layers = targets[i]
        if layers:
            collector = GramCollector(layers)
            with torch.no_grad():
                for h, call in zip(hidden, calls[i], strict=True):
                    call.run(block, h)
                    collector.end_batch()
            collector.remove()
            for name, layer in layers.items():
                reports.append(_prune_layer(name, layer, collector, config, nm))
        with torch.no_grad():
            hidden = [call.run(block, h) for h, call in zip(hidden, calls[i], strict=True)]
        if not all(bool(torch.isfinite(h).all()) for h in hidden):
            logger.warning(
                "block %d produced non-finite activations (fp16 overflow?); those tokens are left "
                "out of the next Gram matrices: load the model in bfloat16 or float32",
                i,
            )
        blocks[i].to(home)
    return reports, kept


def _prune_layer(
    name: str, layer: nn.Module, collector: GramCollector, config: MAIHTConfig, nm: tuple[int, int] | None
) -> LayerReport:
    weight = weight_matrix(layer)
    shape = list(weight.shape)
    if nm is not None and shape[1] % nm[1]:
        logger.warning(
            "skipping %s: input size %d is not a multiple of M=%d for pattern %s",
            name,
            shape[1],
            nm[1],
            config.pattern,
        )
        return LayerReport(
            name, shape, 0.0, 0.0, 0.0, 0, 0.0, skipped=f"input size {shape[1]} is not a multiple of {nm[1]}"
        )
    if name not in collector.gram:
        raise RuntimeError(f"{name} was not called during calibration; add it to ignore to keep it dense")
    if collector.dropped_tokens.get(name):
        logger.warning(
            "%s: %d calibration tokens with non-finite activations were left out",
            name,
            collector.dropped_tokens[name],
        )
    start = time.perf_counter()
    result = maiht_prune(
        weight.detach(),
        collector.gram[name],
        sparsity=config.sparsity,
        nm=nm,
        scope=config.scope,
        iterations=config.iterations,
        refit_iterations=config.refit_iterations,
        ridge=config.ridge,
        formulation=config.formulation,
        seed=config.seed,
    )
    with torch.no_grad():
        weight.copy_(result.weight)
    seconds = time.perf_counter() - start
    sparsity = float((result.weight == 0).float().mean())
    logger.info(
        "%s: sparsity %.3f, relative error %.4g -> %.4g (%.2fs)",
        name,
        sparsity,
        result.error_init,
        result.error,
        seconds,
    )
    return LayerReport(
        name, shape, sparsity, result.error_init, result.error, result.iterations, seconds, result.history
    )
