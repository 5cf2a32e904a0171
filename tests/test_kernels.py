"""2:4 sparse kernels: a clear no-op with reasons on CPU, close to dense on a capable CUDA GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import calibration_ids, make_tiny_model

from optimum_maiht.kernels import enable_2of4_kernels, not_2of4_reason
from optimum_maiht.model_utils import find_decoder_blocks, is_conv1d, weight_matrix
from optimum_maiht.solvers import LayerSpec, magnitude_prune

TWO_FOUR = LayerSpec(0.5, (2, 4))


def prune_blocks_2of4(model) -> list[str]:
    """Magnitude-prune every linear layer of the decoder blocks to 2:4; their names."""
    blocks_name, blocks = find_decoder_blocks(model)
    names = []
    with torch.no_grad():
        for name, module in blocks.named_modules():
            if isinstance(module, torch.nn.Linear) or is_conv1d(module):
                weight = weight_matrix(module)
                weight.copy_(magnitude_prune(weight, TWO_FOUR))
                names.append(f"{blocks_name}.{name}")
    return names


def test_not_2of4_reason():
    assert not_2of4_reason(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])) is None
    assert "1 of 2 groups" in not_2of4_reason(torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
    assert "multiple of 4" in not_2of4_reason(torch.zeros(2, 6))


def test_cpu_model_is_left_unchanged_with_reasons():
    model = make_tiny_model("llama", dtype=torch.float16)
    pruned = prune_blocks_2of4(model)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    result = enable_2of4_kernels(model)

    assert result["converted"] == [] and result["backend"] is None
    for name in pruned:  # no CUDA here, or the model is on the CPU: both reasons name CUDA
        assert "CUDA" in result["skipped"][name], result["skipped"][name]
    assert result["skipped"]["lm_head"].startswith("not 2:4 sparse")
    for name, parameter in model.named_parameters():
        assert parameter is before[name][0] and torch.equal(parameter, before[name][1]), name


def test_strict_raises_with_the_reasons():
    model = make_tiny_model("llama", dtype=torch.float16)
    pruned = prune_blocks_2of4(model)
    with pytest.raises(RuntimeError, match=f"{len(pruned)} 2:4 sparse layer.*CUDA"):
        enable_2of4_kernels(model, strict=True)
    dense = make_tiny_model("llama", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="no layer was converted.*not 2:4 sparse"):
        enable_2of4_kernels(dense, strict=True)


def test_conv1d_and_tied_layers_stay_dense_with_their_reason():
    model = make_tiny_model("gpt2", dtype=torch.float16)
    pruned = prune_blocks_2of4(model)
    with torch.no_grad():  # lm_head is tied to the embedding: make it 2:4 too
        model.transformer.wte.weight.copy_(magnitude_prune(model.transformer.wte.weight, TWO_FOUR))
    skipped = enable_2of4_kernels(model)["skipped"]
    assert all("Conv1D" in skipped[name] for name in pruned)
    assert "tied" in skipped["lm_head"]


def test_weights_off_the_gpu_are_asked_to_move(monkeypatch):
    """With CUDA present, a 2:4 layer still on the CPU is a 2:4 layer left dense, with the fix."""
    model = make_tiny_model("llama", dtype=torch.float16)
    pruned = prune_blocks_2of4(model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = enable_2of4_kernels(model)
    assert result["converted"] == [] and result["backend"] is None
    assert all("move the model to a CUDA GPU" in result["skipped"][name] for name in pruned)
    with pytest.raises(RuntimeError, match=f"{len(pruned)} 2:4 sparse layer.*move the model to a CUDA GPU"):
        enable_2of4_kernels(model, strict=True)


def test_fused_experts_stay_dense_with_their_reason():
    from moe_models import make_moe_model
    from test_compressed_moe import sparsify

    model = make_moe_model("mixtral").half()
    experts = [name for name, p in model.named_parameters() if p.dim() == 3]
    with torch.no_grad():
        for name in experts:
            sparsify(model.get_parameter(name), False, (2, 4))
    result = enable_2of4_kernels(model)
    assert len(experts) == 4 and result["converted"] == []
    for name in experts:
        assert result["skipped"][name].startswith("fused expert weight (3-D"), result["skipped"][name]
    with pytest.raises(RuntimeError, match="no layer was converted"):  # experts are not 2:4 layers left dense
        enable_2of4_kernels(model, strict=True)


def test_loader_option_on_cpu_loads_dense_and_warns(tmp_path, caplog):
    from optimum_maiht.compressed import save_compressed
    from optimum_maiht.modeling import MAIHTModelForCausalLM

    model = make_tiny_model("llama", dtype=torch.bfloat16)
    pruned = prune_blocks_2of4(model)
    save_compressed(model, tmp_path, {f"{name}.weight": (2, 4) for name in pruned})
    with caplog.at_level("WARNING", logger="optimum_maiht.kernels"):
        loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path, sparse_kernels=True)
    assert f"{len(pruned)} 2:4 sparse layer(s) stay dense" in caplog.text and "CUDA" in caplog.text
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 2:4 sparse kernels need a CUDA GPU")
def test_cuda_2of4_matches_dense(tmp_path):
    import transformers

    from optimum_maiht.compressed import save_compressed
    from optimum_maiht.modeling import MAIHTModelForCausalLM

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability >= 8.0")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    pruned = prune_blocks_2of4(model)
    model.to("cuda")
    dense = copy.deepcopy(model)
    result = enable_2of4_kernels(model, strict=True)
    assert sorted(result["converted"]) == sorted(pruned) and result["backend"] in ("cusparselt", "cutlass")
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    assert not isinstance(model.lm_head.weight, torch.sparse.SparseSemiStructuredTensor)

    ids = calibration_ids(2, 64).cuda()
    with torch.no_grad():
        want, got = dense(ids).logits.float(), model(ids).logits.float()
        assert float((got - want).norm() / want.norm()) < 1e-2
        assert model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)

    # the same through the loader: compressed checkpoint -> GPU -> kernels
    save_compressed(dense.cpu(), tmp_path, {f"{name}.weight": (2, 4) for name in pruned})
    loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path, device_map="cuda", sparse_kernels=True)
    assert isinstance(loaded.model.layers[1].self_attn.k_proj.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        assert float((loaded(ids).logits.float() - want).norm() / want.norm()) < 1e-2
