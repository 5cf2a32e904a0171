"""The dtype a block's passes run in (``MAIHTConfig.compute_dtype``; docs/design.md, "The dtype of the
passes").

A float32 block's calibration passes (the statistics, the dense targets of the refit, the propagation to
the next block) and the refit's forward and backward passes run under bfloat16 autocast where the compute
device multiplies bfloat16 natively: only the matrix products change, the outputs stay float32, and the
weights, Adam's moments and the Gram matrices stay float32. A half-precision block runs in its own dtype.
The dtype is decided once per block, before its first pass (:func:`block_dtype`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from ..configuration import MAIHTConfig
from ..distributed import Parallel
from ..model_utils import dtype_name
from .context import BlockContext

logger = logging.getLogger(__name__)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU with bfloat16 (not emulated), a
    CPU with AVX512-BF16 or AMX tiles (elsewhere bfloat16 runs through float32 conversions, slower than
    float32 itself)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":  # torch's own probes (as its compiler uses them); absent: not known to be fast
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def resolve_compute_dtype(device: torch.device, choice: str) -> torch.dtype:
    """The dtype of a float32 block's passes on ``device`` for ``compute_dtype`` = ``choice``: ``"auto"`` is
    bfloat16 where the device multiplies it natively (:func:`native_bfloat16`), else float32. Measured on
    the 2-core AMD EPYC (AVX512-BF16): a refit epoch in 0.62-0.73x its float32 time, with the same held-out
    errors under the rate's decay; a Gemma3-270M calibration pass in 0.60x (docs/design.md)."""
    if choice == "bfloat16" or (choice == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return torch.float32


def block_dtype(ctx: BlockContext, config: MAIHTConfig, parallel: Parallel) -> torch.dtype:
    """The dtype of the block's passes (:attr:`BlockContext.autocast` for its calibration passes, the
    refit's too): ``config.compute_dtype`` resolved on the compute device, probed on the block's first
    batch and agreed by every rank (:func:`agreed_dtype`). Decided before the first pass, so that the
    statistics, the dense targets, the refit and the propagation all run in it."""
    device = ctx.placement.compute
    wanted = resolve_compute_dtype(device, config.compute_dtype)

    def forward(k: int) -> Tensor:
        return ctx.calls[k].run(ctx.block, ctx.placement.fetch(ctx.hidden[k]))

    return agreed_dtype(forward, len(ctx.hidden), wanted, device, parallel, ctx.index)


def agreed_dtype(
    forward: Callable[[int], Tensor],
    pieces: int,
    dtype: torch.dtype,
    device: torch.device,
    parallel: Parallel,
    index: int,
) -> torch.dtype:
    """``dtype`` where every rank wants it and the block's forward runs under autocast to it on every rank,
    else float32 (the ranks' refit steps are summed, so they must agree). A forward that fails under
    autocast (a model's own code writing a bfloat16 result into a float32 buffer, say) is reported with a
    warning. Probed on ``forward(0)``, without gradients: the cost of one batch's forward."""
    reason = None
    if dtype != torch.float32 and pieces:
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
                forward(0)
        except (RuntimeError, TypeError, ValueError) as err:
            reason = f"{type(err).__name__}: {err}"
    plain, failed = parallel.sum([1.0 if dtype == torch.float32 else 0.0, 0.0 if reason is None else 1.0])
    if failed:
        logger.warning(
            "block %d: its forward fails under %s autocast (%s); running it in float32",
            index,
            dtype_name(dtype),
            reason or "on another rank",
        )
    return torch.float32 if plain or failed else dtype
