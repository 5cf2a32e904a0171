"""What every layer of the package needs to know about a model: its linear layers, decoder blocks, device
and where it comes from. Nothing here prunes, saves or evaluates; the pipeline, the formats, the kernels,
the evaluation and the CLI all build on it (see docs/design.md, "Layers of the code").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)


def linear_types() -> tuple[type, ...]:
    """The module types the pipeline prunes: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2 family)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family) stores its weight transposed: (in, out)."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as (out, in), a view for both ``nn.Linear`` and ``Conv1D``."""
    return module.weight.t() if is_conv1d(module) else module.weight


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated decoder blocks: the ``nn.ModuleList`` of one module type holding the most parameters."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (name, module, size)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of repeated layers): "
            "mAIHT prunes the linear layers of a transformer's decoder blocks"
        )
    return best[0], best[1]


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (``LayerNorm``, ``RMSNorm`` and each family's own: named so by transformers)."""
    return "norm" in type(module).__name__.lower() and not any(True for _ in module.children())


def final_norm(model: nn.Module, blocks_name: str) -> nn.Module | None:
    """The normalisation layer that reads the last block's output: the one norm among the direct children of
    the module holding the blocks (``model.norm``, ``transformer.ln_f``, ``decoder.final_layer_norm``...);
    ``None`` when there is not exactly one."""
    parent = model.get_submodule(blocks_name.rpartition(".")[0]) if "." in blocks_name else model
    norms = [m for m in parent.children() if is_norm(m)]
    return norms[0] if len(norms) == 1 else None


def block_prefix(blocks_name: str, index: int) -> str:
    """The full-name prefix of block ``index``: ``"model.layers.3."``."""
    return f"{blocks_name}.{index}." if blocks_name else f"{index}."


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` (or ``"auto"``): CUDA when available, else CPU; asking for CUDA without CUDA is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; use device='cpu'")
    return device


def looks_like_local_path(source: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else (``./x``, ``/x``, ``~/x``, ``a/b/c``) is a
    path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def check_model_source(source: str | os.PathLike) -> Path | None:
    """The local model folder ``source`` names, ``None`` for a Hub id; a clear error for anything else.

    Checked before loading anything: a file, a folder without ``config.json`` and a path that does not
    exist are refused with the fix.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        raise ValueError(f"{text} is a file; give the model's folder (with config.json) or a Hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{text} has no config.json: is it a transformers model folder?")
        return path
    if looks_like_local_path(text):
        raise FileNotFoundError(f"model folder not found: {text}")
    return None


def load_tokenizer(source: str | os.PathLike | None) -> Any | None:
    """The tokenizer saved with a model (a folder or a Hub id), or ``None`` when there is none: the caller
    then calibrates with token ids."""
    if not source:
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        logger.info("no tokenizer loaded from %s (%s); calibrate with token ids", source, err)
        return None


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """A dtype as configs, reports and flags spell it: ``"bfloat16"`` for ``torch.bfloat16``, ``"auto"`` for
    ``None`` or ``"auto"``."""
    return "auto" if dtype in (None, "auto") else str(dtype).removeprefix("torch.")
