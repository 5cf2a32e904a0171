"""mAIHT on layer problems: monotone objective, exact patterns, beats the baselines, exact refit."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

from optimum_maiht.model_utils import find_decoder_blocks
from optimum_maiht.sequential import GramCollector
from optimum_maiht.solvers import LayerSpec, magnitude_prune, maiht, project, relative_output_error, wanda
from optimum_maiht.solvers.maiht import column_scale, lambda_max

SETTINGS = [  # (sparsity, nm, scope)
    (0.5, None, "row"),
    (0.5, None, "layer"),
    (0.7, None, "row"),
    (0.5, (2, 4), "row"),
    (0.5, (4, 8), "row"),
]


def synthetic_layer(out: int = 96, din: int = 128, tokens: int = 2048, seed: int = 0):
    """Correlated inputs with a few outlier features, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 32, generator=g) @ torch.randn(32, din, generator=g)
    x += 0.5 * torch.randn(tokens, din, generator=g)
    x[:, :3] *= 25.0
    w = torch.randn(out, din, generator=g) * 0.05
    return w, x.T @ x


def model_layer():
    """A real layer problem: the weight and Gram matrix of a tiny Llama's MLP up-projection."""
    model = make_tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    layer = blocks[0].mlp.up_proj
    collector = GramCollector({"up": layer})
    with torch.no_grad():
        model(calibration_ids(16, 32))
    collector.remove()
    return layer.weight.detach().clone(), collector.gram["up"]


LAYERS = {"synthetic": synthetic_layer, "tiny-llama-up_proj": model_layer}


def assert_pattern(weight: torch.Tensor, sparsity: float, nm, scope: str) -> None:
    out, din = weight.shape
    zeros = weight == 0
    if nm is not None:
        n, m = nm
        assert (zeros.reshape(out, din // m, m).sum(-1) == m - n).all(), "every group keeps exactly N"
    elif scope == "row":
        assert (zeros.sum(1) == round(sparsity * din)).all(), "every row has the exact sparsity"
    else:
        assert int(zeros.sum()) == round(sparsity * out * din)


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("sparsity,nm,scope", SETTINGS)
def test_monotone_exact_and_better_than_baselines(layer, sparsity, nm, scope):
    w, h = LAYERS[layer]()
    spec = LayerSpec(sparsity, nm, scope)
    result = maiht(w, h, spec, iterations=20, refit_iterations=30)

    history = result.history
    assert len(history) == 1 + 20 + 30
    assert all(b <= a for a, b in zip(history, history[1:], strict=False)), "objective increased"
    assert history[-1] < history[0]

    assert_pattern(result.weight, sparsity, nm, scope)
    assert torch.equal(result.mask, result.weight != 0)
    assert not torch.signbit(result.weight[~result.mask]).any(), "pruned entries are +0.0, never -0.0"
    assert result.weight.dtype == w.dtype and result.weight.shape == w.shape

    err = relative_output_error(result.weight, w, h)
    assert err == pytest.approx(result.error, rel=1e-4)
    wanda_error = relative_output_error(wanda(w, h, spec).weight, w, h)
    magnitude = relative_output_error(magnitude_prune(w, spec), w, h)
    assert result.error_wanda == pytest.approx(wanda_error, rel=1e-5), "the first projection is Wanda's mask"
    assert err < 0.9 * wanda_error and err < 0.9 * magnitude


def test_refit_reaches_least_squares_optimum_on_the_support():
    w, h = synthetic_layer(out=8, din=24, tokens=500)
    result = maiht(w, h, LayerSpec(0.5), iterations=0, refit_iterations=40, ridge=0.0)
    mask = project(w * column_scale(h, 0.0)[0], LayerSpec(0.5))  # Wanda's mask, unchanged without iterations
    assert torch.equal(result.mask, mask)
    h64, w64 = h.double(), w.double()
    for i in range(w.shape[0]):
        s = mask[i]
        # minimise (w - w0) H (w - w0)^T with w zero off s:  H_ss w_s = H_s: w0
        exact = torch.linalg.solve(h64[s][:, s], h64[s] @ w64[i])
        torch.testing.assert_close(result.weight[i, s].double(), exact, rtol=2e-3, atol=1e-5)


def test_step_is_safe_on_badly_scaled_and_ill_conditioned_problems():
    w, h = synthetic_layer()
    h = h * 1e8
    h[:, 5] = h[5, :] = h[:, 6] = h[6, :] = 0  # make two features identical-looking, plus scale
    h[5, 5] = h[6, 6] = 1e8
    result = maiht(w, h, LayerSpec(0.5), ridge=0.0)
    assert torch.isfinite(result.weight).all()
    assert all(b <= a for a, b in zip(result.history, result.history[1:], strict=False))
    _, g = column_scale(h, 0.0)
    assert result.step_size <= 1.0 / torch.linalg.eigvalsh(g.double()).max().item() * 1.001


def test_lambda_max_matches_eigvalsh():
    _, h = synthetic_layer()
    _, g = column_scale(h, 0.1)
    assert lambda_max(g) == pytest.approx(torch.linalg.eigvalsh(g.double()).max().item(), rel=1e-3)


def test_dead_features_give_no_nan_and_are_pruned_first():
    w, h = synthetic_layer(out=16, din=64)
    h[:, :8] = 0
    h[:8, :] = 0
    result = maiht(w, h, LayerSpec(0.25))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, :8] == 0).all(), "inputs that are always zero carry no signal: prune them"


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_penalty_formulation_reaches_exact_sparsity_and_beats_wanda(scope):
    w, h = synthetic_layer()
    result = maiht(w, h, LayerSpec(0.6, scope=scope), formulation="penalty")
    assert len(result.history) == 1 + 20 + 1 + 30, "the final top-k adds one entry"
    assert_pattern(result.weight, 0.6, None, scope)
    assert torch.equal(result.mask, result.weight != 0)
    assert result.error < wanda(w, h, LayerSpec(0.6, scope=scope)).error


def test_projection_keeps_exact_count_with_ties():
    values = torch.ones(4, 8)
    assert (project(values, LayerSpec(0.5)).sum(1) == 4).all()
    assert (project(values, LayerSpec(0.5, (2, 4))).reshape(4, 2, 4).sum(-1) == 2).all()
    assert int(project(values, LayerSpec(0.25, scope="layer")).sum()) == 24
    with pytest.raises(ValueError, match="scope"):
        LayerSpec(0.5, scope="column")
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        project(torch.ones(2, 6), LayerSpec(0.5, (2, 4)))


def test_bad_shapes_and_options_are_rejected():
    w, h = synthetic_layer(out=4, din=8, tokens=64)
    with pytest.raises(ValueError, match="gram"):
        maiht(w, h[:4, :4], LayerSpec(0.5))
    with pytest.raises(ValueError, match="formulation"):
        maiht(w, h, LayerSpec(0.5), formulation="lasso")
    with pytest.raises(ValueError, match="unstructured"):
        maiht(w, h, LayerSpec(0.5, (2, 4)), formulation="penalty")


def test_half_precision_weights_come_back_in_their_dtype():
    w, h = synthetic_layer(out=16, din=32)
    result = maiht(w.to(torch.bfloat16), h, LayerSpec(0.5, (2, 4)))
    assert result.weight.dtype == torch.bfloat16
    assert_pattern(result.weight, 0.5, (2, 4), "row")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
def test_cuda_matches_cpu():
    w, h = synthetic_layer()
    cpu = maiht(w, h, LayerSpec(0.5, (2, 4)))
    gpu = maiht(w.cuda(), h.cuda(), LayerSpec(0.5, (2, 4)))
    assert gpu.weight.is_cuda
    assert gpu.error == pytest.approx(cpu.error, rel=1e-2)
