"""Perplexity and measured sparsity of any causal LM, dense or pruned."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .constants import DEFAULT_EVAL_TEXT
from .data import CalibrationData, calibration_text, special_prefix, token_windows, tokenize
from .model_utils import find_decoder_blocks, linear_types
from .report import layer_type


def perplexity(
    model: nn.Module,
    tokenizer: Any | None,
    data: CalibrationData = DEFAULT_EVAL_TEXT,
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
