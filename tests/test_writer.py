"""The one shard writer: what it writes for a model in memory is what transformers' ``save_pretrained``
writes (same shard files, index and tensors), for tied, untied, sharded, renamed and fused-expert models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from moe_models import make_moe_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_maiht.serialization import ModelInMemory, write_dense

SHARD = "40KB"


def shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("loaded", [False, True], ids=["from_config", "from_pretrained"])
def test_the_writer_writes_what_save_pretrained_writes(tmp_path: Path, family: str, loaded: bool) -> None:
    model = (
        make_moe_model(family) if family in ("mixtral", "qwen3_moe", "gpt_oss") else make_tiny_model(family)
    )
    if loaded:  # a model from a checkpoint carries the conversions transformers applied to it
        model.save_pretrained(tmp_path / "source")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "source")
    model.save_pretrained(tmp_path / "transformers", max_shard_size=SHARD)
    (tmp_path / "ours").mkdir()
    write_dense(tmp_path / "ours", ModelInMemory(model), SHARD)

    theirs, ours = shards(tmp_path / "transformers"), shards(tmp_path / "ours")
    assert list(ours) == list(theirs) and len(ours) > 1  # the same shard files
    for filename, tensors in theirs.items():
        assert sorted(ours[filename]) == sorted(tensors), filename  # the same tensors in each
        for name, tensor in tensors.items():
            assert ours[filename][name].dtype == tensor.dtype and torch.equal(ours[filename][name], tensor), (
                name
            )
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        mine, want = tmp_path / "ours" / name, tmp_path / "transformers" / name
        assert mine.is_file() == want.is_file(), name
        if want.is_file():
            assert json.loads(mine.read_text()) == json.loads(want.read_text()), name
