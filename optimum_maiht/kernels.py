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
from dataclasses import dataclass, field
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
        return (
            f"not 2:4 sparse: {crowded} of {rows * cols // 4} groups of 4 input weights have more than "
            "2 nonzeros"
        )
    return None


def _backend(device: torch.device) -> tuple[Any, str]:
    """The semi-structured tensor class usable on ``device`` and its name, or ``(None, reason)``."""
    if not torch.cuda.is_available():
        return None, (
            "CUDA is not available (CPU-only torch build or no NVIDIA GPU): 2:4 sparse kernels "
            "need a GPU of compute capability >= 8.0"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return None, (
            f"{torch.cuda.get_device_name(device)} ({device}) has compute capability "
            f"{capability[0]}.{capability[1]}; 2:4 sparse tensor cores need >= 8.0 "
            "(Ampere or newer)"
        )
    sparse = torch.sparse
    if torch.backends.cusparselt.is_available():
        return sparse.SparseSemiStructuredTensorCUSPARSELT, "cusparselt"
    if capability[0] == 8:
        return sparse.SparseSemiStructuredTensorCUTLASS, "cutlass"
    return None, (
        f"this torch build has no cuSPARSELt, and torch's CUTLASS 2:4 kernels run on compute "
        f"capability 8.x only (this GPU: {capability[0]}.{capability[1]}); install a CUDA torch "
        "wheel that ships cuSPARSELt"
    )


def _convert(module: nn.Linear, backend: Any, name: str) -> tuple[Tensor | None, str | None]:
    """The semi-structured weight for ``module`` (checked on a probe), or ``(None, reason)``."""
    weight = module.weight.detach()
    if weight.dtype not in SUPPORTED_DTYPES:
        return None, (
            f"dtype {weight.dtype} is not supported by the 2:4 kernels; load the model with "
            "dtype=torch.float16 or torch.bfloat16"
        )
    if module.bias is not None and module.bias.dtype != weight.dtype:
        return None, f"bias dtype {module.bias.dtype} differs from the weight's {weight.dtype}"
    limits = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    rows, cols = weight.shape
    if limits is not None and (rows % limits.sparse_min_rows or cols % limits.sparse_min_cols):
        return None, (
            f"shape (out={rows}, in={cols}) is not supported by {backend.BACKEND}: out must be a "
            f"multiple of {limits.sparse_min_rows} and in a multiple of {limits.sparse_min_cols}"
        )
    try:
        sparse = backend.from_dense(weight.contiguous())
        probe = torch.randn(
            _PROBE_ROWS,
            cols,
            dtype=weight.dtype,
            device=weight.device,
            generator=torch.Generator(weight.device).manual_seed(0),
        )
        expected = nn.functional.linear(probe, weight, module.bias).float()
        got = nn.functional.linear(probe, sparse, module.bias).float()
    except (RuntimeError, NotImplementedError, ValueError) as err:
        return None, f"the {backend.BACKEND} conversion or matmul failed: {err}"
    error = float((got - expected).norm() / expected.norm().clamp_min(1e-12))
    if not error <= _PROBE_TOLERANCE:
        return None, (
            f"the {backend.BACKEND} kernel's output differs from the dense one (relative error {error:.3g})"
        )
    logger.debug("%s: converted to %s (probe relative error %.2g)", name, backend.BACKEND, error)
    return sparse, None


_FUSED_EXPERTS_REASON = (
    "fused expert weight (3-D, one slice per expert): the 2:4 kernels replace nn.Linear weights only"
)


@dataclass
class _Outcome:
    """What :func:`enable_2of4_kernels` did: converted layers, the reasons for the others, and which of
    those are 2:4 layers left dense (``failed``: what ``strict`` refuses)."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    backends: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        backend = ", ".join(sorted(self.backends)) or None
        return {"backend": backend, "converted": self.converted, "skipped": self.skipped}


def enable_2of4_kernels(model: nn.Module, *, strict: bool = False) -> dict[str, Any]:
    """Replace the weight of every 2:4-sparse ``nn.Linear`` by a semi-structured sparse tensor, in place.

    Layers that are not 2:4 (embeddings, ``lm_head``, unpruned or unstructured layers), ``Conv1D`` layers
    (GPT-2 family), tied weights and fused expert weights (3-D parameters of mixture-of-experts models)
    stay dense. Returns ``{"backend": name or None, "converted": [layer names], "skipped": {layer or
    parameter name: reason}}`` and logs the reasons. With ``strict=True``, raises ``RuntimeError`` with the
    reasons when a 2:4 ``nn.Linear`` could not be converted or none was.
    """
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    backends: dict[torch.device, tuple[Any, str]] = {}
    outcome = _Outcome()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not is_conv1d(module):
            continue
        weight = module.weight
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):  # converted by an earlier call
            outcome.converted.append(name)
            outcome.backends.add(weight.BACKEND)
            continue
        reason = _dense_reason(module, tied=owners[id(weight)] > 1)
        if reason is not None:
            outcome.skipped[name] = reason
            continue
        sparse, reason, backend = _convert_on_its_device(module, name, backends)
        if backend is not None:
            outcome.backends.add(backend)
        if sparse is None:
            outcome.skipped[name] = outcome.failed[name] = reason
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        outcome.converted.append(name)
    for name, parameter in model.named_parameters():
        if parameter.dim() == 3 and parameter.is_floating_point():
            outcome.skipped[name] = _FUSED_EXPERTS_REASON
    _report(outcome, strict)
    return outcome.as_dict()


def _dense_reason(module: nn.Module, *, tied: bool = False) -> str | None:
    """Why a linear layer is no candidate for the 2:4 kernels (it stays dense, as it should), or ``None``
    for a 2:4 ``nn.Linear`` that is converted where the device allows it. ``tied``: its weight is shared
    with another module (converting it would change that one too)."""
    if is_conv1d(module):
        return "Conv1D (GPT-2 family) stores its weight as (in, out); only nn.Linear converts"
    reason = not_2of4_reason(module.weight)
    if reason is None and tied:
        reason = "the weight is tied to another module (e.g. the input embedding); it stays dense"
    return reason


def _convert_on_its_device(
    module: nn.Linear, name: str, backends: dict[torch.device, tuple[Any, str]]
) -> tuple[Tensor | None, str | None, str | None]:
    """Convert a 2:4 layer with the backend of the device its weight is on.

    Returns ``(sparse weight or None, reason or None, backend name or None)``; the backend is named when
    one was tried, even if the conversion failed. ``backends`` caches the backend of each device.
    """
    device = module.weight.device
    if device.type != "cuda":
        if not torch.cuda.is_available():
            return None, _backend(device)[1], None
        return None, f"the weight is on {device}: move the model to a CUDA GPU (model.to('cuda'))", None
    if device not in backends:
        backends[device] = _backend(device)
    backend, reason = backends[device]
    if backend is None:
        return None, reason, None
    sparse, reason = _convert(module, backend, name)
    return sparse, reason, backend.BACKEND


def _report(outcome: _Outcome, strict: bool) -> None:
    """Log every layer left dense and why; warn (or with ``strict``, raise) when 2:4 layers stay dense,
    and with ``strict`` also when nothing was converted."""
    for name, reason in outcome.skipped.items():
        logger.info("2:4 kernels: %s stays dense: %s", name, reason)
    logger.info(
        "2:4 kernels: %d layer(s) converted, %d left dense", len(outcome.converted), len(outcome.skipped)
    )
    if outcome.failed:
        summary = _summary(outcome.failed)
        if strict:
            raise RuntimeError(
                f"{len(outcome.failed)} 2:4 sparse layer(s) could not use the 2:4 kernels: {summary}"
            )
        logger.warning("%d 2:4 sparse layer(s) stay dense: %s", len(outcome.failed), summary)
    elif strict and not outcome.converted:
        raise RuntimeError(f"no layer was converted to the 2:4 kernels: {_summary(outcome.skipped)}")


def _summary(reasons: dict[str, str]) -> str:
    """The three most common reasons, with how many layers each."""
    return "; ".join(f"{count} layer(s): {why}" for why, count in Counter(reasons.values()).most_common(3))
