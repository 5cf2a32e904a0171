"""The Gram matrix ``H = X^T X`` of a layer's calibration inputs, accumulated one batch of rows at a time.

These products are a large share of a calibration pass's arithmetic (the widest input, an MLP's
down projection, costs ``2 * rows * in^2`` FLOPs per batch), so two things are done once here for the
linear layers (:class:`optimum_maiht.pipeline.statistics.GramCollector`) and the experts
(:class:`optimum_maiht.experts.ExpertGramRecorder`) alike:

* ``H`` is symmetric: only its tiles on and above the diagonal are multiplied, the ones below are copied
  from them (about 40% fewer FLOPs for a 2048-wide input);
* rows with a non-finite activation (fp16 overflow) are left out, found with one row sum when there is
  none (a sum is finite only if every term is).
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAM_TILE = 256
"""Rows of ``H`` per product: narrower tiles skip more of the lower triangle but multiply less efficiently."""


def finite_rows(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (one activation per row) without its rows that hold a non-finite value, and how many those
    were."""
    if bool(torch.isfinite(x.sum(dim=1)).all()):  # exact: a finite row sum means finite terms
        return x, 0
    finite = torch.isfinite(x).all(dim=1)  # a non-finite sum: find the rows (or a finite row that overflowed)
    dropped = int((~finite).sum())
    return (x, 0) if dropped == 0 else (x[finite], dropped)


def add_gram(gram: Tensor, x: Tensor) -> None:
    """``gram += x^T x`` in place, for ``x`` of shape ``(rows, n)`` and a symmetric ``gram`` of shape
    ``(n, n)``, both float32 on one device: the row strips from the diagonal rightwards are multiplied, and
    the lower triangle below each strip is mirrored from it."""
    n = x.shape[1]
    if n <= 2 * GRAM_TILE:
        gram.addmm_(x.t(), x)
        return
    for i in range(0, n, GRAM_TILE):
        j = min(i + GRAM_TILE, n)
        gram[i:j, i:].addmm_(x[:, i:j].t(), x[:, i:])
        gram[j:, i:j].copy_(gram[i:j, j:].t())
