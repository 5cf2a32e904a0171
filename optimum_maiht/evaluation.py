"""Perplexity and measured sparsity of any causal LM, dense or pruned."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import CalibrationData, calibration_text, special_prefix, token_windows, tokenize


def perplexity(
    model: nn.Module,
    tokenizer: Any | None,
    data: CalibrationData = "wikitext2-test",
    sequence_length: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Perplexity over consecutive non-overlapping windows of ``sequence_length`` tokens.

    ``data`` is anything :func:`optimum_maiht.data.calibration_text` accepts (default: the bundled
    WikiText-2 test excerpt). Each window starts with the tokenizer's special prefix (BOS), as in training.
    """
    text = calibration_text(data)
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("evaluating on text needs a tokenizer")
        prefix = special_prefix(tokenizer)
        windows = token_windows(tokenize(tokenizer, text), max_windows, sequence_length, prefix)
    elif text.dim() == 2:
        windows = text[:max_windows] if max_windows else text
    else:
        windows = token_windows(text, max_windows, sequence_length)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
            ids = windows[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def sparsity_by_layer_type(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros per linear-layer type (``q_proj``, ``mlp.down_proj``...), plus ``"overall"``.

    Layers are grouped by their name with the block index removed; ``overall`` counts every linear weight
    inside the decoder blocks.
    """
    from .sequential import _linear_types, find_decoder_blocks

    blocks_name, blocks = find_decoder_blocks(model)
    zeros: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for name, module in blocks.named_modules():
        if isinstance(module, _linear_types()):
            kind = re.sub(r"^\d+\.", "", name)
            zeros[kind] += int((module.weight == 0).sum())
            total[kind] += module.weight.numel()
    result = {kind: zeros[kind] / total[kind] for kind in sorted(total)}
    result["overall"] = sum(zeros.values()) / max(1, sum(total.values()))
    return result
