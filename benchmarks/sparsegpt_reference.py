"""Our own short reimplementation of SparseGPT (Frantar & Alistarh, ICML 2023), for per-layer comparison only.

This is NOT the peer used in the perplexity table (that is llm-compressor's ``SparseGPTModifier``, see
``quality.py``). It exists so that ``layer_errors.py`` can score SparseGPT's weights on exactly the same
Gram matrix ``H`` as mAIHT, Wanda and magnitude, which a full-model peer run cannot give us. Written from the
paper's Algorithm 1:

* dampen ``H`` by 1% of its mean diagonal; dead inputs (``H_jj = 0``) get ``H_jj = 1`` and weight 0;
* take the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): row ``j`` of ``U`` holds the OBS
  update of the columns right of ``j`` after column ``j`` is fixed, already divided as the recursion needs;
* sweep the columns left to right in lazy batches of 128: inside a batch each column is masked, its error
  ``(w - q) / U_jj`` is spread over the batch's remaining columns; the batch's accumulated error is applied
  to all later columns with one matmul;
* the mask is chosen adaptively, once per batch of 128 columns, by the OBS saliency ``w^2 / U_jj^2`` on the
  weights as updated so far: over the whole batch (``mask_scope="block"``, the paper) or for each row
  (``mask_scope="row"``); N:M chooses the N survivors of every group of M columns when the sweep reaches it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_scope: str = "block",
) -> Tensor:
    """SparseGPT-pruned copy of ``weight`` (out x in) given the Gram matrix ``hessian`` (in x in)."""
    if mask_scope not in ("block", "row"):
        raise ValueError(f"mask_scope must be 'block' or 'row', got {mask_scope!r}")
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float().to(w.device)
    cols = w.shape[1]
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        raise ValueError(f"input size {cols} and blocksize {blocksize} must be multiples of M={nm[1]}")

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * float(torch.diagonal(h).mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        block = w[:, start:stop].clone()
        u_block = u[start:stop, start:stop]
        diag = torch.diagonal(u_block)
        errors = torch.zeros_like(block)
        prune = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            prune = _lowest(block.pow(2) / diag.pow(2), sparsity, mask_scope)
        for j in range(stop - start):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                saliency = block[:, j : j + m].pow(2) / diag[j : j + m].pow(2)
                drop = saliency.topk(m - n, dim=1, largest=False).indices
                prune[:, j : j + m].scatter_(1, drop, True)
            col = block[:, j]
            kept = col.masked_fill(prune[:, j], 0.0)
            err = (col - kept) / diag[j]
            block[:, j:] -= err[:, None] * u_block[j, j:][None, :]
            block[:, j] = kept
            errors[:, j] = err
        w[:, start:stop] = block
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w.to(weight.dtype)


def _lowest(saliency: Tensor, sparsity: float, scope: str) -> Tensor:
    """Mask of the ``sparsity`` share of lowest saliencies, over the whole block or per row."""
    if scope == "row":
        k = round(sparsity * saliency.shape[1])
        mask = torch.zeros_like(saliency, dtype=torch.bool)
        if k:
            mask.scatter_(1, saliency.topk(k, dim=1, largest=False).indices, True)
        return mask
    k = round(sparsity * saliency.numel())
    mask = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    if k:
        mask[saliency.flatten().topk(k, largest=False).indices] = True
    return mask.view_as(saliency)
