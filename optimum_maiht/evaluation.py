"""Perplexity and measured sparsity of any causal LM, dense or pruned."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .constants import DEFAULT_EVAL_TEXT
from .data import (
    CHARS_PER_WINDOW_TOKEN,
    CalibrationData,
    calibration_text,
    describe_data,
    special_prefix,
    split_of,
    token_windows,
    tokenize,
)
from .distributed import SINGLE, Parallel
from .model_utils import find_decoder_blocks, linear_types
from .report import layer_type

logger = logging.getLogger(__name__)


def context_length(model: nn.Module) -> int | None:
    """The model's context in tokens (``config.max_position_embeddings``), ``None`` when it does not say."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


MAX_DEFAULT_SEQUENCE_LENGTH = 2048
"""The papers' cap on the perplexity window (SparseGPT, Wanda: 2048 for LLaMA-1, 4096 for LLaMA-2)."""
LOGITS_BYTES = 512 * 2**20
"""Most bytes of logits one forward pass of :func:`perplexity` may return: as many windows per pass as fit
(at least one, at most ``batch_size``). One 2048-token window of a 49k vocabulary is 0.4 GB in float32."""
LOSS_CHUNK_BYTES = 64 * 2**20
"""Float32 log-probabilities computed at once: the loss runs over a window's tokens in chunks this size."""


def default_sequence_length(model: nn.Module) -> int:
    """The perplexity window the papers use: the model's training length (``max_position_embeddings``)
    capped at :data:`MAX_DEFAULT_SEQUENCE_LENGTH`; 2048 when the model does not say."""
    limit = context_length(model)
    return min(limit, MAX_DEFAULT_SEQUENCE_LENGTH) if limit else MAX_DEFAULT_SEQUENCE_LENGTH


def capped_sequence_length(model: nn.Module, sequence_length: int) -> int:
    """``sequence_length`` capped (with a warning) at the model's context: calibration windows longer than
    the context would meet positions the model never saw."""
    limit = context_length(model)
    if limit is not None and sequence_length > limit:
        logger.warning(
            "sequence_length=%d exceeds the model's context of %d tokens; using %d",
            sequence_length,
            limit,
            limit,
        )
        return limit
    return sequence_length


def check_sequence_length(model: nn.Module, sequence_length: int) -> None:
    """Refuse windows longer than the model's context: positions past it were never trained (or do not
    exist), so the perplexity would be meaningless or the forward pass would fail."""
    limit = context_length(model)
    if limit is not None and sequence_length > limit:
        raise ValueError(
            f"sequence_length={sequence_length} exceeds the model's context of {limit} tokens "
            f"(max_position_embeddings); use sequence_length <= {limit}"
        )


def _check_counts(sequence_length: int, max_windows: int | None, batch_size: int) -> None:
    """The window arguments' ranges, checked before any work (instead of an empty range or a 0 division)."""
    if sequence_length < 2:
        raise ValueError(f"sequence_length must be an integer >= 2, got {sequence_length}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be None (every window) or an integer >= 1, got {max_windows}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")


def perplexity(
    model: nn.Module,
    tokenizer: Any | None,
    data: CalibrationData = DEFAULT_EVAL_TEXT,
    sequence_length: int | None = None,
    *,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
    parallel: Parallel = SINGLE,
) -> float:
    """Perplexity over consecutive non-overlapping windows of ``sequence_length`` tokens.

    The arguments after ``sequence_length`` are keyword-only: a fifth positional number was easily read
    as a batch size when it is the number of windows scored.

    ``data`` is anything :func:`optimum_maiht.data.calibration_text` accepts (default: the bundled
    WikiText-2 test excerpt); ready windows (a 2-D tensor) are used as they are. ``sequence_length=None``
    takes :func:`default_sequence_length` (the model's training length capped at 2048, as the papers do);
    ``max_windows=None`` scores the whole text. Each window starts with the tokenizer's special prefix
    (BOS), as in training. Windows longer than the model's context are refused.

    This is token-level perplexity over fixed windows. lm-eval's ``wikitext`` task measures word- and
    byte-level rolling perplexity over whole documents: a different number, not comparable with this one.

    Under ``torchrun`` (``parallel``), rank 0 cuts the windows and shares them, each rank scores its share
    and the log-likelihoods are summed.
    """
    if sequence_length is None:
        sequence_length = default_sequence_length(model)
    _check_counts(sequence_length, max_windows, batch_size)
    windows = parallel.on_main(
        lambda: perplexity_windows(model, tokenizer, data, sequence_length, max_windows), share=True
    )
    windows = parallel.shard_windows(windows, batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = parallel.sum(_negative_log_likelihood(model, windows, batch_size, device, progress))
    return math.exp(nll / count)


@dataclass(frozen=True)
class PerplexityWindows:
    """What ``MAIHTPruner.prune(eval_dataset=...)`` measures before and after: ``max_windows`` windows
    (``None``: all) of ``sequence_length`` tokens of ``data``."""

    data: CalibrationData
    sequence_length: int
    max_windows: int | None

    def record(self, before: float, after: float) -> dict[str, Any]:
        """The report's ``evaluation`` entry."""
        return {
            "dataset": describe_data(self.data),
            "split": split_of(self.data),
            "sequence_length": self.sequence_length,
            "windows": self.max_windows,
            "perplexity_before": before,
            "perplexity_after": after,
        }


def perplexity_on(
    model: nn.Module,
    tokenizer: Any | None,
    windows: PerplexityWindows,
    *,
    batch_size: int,
    device: torch.device,
    progress: bool,
    parallel: Parallel,
) -> float:
    """:func:`perplexity` of ``model`` as it is now, computed on ``device`` (the model is moved there and
    back), shared out over the ranks."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        return perplexity(
            model,
            tokenizer,
            windows.data,
            windows.sequence_length,
            max_windows=windows.max_windows,
            batch_size=batch_size,
            progress=progress,
            parallel=parallel,
        )
    finally:
        model.to(home)


def perplexity_windows(
    model: nn.Module,
    tokenizer: Any | None,
    data: CalibrationData,
    sequence_length: int,
    max_windows: int | None,
) -> Tensor:
    """The ``LongTensor[n, sequence_length]`` windows :func:`perplexity` scores for ``data``."""
    budget = None if max_windows is None else CHARS_PER_WINDOW_TOKEN * max_windows * sequence_length
    text = calibration_text(data, max_chars=budget)
    if isinstance(text, Tensor) and text.dim() == 2:
        check_sequence_length(model, text.shape[1])
        return text if max_windows is None else text[:max_windows]
    check_sequence_length(model, sequence_length)
    if isinstance(text, Tensor):
        return token_windows(text, max_windows, sequence_length)
    if tokenizer is None:
        raise ValueError("evaluating on text needs a tokenizer")
    prefix = special_prefix(tokenizer)
    return token_windows(tokenize(tokenizer, text), max_windows, sequence_length, prefix)


def _negative_log_likelihood(
    model: nn.Module, windows: Tensor, batch_size: int, device: torch.device, progress: bool
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over ``windows`` and the number of tokens predicted.

    Memory is bounded by the logits of one forward pass (:data:`LOGITS_BYTES`: after the first window,
    as many windows per pass as fit, at most ``batch_size``) plus one chunk of float32 log-probabilities
    (:func:`summed_nll`); the full float32 logits are never copied.
    """
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    per_pass, start = 1, 0
    with torch.no_grad(), tqdm(total=windows.shape[0], desc="perplexity", disable=not progress) as bar:
        while start < windows.shape[0]:
            ids = windows[start : start + per_pass].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            nll += summed_nll(logits, ids)
            count += ids[:, 1:].numel()
            start += ids.shape[0]
            bar.update(ids.shape[0])
            per_pass = max(1, min(batch_size, LOGITS_BYTES // max(1, logits[0].nbytes)))
            del logits
    model.train(was_training)
    return nll, count


def summed_nll(logits: Tensor, ids: Tensor) -> float:
    """The summed negative log-likelihood of each next token of ``ids`` (batch, length) under
    ``logits`` (batch, length, vocab), a chunk of tokens at a time in float32 (:data:`LOSS_CHUNK_BYTES`):
    no float32 copy of the whole logits, no log-softmax of all of them at once."""
    step = max(1, LOSS_CHUNK_BYTES // (4 * logits.shape[-1]))
    total = 0.0
    for row in range(logits.shape[0]):
        for start in range(0, logits.shape[1] - 1, step):
            end = min(start + step, logits.shape[1] - 1)
            loss = nn.functional.cross_entropy(
                logits[row, start:end].float(), ids[row, start + 1 : end + 1], reduction="sum"
            )
            total += float(loss)
    return total


def sparsity_by_layer_type(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per layer type inside the decoder blocks, plus ``"overall"``.

    Types are the names of :func:`optimum_maiht.report.layer_type` (block and expert indices removed), as
    in the report and the model card; every matrix-shaped weight of the blocks counts (the linear layers'
    and fused experts' weights, routers included), so a weight left dense shows as a low figure.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    owners = {id(m.weight): n for n, m in blocks.named_modules() if isinstance(m, linear_types())}
    for name, param in blocks.named_parameters():
        if param.dim() < 2:
            continue
        kind = layer_type(f"{blocks_name}.{owners.get(id(param), name)}")
        if param.dim() == 3:
            kind += "[*]"
        zeros[kind] += int((param == 0).sum())
        total[kind] += param.numel()
    result = {kind: zeros[kind] / total[kind] for kind in sorted(total)}
    result["overall"] = sum(zeros.values()) / max(1, sum(total.values()))
    return result
