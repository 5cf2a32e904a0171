"""The Gram accumulation every calibration pass uses (optimum_maiht/gram.py)."""

import pytest
import torch

from optimum_maiht.gram import GRAM_TILE, add_gram, finite_rows


@pytest.mark.parametrize("width", [48, 2 * GRAM_TILE, 2 * GRAM_TILE + 1, 3 * GRAM_TILE + 37])
def test_the_gram_is_x_transpose_x_accumulated_over_batches(width):
    torch.manual_seed(0)
    batches = [torch.randn(rows, width) for rows in (64, 1, 33)]
    gram = torch.zeros(width, width)
    for x in batches:
        add_gram(gram, x)
    x = torch.cat(batches).double()
    torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-4)
    if width > 2 * GRAM_TILE:  # tiled: every entry off the diagonal tiles is the mirror of its twin
        tile = torch.arange(width) // GRAM_TILE
        off_diagonal = tile[:, None] != tile[None, :]
        assert torch.equal(gram[off_diagonal], gram.T[off_diagonal])


def test_only_the_non_finite_rows_are_dropped():
    x = torch.randn(6, 5)
    x[1, 2], x[3, 0], x[4, 4] = float("inf"), float("nan"), float("-inf")
    kept, dropped = finite_rows(x)
    assert dropped == 3
    assert torch.equal(kept, x[[0, 2, 5]])
    assert finite_rows(x[[0, 2, 5]])[1] == 0


def test_a_finite_row_whose_sum_overflows_is_kept():
    x = torch.tensor([[3e38, 3e38, 1.0], [1.0, 2.0, 3.0]])
    assert not torch.isfinite(x.sum(dim=1)).all()  # the fast check alone would drop it
    kept, dropped = finite_rows(x)
    assert dropped == 0 and torch.equal(kept, x)
