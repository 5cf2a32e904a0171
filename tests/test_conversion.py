"""transformers' checkpoint conversions applied block by block (optimum_maiht.conversion): every family's
blocks load as from_pretrained loads them and save as save_pretrained writes them; a damaged checkpoint
is refused from its headers, naming the tensor and the file."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import ARCHITECTURES, make_tiny_model
from conftest import _configs as dense_configs
from moe_models import MOE_FAMILIES, make_moe_model
from moe_models import _configs as moe_configs
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaModel

from optimum_maiht.conversion import CheckpointConversion, CheckpointMismatchError, read_headers
from optimum_maiht.files import UnsafeFileError
from optimum_maiht.model_utils import block_prefix, find_decoder_blocks
from optimum_maiht.writer import plan_shards

FAMILIES = MOE_FAMILIES + ARCHITECTURES
SHARD = "20KB"  # a few tensors per shard: every tiny model is sharded, blocks span shards
PATTERN = "model{suffix}.safetensors"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: the folder of a tiny random float32 model saved by ``save_pretrained``."""
    folders: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in folders:
            model = make_moe_model(family) if family in MOE_FAMILIES else make_tiny_model(family)
            folders[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(folders[family], max_shard_size=SHARD)
        return folders[family]

    return make


def meta_model(folder: Path, dtype: torch.dtype = torch.float32):
    """The model of ``folder`` without weights, as streaming builds it."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    model.tie_weights()
    return model


class Reader:
    """Reads checkpoint tensors by name, recording every read."""

    def __init__(self, folder: Path):
        self.sources = read_headers(folder)
        self.names: list[str] = []

    def __call__(self, name: str) -> torch.Tensor:
        self.names.append(name)
        with safe_open(str(self.sources[name].file), framework="pt") as f:
            return f.get_tensor(name)


def load_blockwise(folder: Path, dtype: torch.dtype = torch.float32, unread: set[str] = frozenset()):
    """Every model tensor through the adapter, block by block; checks each block reads exactly the
    checkpoint tensors under its prefix, and the whole run each tensor once (but ``unread``)."""
    model = meta_model(folder, dtype)
    read = Reader(folder)
    conversion = CheckpointConversion(model, read.sources)
    blocks_name, blocks = find_decoder_blocks(model)
    prefixes = [block_prefix(blocks_name, i) for i in range(len(blocks))]
    loaded = {}
    for prefix in prefixes:
        before = len(read.names)
        part = conversion.load_block(prefix, read)
        assert part and all(name.startswith(prefix) for name in part)
        assert read.names[before:] == conversion.block_sources(prefix)
        assert set(read.names[before:]) == {n for n in read.sources if n.startswith(prefix)}
        loaded.update(part)
    loaded.update(conversion.load_outside(prefixes, read))
    assert Counter(read.names) == Counter(n for n in read.sources if n not in unread)  # each once
    return conversion, prefixes, loaded


def written(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def check_saving(conversion: CheckpointConversion, prefixes: list[str], model, tmp_path: Path) -> None:
    """Per-block saved tensors equal what ``model.save_pretrained`` writes, and the planned layout gives
    its names, shapes, dtypes and shards."""
    out = tmp_path / "saved"
    model.save_pretrained(out, max_shard_size=SHARD)
    want = written(out)
    state = model.state_dict()
    saved = {}
    for prefix in prefixes:
        saved.update(conversion.saved({n: t for n, t in state.items() if n.startswith(prefix)}))
    saved.update(conversion.saved({n: t for n, t in state.items() if not n.startswith(tuple(prefixes))}))
    assert saved.keys() == want.keys()
    for name, tensor in want.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    layout = conversion.saved_layout()
    assert {n: (t.shape, t.dtype) for n, t in layout.items()} == {
        n: (t.shape, t.dtype) for n, t in want.items()
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    split = plan_shards(layout, PATTERN, SHARD)
    assert split.tensor_to_filename == index["weight_map"]
    assert split.metadata["total_size"] == index["metadata"]["total_size"]


@pytest.mark.parametrize("family", FAMILIES)
def test_blockwise_load_and_save_match_transformers(family, checkpoint, tmp_path):
    folder = checkpoint(family)
    conversion, prefixes, loaded = load_blockwise(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    want = reference.state_dict()
    assert loaded.keys() == want.keys()
    for name, tensor in want.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    check_saving(conversion, prefixes, reference, tmp_path)


def test_conversions_found_per_family(checkpoint):
    """The families that need a conversion use transformers' mapping; the others load as they are."""
    kinds = {}
    for family in FAMILIES:
        folder = checkpoint(family)
        kinds[family] = sorted(
            type(t).__name__ for t in CheckpointConversion(meta_model(folder), read_headers(folder)).used
        )
    assert kinds["mixtral"] == ["WeightConverter", "WeightConverter", "WeightRenaming"]
    assert kinds["gpt_neox"] == ["WeightRenaming"]
    for family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        assert kinds[family] == ["WeightConverter", "WeightConverter"], family
    for family in ("gpt_oss", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt2", "opt"):
        assert kinds[family] == [], family


@pytest.mark.parametrize(
    "family, saved_dtype, dtype, kept_fp32",
    [
        ("gpt_oss", torch.float16, torch.float16, "model.layers.0.input_layernorm.weight"),  # keep_in_fp32
        ("deepseek_v3", torch.bfloat16, torch.bfloat16, "model.layers.1.mlp.gate.weight"),  # strict
        ("mixtral", torch.bfloat16, torch.float32, None),  # cast up on load
    ],
)
def test_dtypes_as_from_pretrained(family, saved_dtype, dtype, kept_fp32, tmp_path):
    """Sources cast as from_pretrained casts them; with 12 experts, so that expert 10 sorts after 9."""
    config = (moe_configs() | dense_configs())[family]()
    if family == "mixtral":
        config.num_local_experts = 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=saved_dtype).save_pretrained(
        tmp_path, max_shard_size=SHARD
    )
    conversion, prefixes, loaded = load_blockwise(tmp_path, dtype)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    want = reference.state_dict()
    for name, tensor in want.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    if kept_fp32:
        assert loaded[kept_fp32].dtype == torch.float32
    check_saving(conversion, prefixes, reference, tmp_path / "out")


def damage(folder: Path, tmp_path: Path, name: str, change=None) -> tuple[Path, Path]:
    """A copy of checkpoint ``folder`` with tensor ``name`` changed by ``change`` (removed, from its
    shard and the index, when ``None``), written with safetensors; returns the folder and that shard."""
    out = tmp_path / "damaged"
    shutil.copytree(folder, out)
    shard = read_headers(out)[name].file
    tensors = load_file(shard)
    if change is None:
        del tensors[name]
        index = out / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        del data["weight_map"][name]
        index.write_text(json.dumps(data))
    else:
        tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return out, shard


def wider(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*tensor.shape[:-1], tensor.shape[-1] + 1, dtype=tensor.dtype)


@pytest.mark.parametrize(
    "family, name, change",
    [
        ("llama", "model.layers.1.input_layernorm.weight", lambda t: t[: t.numel() // 2].clone()),  # norm
        ("llama", "model.embed_tokens.weight", lambda t: torch.cat([t, t[:1]])),  # one more token
        ("mixtral", "model.layers.0.self_attn.q_proj.weight", wider),  # projection
        ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w1.weight", wider),  # one expert
        ("qwen3_moe", "model.layers.0.mlp.experts.5.down_proj.weight", lambda t: t.t().contiguous()),
        ("gpt_neox", "embed_out.weight", wider),  # a renamed tensor
        ("mixtral", "model.layers.0.post_attention_layernorm.weight", lambda t: t.to(torch.int32)),
        ("qwen2_moe", "model.layers.1.mlp.experts.0.up_proj.weight", lambda t: t.to(torch.float8_e4m3fn)),
    ],
)
def test_damaged_tensor_refused_from_headers(family, name, change, checkpoint, tmp_path):
    """Refused while planning, which is given no reader: no tensor data is read before the check."""
    folder, shard = damage(checkpoint(family), tmp_path, name, change)
    with pytest.raises(CheckpointMismatchError, match=f"{re.escape(name)} .* in {re.escape(str(shard))}"):
        CheckpointConversion(meta_model(folder), read_headers(folder))


@pytest.mark.parametrize(
    "family, name",
    [
        ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),  # one expert of a fused weight
        ("deepseek_v3", "model.layers.2.mlp.experts.7.down_proj.weight"),
        ("llama", "model.layers.0.post_attention_layernorm.weight"),
        ("gpt2", "transformer.wte.weight"),  # tied to lm_head: neither name is there
    ],
)
def test_missing_tensor_named(family, name, checkpoint, tmp_path):
    folder, _ = damage(checkpoint(family), tmp_path, name)
    with pytest.raises(CheckpointMismatchError, match=f"lacks .*{re.escape(name)}"):
        CheckpointConversion(meta_model(folder), read_headers(folder))


def test_base_model_checkpoint(tmp_path):
    """A checkpoint of the base model (names without ``model.``), loaded into the causal LM with tied
    embeddings: transformers adds the prefix, so does the adapter; a damaged tensor there (names not
    those save_pretrained writes) is still named with its file."""
    config = dense_configs()["llama"]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaModel(config).save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    model, read = meta_model(tmp_path / "base"), Reader(tmp_path / "base")
    conversion = CheckpointConversion(model, read.sources)
    prefixes = ["model.layers.0.", "model.layers.1."]
    loaded = {}
    for prefix in prefixes:
        loaded.update(conversion.load_block(prefix, read))
        assert all(n.startswith(prefix.removeprefix("model.")) for n in conversion.block_sources(prefix))
    loaded.update(conversion.load_outside(prefixes, read))
    assert Counter(read.names) == Counter(list(read.sources))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[n], t) for n, t in reference.items())
    name = "layers.1.input_layernorm.weight"
    folder, shard = damage(tmp_path / "base", tmp_path, name, lambda t: t[:3].clone())
    match = f"{re.escape(name)} .* in {re.escape(str(shard))}: converted to model.{re.escape(name)} of shape"
    with pytest.raises(CheckpointMismatchError, match=match):
        CheckpointConversion(meta_model(folder), read_headers(folder))


def test_tied_duplicate_not_read(checkpoint, tmp_path):
    """A checkpoint holding both names of a tied weight: the first is read, as from_pretrained ties them."""
    folder, shard = damage(checkpoint("gemma3"), tmp_path, "model.embed_tokens.weight", lambda t: t)
    tensors = load_file(shard)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, shard)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = shard.name
    index.write_text(json.dumps(data))
    conversion, _, loaded = load_blockwise(folder, unread={"lm_head.weight"})
    reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in reference.items())
    assert loaded["lm_head.weight"] is loaded["model.embed_tokens.weight"]
    assert "lm_head.weight" not in conversion.saved_layout()


def test_hostile_index_refused(checkpoint, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoint("llama"), folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name, file = next(iter(data["weight_map"].items()))
    data["weight_map"][name] = "../" + file
    index.write_text(json.dumps(data))
    with pytest.raises(UnsafeFileError, match=re.escape(f"'../{file}' points outside the folder")):
        read_headers(folder)
    data["weight_map"][name] = "missing.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointMismatchError, match=re.escape(f"'missing.safetensors' is not a file in {folder}")
    ):
        read_headers(folder)
    other = next(f for f in data["weight_map"].values() if f not in ("missing.safetensors", file))
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointMismatchError, match=f"puts {re.escape(name)} in {other}, which does not"):
        read_headers(folder)
