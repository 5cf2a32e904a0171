"""Compressed checkpoints from strangers (issue #28): paths that leave the folder, shapes that disagree
with config.json, metadata that lies, and files that used to end in tracebacks. Each is refused with one
line before anything as large as a weight is read or allocated, and nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimum_maiht import compressed_loading
from optimum_maiht.compressed import COMPRESSED_INDEX_NAME, CompressedCheckpointError, save_compressed
from optimum_maiht.compressed_loading import load_compressed_state_dict
from optimum_maiht.files import UnsafeFileError, read_json, resolve_inside
from optimum_maiht.model_utils import find_decoder_blocks
from optimum_maiht.modeling import MAIHTModelForCausalLM
from optimum_maiht.solvers import LayerSpec, magnitude_prune

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


def magnitude_pruned(arch: str, pattern: tuple[int, int] | None):
    """A tiny model whose decoder-block linears are magnitude-pruned (no mAIHT: the format is under test),
    and its ``sparse_layers``."""
    model = make_tiny_model(arch)
    blocks_name, blocks = find_decoder_blocks(model)
    layers = {}
    with torch.no_grad():
        for name, module in blocks.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(magnitude_prune(module.weight, LayerSpec(0.5, pattern)))
                layers[f"{blocks_name}.{name}.weight"] = pattern
    return model, layers


@pytest.fixture(params=[None, (2, 4)], ids=["unstructured", "2:4"])
def checkpoint(request, tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "ckpt"
    model, layers = magnitude_pruned("llama", request.param)
    save_compressed(model, folder, layers, max_shard_size="40KB")
    return folder, json.loads((folder / COMPRESSED_INDEX_NAME).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / COMPRESSED_INDEX_NAME).write_text(json.dumps(index))


def rewrite_shard(folder: Path, index: dict, name: str, change) -> None:
    """``change(tensors)`` on the shard holding ``name``, written back with its metadata."""
    shard = folder / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, str(shard), metadata=metadata)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(folder: Path, match: str, error: type = CompressedCheckpointError) -> str:
    """Both loaders refuse ``folder`` with one line matching ``match``; nothing is written anywhere."""
    before = listing(folder.parent)
    with pytest.raises(error, match=match) as caught:
        load_compressed_state_dict(folder)
    with pytest.raises(error, match=match):
        MAIHTModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(caught.value)
    assert listing(folder.parent) == before
    return str(caught.value)


# --------------------------------------------------------------------------------------------------
# paths that leave the folder


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_shard_outside_the_folder_is_refused_whether_or_not_it_exists(checkpoint, kind):
    folder, index = checkpoint
    outside = folder.parent / "outside"
    name = "../outside/model-compressed.safetensors"
    shard = name if kind == "relative" else str(outside / "model-compressed.safetensors")
    first = next(iter(index["weight_map"]))
    original = folder / index["weight_map"][first]
    messages = []
    for exists in (False, True):
        if exists:
            outside.mkdir()
            (outside / "model-compressed.safetensors").write_bytes(original.read_bytes())
        index["weight_map"][first] = shard
        write_index(folder, index)
        messages.append(refused(folder, r"points outside the folder; refused", UnsafeFileError))
    assert messages[0] == messages[1], "the error must not tell whether the outside file exists"


def test_a_symlinked_shard_pointing_outside_is_refused(checkpoint):
    """transformers checks names for '..' and anchors only; a symlink inside the folder is caught here."""
    from transformers import AutoModelForCausalLM

    folder, index = checkpoint
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    outside = folder.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    refused(folder, r"points outside the folder", UnsafeFileError)
    with pytest.raises(UnsafeFileError, match=r"points outside the folder"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_resolve_inside_allows_the_folder_and_hub_blobs_only(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--name" / "blobs").mkdir()
    (tmp_path / "models--org--name" / "blobs" / "123").write_text("x")
    (snapshot / "shard").symlink_to(os.path.join("..", "..", "blobs", "123"))
    (snapshot / "loop").symlink_to("loop")
    assert resolve_inside(snapshot, "shard") == snapshot / "shard"
    assert resolve_inside(snapshot, "sub/later.safetensors") == snapshot / "sub" / "later.safetensors"
    for name in ["../../blobs/123", "/etc/passwd", "loop", "", 3, None, "a\x00b"]:
        with pytest.raises(UnsafeFileError):
            resolve_inside(snapshot, name, what="shard")


# --------------------------------------------------------------------------------------------------
# shapes against config.json, before any allocation


def test_shapes_that_fit_the_bitmask_but_not_the_config_are_refused_before_decompression(
    tmp_path, monkeypatch
):
    """The issue's 38 MB file whose stored shape agrees with its own bitmask but not with config.json was
    decompressed (3.5 GB) before anything was checked. Here the parts claim 4096 x 64: consistent among
    themselves, not with the model; nothing is decompressed."""
    folder = tmp_path / "ckpt"
    model, layers = magnitude_pruned("llama", None)
    save_compressed(model, folder, layers)
    index = json.loads((folder / COMPRESSED_INDEX_NAME).read_text())
    name = "model.layers.0.mlp.down_proj.weight"

    def inflate(tensors):
        rows, cols = 4096, 64
        tensors[f"{name}.shape"] = torch.tensor([rows, cols])
        tensors[f"{name}.bitmask"] = torch.zeros(rows, cols // 8, dtype=torch.uint8)
        tensors[f"{name}.row_offsets"] = torch.zeros(rows, dtype=torch.int64)
        tensors[f"{name}.compressed"] = torch.zeros(0)

    rewrite_shard(folder, index, f"{name}.shape", inflate)
    calls = []
    monkeypatch.setattr(compressed_loading, "decompress", lambda *a: calls.append(a))
    refused(
        folder, rf"{name}.bitmask is stored as U8 \[4096, 8\], which does not fit .*weight shape \[64, 128\]"
    )
    assert not calls, "nothing may be decompressed before every shape is checked"


def test_a_config_that_disagrees_with_the_shards_is_refused(checkpoint):
    folder, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 64
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, r"is stored as .* which does not fit")


# --------------------------------------------------------------------------------------------------
# metadata that lies


def test_a_tie_the_model_does_not_have_is_refused(checkpoint):
    """The issue: q_proj 'tied' to k_proj silently became k_proj."""
    folder, index = checkpoint
    del index["metadata"]["layers"][Q_PROJ]
    for key in [k for k in index["weight_map"] if k.startswith(Q_PROJ + ".")]:
        del index["weight_map"][key]
    index["metadata"]["tied"] = {Q_PROJ: K_PROJ}
    write_index(folder, index)
    refused(folder, rf"'tied' makes {Q_PROJ} a copy of {K_PROJ}, which the model does not tie")


def test_a_declared_tie_whose_source_is_not_stored_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    model, layers = magnitude_pruned("gpt2", None)
    save_compressed(model, folder, {})
    index = json.loads((folder / COMPRESSED_INDEX_NAME).read_text())
    assert index["metadata"]["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    del index["weight_map"]["transformer.wte.weight"]
    write_index(folder, index)
    refused(folder, r"lm_head.weight is tied to transformer.wte.weight, which is not stored")


@pytest.mark.parametrize("value", [1, "yes", None, True])
def test_transposed_must_be_a_boolean_matching_the_layer(tmp_path, value):
    folder = tmp_path / "ckpt"
    model, layers = magnitude_pruned("llama", (2, 4))
    save_compressed(model, folder, layers)
    index = json.loads((folder / COMPRESSED_INDEX_NAME).read_text())
    index["metadata"]["layers"][Q_PROJ]["transposed"] = value
    write_index(folder, index)
    message = (
        "'transposed' is true but the layer stores" if value is True else "'transposed' must be true or false"
    )
    refused(folder, message)


@pytest.mark.parametrize("version", [-7, 0, True, 1.0, "1", None])
def test_unknown_format_versions_are_refused(checkpoint, version):
    folder, index = checkpoint
    index["metadata"]["maiht_format_version"] = version
    write_index(folder, index)
    refused(folder, rf"maiht_format_version={version!r} is not a version of the format \(1, 2\)")


def test_an_entry_with_unknown_keys_is_refused(checkpoint):
    folder, index = checkpoint
    index["metadata"]["layers"][Q_PROJ]["scale"] = 2.0
    write_index(folder, index)
    refused(folder, rf"{Q_PROJ}: a '(bitmask|n:m)' entry has the keys .*got .*'scale'")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_boolean_values_of_a_float_weight_are_refused(checkpoint, dtype):
    """transformers casts int32 or bool tensors into a float weight without a word."""
    folder, index = checkpoint
    name = "model.norm.weight"
    rewrite_shard(folder, index, name, lambda t: t.update({name: t[name].to(dtype)}))
    refused(
        folder, rf"{name} is stored as {'I32' if dtype == torch.int32 else 'BOOL'} \[64\], which does not fit"
    )


def test_integer_stored_values_of_a_pruned_weight_are_refused(checkpoint):
    folder, index = checkpoint
    name = f"{Q_PROJ}.compressed"
    rewrite_shard(folder, index, name, lambda t: t.update({name: t[name].to(torch.int32)}))
    refused(folder, rf"{name} is stored as I32 .* which does not fit the 'compressed' part")
    index["metadata"]["layers"][Q_PROJ]["dtype"] = "int32"
    write_index(folder, index)
    refused(folder, rf"{Q_PROJ}: stored values must be floating point .* the index says 'int32'")


def test_a_shard_that_stores_foreign_tensors_is_refused(checkpoint):
    folder, index = checkpoint
    index["weight_map"]["model.backdoor.weight"] = index["weight_map"]["model.norm.weight"]
    write_index(folder, index)
    refused(folder, r"stores tensors \['model.backdoor.weight'\] that are no weights of the model")


def test_a_missing_weight_is_refused_instead_of_random(checkpoint):
    folder, index = checkpoint
    del index["weight_map"]["model.norm.weight"]
    write_index(folder, index)
    refused(folder, r"lacks the weights \['model.norm.weight'\]")


# --------------------------------------------------------------------------------------------------
# what used to end in a traceback


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: i["weight_map"].update({Q_PROJ + ".shape": 3}), r"must be a file name, got 3 \(int\)"),
        (lambda i: i.update({"metadata": [1]}), r"lacks 'metadata' or 'weight_map'"),
    ],
)
def test_malformed_index_values_are_one_line_errors(checkpoint, change, message):
    folder, index = checkpoint
    change(index)
    write_index(folder, index)
    refused(folder, message, ValueError)


@pytest.mark.parametrize(
    "file, text, message",
    [
        (COMPRESSED_INDEX_NAME, "[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
        (COMPRESSED_INDEX_NAME, b'{"weight_map": "\xff"}', r"is not UTF-8 text \(byte 0xff at offset 16\)"),
        ("config.json", "[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
        ("config.json", "[1, 2]", "config.json holds a JSON array at the top level, expected a JSON object"),
    ],
)
def test_hostile_json_is_a_one_line_error(checkpoint, file, text, message):
    folder, _ = checkpoint
    path = folder / file
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UnsafeFileError, match=message) as caught:
        MAIHTModelForCausalLM.from_pretrained(folder)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_json_reads_are_size_capped(tmp_path):
    (tmp_path / "big.json").write_text("{}" + " " * 2000)
    with pytest.raises(
        UnsafeFileError, match=r"big.json: index of 2,002 bytes is larger than the 1,000 bytes"
    ):
        read_json(tmp_path / "big.json", what="index", max_bytes=1000)
