"""One sparse weight as kept values plus a packed bitmask (docs/design.md, "On disk"): the tensor-level
encoding of the compact format, in both directions. numpy does the masking and the bit packing: several
times faster than torch on a CPU."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_bitmask(mask: Tensor) -> Tensor:
    """Pack a bool ``[rows, cols]`` mask into uint8 ``[rows, ceil(cols / 8)]``, little bit order."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=1, bitorder="little"))


def unpack_bitmask(packed: Tensor, cols: int) -> Tensor:
    """Inverse of :func:`pack_bitmask`: a bool ``[rows, cols]`` mask."""
    return torch.from_numpy(_unpack(packed, cols))


def _unpack(packed: Tensor, cols: int) -> np.ndarray:
    return np.unpackbits(packed.numpy(), axis=1, count=cols, bitorder="little").view(bool)


def raw_bits(tensor: Tensor) -> np.ndarray:
    """The tensor's raw bits as a numpy integer array (numpy has no bfloat16)."""
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()]).numpy()


def _kept(weight: Tensor) -> np.ndarray:
    """Where the weight is not zero (``+0.0`` and ``-0.0`` are zeros, NaN is kept), as numpy bools."""
    if not weight.is_floating_point():
        raise TypeError(f"only floating point weights can be compressed, got {weight.dtype}")
    return (weight != 0).numpy()


def _as_rows(weight: Tensor) -> Tensor:
    """A 2-D weight as it is; a 3-D stack ``(E, a, b)`` as one ``(E * a, b)`` matrix (the experts' rows in
    order), detached, on the CPU and contiguous."""
    if weight.dim() not in (2, 3):
        raise ValueError(f"expected a 2-D weight or a 3-D stack of experts, got shape {tuple(weight.shape)}")
    weight = weight.detach().cpu().contiguous()
    return weight.reshape(-1, weight.shape[-1]) if weight.dim() == 3 else weight


def compress_unstructured(weight: Tensor) -> dict[str, Tensor]:
    """Bitmask encoding of a 2-D weight, or of a 3-D stack ``(E, a, b)`` as ``E * a`` rows, in its own
    layout (suffix -> tensor); ``shape`` is the weight's whole shape."""
    rows = _as_rows(weight)
    mask = _kept(rows)
    counts = mask.sum(1, dtype=np.int64)
    values = torch.from_numpy(raw_bits(rows)[mask]).view(rows.dtype)
    return {
        "compressed": values,
        "bitmask": torch.from_numpy(np.packbits(mask, axis=1, bitorder="little")),
        "row_offsets": torch.from_numpy(np.cumsum(counts) - counts),
        "shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def compress_nm(weight: Tensor, n: int, m: int, name: str = "weight") -> dict[str, Tensor]:
    """N:M encoding of an (out, in) weight, or of a stack of E such matrices ``(E, out, in)``: exactly N
    values per group of M consecutive input weights and the packed positions.

    A group with fewer than N nonzeros is padded with its first zeros; a group with more is an error that
    names the weight (and, for a stack, the expert). The caller passes the (out, in) view: a ``Conv1D``
    weight or (in, out) expert slices are transposed first.
    """
    rows = _as_rows(weight)
    height, inp = rows.shape
    if inp % m:
        raise ValueError(
            f"{name}: input size {inp} is not a multiple of M={m}; "
            "declare it unstructured (None) in sparse_layers"
        )
    mask = _kept(rows).reshape(height, inp // m, m)
    counts = mask.sum(-1)
    worst = int(counts.max()) if counts.size else 0
    if worst > n:
        raise ValueError(_crowded_group_message(name, weight, counts, n, m, worst))
    if counts.size and int(counts.min()) < n:
        zeros = ~mask
        mask |= zeros & (np.cumsum(zeros, -1) <= (n - counts)[..., None])
    mask = mask.reshape(height, inp)
    values = torch.from_numpy(raw_bits(rows)[mask].reshape(height, inp // m * n)).view(rows.dtype)
    return {
        "compressed": values,
        "bitmask": torch.from_numpy(np.packbits(mask, axis=1, bitorder="little")),
        "shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def _crowded_group_message(name: str, weight: Tensor, counts: np.ndarray, n: int, m: int, worst: int) -> str:
    """The error for a weight with a group of M input weights holding more than N nonzeros."""
    where = ""
    if weight.dim() == 3:  # a stack of experts: say which one, and how (in, out) slices are declared
        row = int(np.argmax((counts > n).any(-1)))
        where = (
            f" (expert {row // weight.shape[1]}; fused expert slices stored (in, out) must be named in "
            "save_compressed's transposed)"
        )
    return (
        f"{name} is not {n}:{m} sparse: a group of {m} input weights has {worst} nonzeros{where}; "
        "declare it unstructured (None) in sparse_layers or check the pruning pattern"
    )
