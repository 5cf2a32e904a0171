"""Perplexity in bounded memory: the loss over chunks of tokens without a float32 copy of all logits,
and no more windows per forward pass than ``LOGITS_BYTES`` holds; the same perplexity as the plain
computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer

from optimum_maiht import evaluation
from optimum_maiht.evaluation import perplexity, summed_nll

TEXT = ["".join(chr(33 + (i * 7) % 90) for i in range(128 * 7))]


def plain_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """What perplexity computed before: one cross entropy over every float32 logit at once."""
    flat = logits[:, :-1].float()
    return float(
        torch.nn.functional.cross_entropy(
            flat.reshape(-1, flat.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_loss_over_all_logits(monkeypatch, dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 97, generator=generator).to(dtype)
    ids = torch.randint(0, 97, (3, 50), generator=generator)
    monkeypatch.setattr(evaluation, "LOSS_CHUNK_BYTES", 97 * 4 * 7)  # chunks of 7 tokens
    assert summed_nll(logits, ids) == pytest.approx(plain_nll(logits, ids), rel=1e-6)


def test_windows_per_pass_are_bounded_by_the_logits_budget(monkeypatch):
    model, tokenizer = make_tiny_model("llama"), make_tokenizer()
    sizes = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    window_logits = 128 * 128 * 4  # one window: 128 tokens x 128 vocabulary, float32
    monkeypatch.setattr(evaluation, "LOGITS_BYTES", 2 * window_logits)
    bounded = perplexity(model, tokenizer, TEXT, 128, batch_size=8)
    assert sizes == [1, 2, 2, 2], "the first window alone, then as many as the budget holds"
    sizes.clear()
    monkeypatch.setattr(evaluation, "LOGITS_BYTES", 2**40)
    assert perplexity(model, tokenizer, TEXT, 128, batch_size=8) == pytest.approx(bounded, rel=1e-6)
    assert sizes == [1, 6], "never more than batch_size"
    windows = evaluation.perplexity_windows(model, tokenizer, TEXT, 128, None)
    with torch.no_grad():
        reference = math.exp(plain_nll(model(input_ids=windows).logits, windows) / windows[:, 1:].numel())
    assert bounded == pytest.approx(reference, rel=1e-6)
