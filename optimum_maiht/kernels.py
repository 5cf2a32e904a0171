"""2:4 sparse tensor cores: swap 2:4 ``nn.Linear`` weights for ``torch.sparse`` semi-structured tensors.

NVIDIA GPUs of compute capability 8.0 or newer (Ampere, Hopper, ...) multiply a matrix that keeps at most
2 of every 4 consecutive input weights at up to twice the dense speed. torch exposes this as
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt backend; the CUTLASS backend when cuSPARSELt is
missing, compute capability 8.x only). Only float16 / bfloat16 weights are converted, each weight's rows
and columns must be multiples of the backend's minimum block, and every converted layer is checked
against the dense result on a random probe. Everything here imports and runs on a CPU-only install: it
then converts nothing and says why.

The converted model is meant for inference: reload the checkpoint to train or save it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from .model_utils import is_conv1d

logger = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 0)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_PROBE_ROWS = 32
_PROBE_TOLERANCE = 1e-2


def not_2of4_reason(weight: Tensor) -> str | None:
    """Why an (out, in) weight is not 2:4 sparse (at most 2 nonzeros in every 4 input weights), or None."""
    if weight.dim() != 2:
        return f"weight has {weight.dim()} dimensions, not 2"
    rows, cols = weight.shape
    if cols % 4:
        return f"input size {cols} is not a multiple of 4"
    crowded = int(((weight.detach().reshape(rows, cols // 4, 4) != 0).sum(-1) > 2).sum())
    if crowded:
        return (f"not 2:4 sparse: {crowded} of {rows * cols // 4} groups of 4 input weights have more than "
                "2 nonzeros")
    return None


def _backend(device: torch.device) -> tuple[Any, str]:
    """The semi-structured tensor class usable on ``device`` and its name, or ``(None, reason)``."""
    if not torch.cuda.is_available():
        return None, ("CUDA is not available (CPU-only torch build or no NVIDIA GPU): 2:4 sparse kernels "
                      "need a GPU of compute capability >= 8.0")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return None, (f"{torch.cuda.get_device_name(device)} ({device}) has compute capability "
                      f"{capability[0]}.{capability[1]}; 2:4 sparse tensor cores need >= 8.0 "
                      "(Ampere or newer)")
    sparse = torch.sparse
    if torch.backends.cusparselt.is_available():
        return sparse.SparseSemiStructuredTensorCUSPARSELT, "cusparselt"
    if capability[0] == 8:
        return sparse.SparseSemiStructuredTensorCUTLASS, "cutlass"
    return None, (f"this torch build has no cuSPARSELt, and torch's CUTLASS 2:4 kernels run on compute "
                  f"capability 8.x only (this GPU: {capability[0]}.{capability[1]}); install a CUDA torch "
                  "wheel that ships cuSPARSELt")


def _convert(module: nn.Linear, backend: Any, name: str) -> tuple[Tensor | None, str | None]:
    """The semi-structured weight for ``module`` (checked on a probe), or ``(None, reason)``."""
    weight = module.weight.detach()
    if weight.dtype not in SUPPORTED_DTYPES:
        return None, (f"dtype {weight.dtype} is not supported by the 2:4 kernels; load the model with "
                      "dtype=torch.float16 or torch.bfloat16")
    if module.bias is not None and module.bias.dtype != weight.dtype:
        return None, f"bias dtype {module.bias.dtype} differs from the weight's {weight.dtype}"
    limits = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    rows, cols = weight.shape
    if limits is not None and (rows % limits.sparse_min_rows or cols % limits.sparse_min_cols):
        return None, (f"shape (out={rows}, in={cols}) is not supported by {backend.BACKEND}: out must be a "
                      f"multiple of {limits.sparse_min_rows} and in a multiple of {limits.sparse_min_cols}")
    try:
        sparse = backend.from_dense(weight.contiguous())
        probe = torch.randn(_PROBE_ROWS, cols, dtype=weight.dtype, device=weight.device,
                            generator=torch.Generator(weight.device).manual_seed(0))
        expected = nn.functional.linear(probe, weight, module.bias).float()
        got = nn.functional.linear(probe, sparse, module.bias).float()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        return None, f"the {backend.BACKEND} conversion or matmul failed: {err}"
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    if not error <= _PROBE_TOLERANCE:
        return None, (f"the {backend.BACKEND} kernel's output differs from the dense one "
                      f"(relative error {error:.3g})")
    logger.debug("%s: converted to %s (probe relative error %.2g)", name, backend.BACKEND, error)
    return sparse, None


def enable_2of4_kernels(model: nn.Module, *, strict: bool = False) -> dict[str, Any]:
    """Replace the weight of every 2:4-sparse ``nn.Linear`` by a semi-structured sparse tensor, in place.

    Layers that are not 2:4 (embeddings, ``lm_head``, unpruned or unstructured layers), ``Conv1D`` layers
    (GPT-2 family) and tied weights stay dense. Returns ``{"backend": name or None, "converted": [layer
    names], "skipped": {layer name: reason}}`` and logs the reasons. With ``strict=True``, raises
    ``RuntimeError`` with the reasons when a 2:4 layer could not be converted or none was.
    """
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    converted: list[str] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}  # 2:4 layers left dense
    backends: dict[torch.device, tuple[Any, str]] = {}
    used: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            continue
        weight = module.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            converted.append(name)
            used.add(weight.BACKEND)
            continue
        if is_conv1d(module):
            skipped[name] = "Conv1D (GPT-2 family) stores its weight as (in, out); only nn.Linear converts"
            continue
        reason = not_2of4_reason(weight)
        if reason is None and owners[id(weight)] > 1:
            reason = "the weight is tied to another module (e.g. the input embedding); it stays dense"
        if reason is not None:
            skipped[name] = reason
            continue
        sparse = None
        if weight.device.type != "cuda":
            reason = f"the weight is on {weight.device}: move the model to a CUDA GPU (model.to('cuda'))"
            if not torch.cuda.is_available():
                reason = _backend(weight.device)[1]
        else:
            if weight.device not in backends:
                backends[weight.device] = _backend(weight.device)
            backend, reason = backends[weight.device]
            if backend is not None:
                sparse, reason = _convert(module, backend, name)
                used.add(backend.BACKEND)
        if sparse is None:
            skipped[name] = failed[name] = reason
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)

    for name, reason in skipped.items():
        logger.info("2:4 kernels: %s stays dense: %s", name, reason)
    logger.info("2:4 kernels: %d layer(s) converted, %d left dense", len(converted), len(skipped))
    if failed:
        summary = _summary(failed)
        if strict:
            raise RuntimeError(f"{len(failed)} 2:4 sparse layer(s) could not use the 2:4 kernels: {summary}")
        logger.warning("%d 2:4 sparse layer(s) stay dense: %s", len(failed), summary)
    elif strict and not converted:
        raise RuntimeError(f"no layer was converted to the 2:4 kernels: {_summary(skipped)}")
    return {"backend": ", ".join(sorted(used)) or None, "converted": converted, "skipped": skipped}


def _summary(reasons: dict[str, str]) -> str:
    """The three most common reasons, with how many layers each."""
    return "; ".join(f"{count} layer(s): {why}" for why, count in Counter(reasons.values()).most_common(3))
