"""The compact format with fused mixture-of-experts weights (3-D parameters ``(E, a, b)``): exact round trips
for slices stored (out, in) (Mixtral) and (in, out) (GPT-OSS), N:M along each expert's input, the format
version, size and the argument checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_model, folder_bytes
from moe_models import MOE_FAMILIES, make_moe_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimum_maiht.compressed import (
    COMPRESSED_INDEX_NAME,
    CompressedCheckpointError,
    save_compressed,
)
from optimum_maiht.compressed_loading import decompress, layer_entry, load_compressed_state_dict
from optimum_maiht.modeling import MAIHTModelForCausalLM
from optimum_maiht.sparse_encoding import compress_nm, compress_unstructured

PATTERNS = {"unstructured": None, "2:4": (2, 4)}


def fused_experts(model) -> dict[str, bool]:
    """``{name: slices stored (in, out)}`` for every 3-D parameter (GPT-OSS's experts: ``x @ p[e]``)."""
    in_out = type(model).__name__.startswith("GptOss")
    return {name: in_out for name, p in model.named_parameters() if p.dim() == 3}


def input_view(param: torch.Tensor, in_out: bool) -> torch.Tensor:
    """The (E, out, in) view of a fused parameter (a view: writing to it writes the parameter)."""
    return param.transpose(1, 2) if in_out else param


def sparsify(param: torch.Tensor, in_out: bool, pattern: tuple[int, int] | None) -> None:
    """Zero half of every expert in place: the smallest magnitudes per expert (unstructured), or all but
    the N largest of every group of M consecutive input weights of each expert's (out, in) view."""
    view = input_view(param.data, in_out)
    experts, out, inp = view.shape
    if pattern is None:
        flat = view.abs().reshape(experts, -1)
        threshold = flat.kthvalue(flat.shape[1] // 2, dim=1).values
        drop = view.abs() <= threshold[:, None, None]
    else:
        n, m = pattern
        groups = view.abs().reshape(experts, out, inp // m, m)
        order = groups.argsort(-1, descending=True)
        drop = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., n:], True)
        drop = drop.reshape(experts, out, inp)
    view.masked_fill_(drop, 0.0)


def sparsified_moe(family: str, pattern: str) -> tuple[torch.nn.Module, dict, list[str]]:
    """A model whose fused experts (and one attention projection) are sparse; ``sparse_layers`` and
    ``transposed`` for :func:`save_compressed`."""
    model = make_moe_model(family)
    experts = fused_experts(model)
    with torch.no_grad():
        for name, in_out in experts.items():
            sparsify(model.get_parameter(name), in_out, PATTERNS[pattern])
        attention = model.model.layers[0].self_attn  # a 2-D layer in the same checkpoint (DeepSeek: q_a_proj)
        linear = next(n for n, m in attention.named_modules() if isinstance(m, torch.nn.Linear))
        sparsify(attention.get_submodule(linear).weight[None], False, PATTERNS[pattern])
    layers = {name: PATTERNS[pattern] for name in experts}
    layers[f"model.layers.0.self_attn.{linear}.weight"] = PATTERNS[pattern]
    return model, layers, [name for name, in_out in experts.items() if in_out]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_fused_experts_round_trip_is_exact(tmp_path, family, pattern):
    model, layers, transposed = sparsified_moe(family, pattern)
    assert len(layers) == 5 and (family == "gpt_oss") == bool(transposed)
    save_compressed(model, tmp_path / "compressed", layers, transposed=transposed)

    index = json.loads((tmp_path / "compressed" / COMPRESSED_INDEX_NAME).read_text())
    metadata = index["metadata"]
    assert metadata["maiht_format_version"] == 2, "3-D weights need a reader that knows them"
    assert set(metadata["layers"]) == set(layers)
    assert not set(layers) & set(index["weight_map"]), "pruned weights must not be stored dense"
    stored = {}
    for shard in set(index["weight_map"].values()):
        stored.update(load_file(tmp_path / "compressed" / shard))
        with safe_open(str(tmp_path / "compressed" / shard), framework="pt") as f:
            assert f.metadata()["maiht_format_version"] == "2"
    for name, in_out in fused_experts(model).items():
        info, param = metadata["layers"][name], model.get_parameter(name)
        experts, a, b = param.shape
        if pattern == "unstructured":  # the parameter's own layout, E * a rows
            assert info == {"encoding": "bitmask", "dtype": "float32"}
            assert stored[f"{name}.shape"].tolist() == [experts, a, b]
            assert stored[f"{name}.bitmask"].shape == (experts * a, b // 8)
            assert stored[f"{name}.row_offsets"].shape == (experts * a,)
        else:  # each expert's (out, in) view, N per group of M inputs
            assert info == {"encoding": "n:m", "n": 2, "m": 4, "transposed": in_out, "dtype": "float32"}
            out, inp = (b, a) if in_out else (a, b)
            assert stored[f"{name}.shape"].tolist() == [experts, out, inp]
            assert stored[f"{name}.compressed"].shape == (experts * out, inp // 2)
            assert stored[f"{name}.bitmask"].shape == (experts * out, inp // 8)

    loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path / "compressed")
    assert type(loaded) is type(model)
    assert_same_model(model, loaded)
    model.save_pretrained(tmp_path / "dense")
    ratio = folder_bytes(tmp_path / "compressed") / folder_bytes(tmp_path / "dense")
    assert ratio < 0.8, f"compressed / dense = {ratio:.3f}"  # about 0.71-0.76: attention stays dense
    experts = fused_experts(model)
    kept = sum(t.nbytes for key, t in stored.items() if key.rsplit(".", 1)[0] in experts)
    dense = sum(model.get_parameter(name).nbytes for name in experts)
    assert kept / dense < 0.6, f"experts: compressed / dense = {kept / dense:.3f}"  # 0.53 to 0.57


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_transformers_auto_class_loads_compact_moe_folders(tmp_path, family, pattern):
    """After ``import optimum_maiht``, plain ``AutoModelForCausalLM`` loads the fused experts of every MoE
    family: the same tensors and logits as the dense save."""
    from transformers import AutoModelForCausalLM

    model, layers, transposed = sparsified_moe(family, pattern)
    save_compressed(model, tmp_path / "compact", layers, transposed=transposed)
    model.save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert_same_model(dense, AutoModelForCausalLM.from_pretrained(tmp_path / "compact"))


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_nm_stack_encoding_round_trips(pattern):
    weight = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(0))
    sparsify(weight, False, pattern)
    parts = compress_nm(weight, *pattern, "w")
    info = {"encoding": "n:m", "n": pattern[0], "m": pattern[1], "transposed": False, "dtype": "float32"}
    assert torch.equal(decompress("w", layer_entry("w", info), parts, (3, 8, 16)), weight)
    transposed = weight.transpose(1, 2).contiguous()  # (E, in, out) slices, stored transposed
    entry = layer_entry("w", {**info, "transposed": True})
    restored = decompress("w", entry, compress_nm(transposed.transpose(1, 2), *pattern), (3, 16, 8))
    assert torch.equal(restored, transposed) and restored.is_contiguous()


def test_unstructured_stack_encoding_round_trips():
    weight = torch.randn(3, 5, 13, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    sparsify(weight, False, None)
    parts = compress_unstructured(weight)
    assert parts["bitmask"].shape == (15, 2) and parts["shape"].tolist() == [3, 5, 13]
    entry = layer_entry("w", {"encoding": "bitmask", "dtype": "bfloat16"})
    assert torch.equal(decompress("w", entry, parts, (3, 5, 13)), weight)


def test_in_out_slices_need_to_be_declared_transposed(tmp_path):
    model, layers, transposed = sparsified_moe("gpt_oss", "2:4")
    # 2:4 along each slice's input (dimension 1), which is not 2:4 along dimension 2
    with pytest.raises(
        ValueError, match=r"is not 2:4 sparse: .*\(expert \d+; .* must be named in .*transposed"
    ):
        save_compressed(model, tmp_path / "a", layers)
    assert not (tmp_path / "a").exists(), "nothing is written before everything is encoded"
    save_compressed(model, tmp_path / "b", layers, transposed=transposed)


def test_crowded_group_of_one_expert_is_refused(tmp_path):
    model, layers, _ = sparsified_moe("mixtral", "2:4")
    name = "model.layers.1.mlp.experts.down_proj"
    with torch.no_grad():
        model.get_parameter(name)[2, 5, :4] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # 3 of 4 in expert 2
    with pytest.raises(
        ValueError, match=rf"{name} is not 2:4 sparse: a group of 4 input .* 3 nonzeros \(expert 2;"
    ):
        save_compressed(model, tmp_path, layers)


def test_transposed_argument_is_checked(tmp_path):
    model, layers, _ = sparsified_moe("gpt_oss", "unstructured")
    with pytest.raises(ValueError, match=r"transposed names \['model.nope'\], which are not parameters"):
        save_compressed(model, tmp_path, layers, transposed=["model.nope"])
    with pytest.raises(ValueError, match="not 3-D fused expert weights"):
        save_compressed(model, tmp_path, layers, transposed=["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(TypeError, match="collection of parameter names"):
        save_compressed(model, tmp_path, layers, transposed="model.layers.0.mlp.experts.down_proj")
    with pytest.raises(ValueError, match="only 2-D floating point weights"):
        save_compressed(model, tmp_path, {"model.norm.weight": None, **layers})


def test_broken_positions_of_a_stack_are_reported(tmp_path):
    model, layers, transposed = sparsified_moe("gpt_oss", "2:4")
    save_compressed(model, tmp_path, layers, transposed=transposed)
    index = json.loads((tmp_path / COMPRESSED_INDEX_NAME).read_text())
    name = "model.layers.1.mlp.experts.gate_up_proj.bitmask"
    shard = tmp_path / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    tensors[name][-1, 0] = 0b0111  # the last expert's last row: a group of 4 with 3 positions
    save_file(tensors, str(shard), metadata=metadata)
    with pytest.raises(
        CompressedCheckpointError, match=r"2:4 positions or values .* do not fit the shape \[4, "
    ):
        load_compressed_state_dict(tmp_path)
