"""The compact sparse checkpoint format: exact round trips, size, refusal by plain transformers, damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_model, calibration_ids, folder_bytes, make_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.compressed import (
    COMPRESSED_INDEX_NAME,
    CompressedCheckpointError,
    save_compressed,
)
from optimum_maiht.compressed_loading import decompress, layer_entry, load_compressed_state_dict
from optimum_maiht.files import UnsafeFileError
from optimum_maiht.modeling import MAIHTModelForCausalLM
from optimum_maiht.sparse_encoding import compress_nm, compress_unstructured, pack_bitmask, unpack_bitmask

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prune(model, pattern: str) -> dict[str, tuple[int, int] | None]:
    """Prune with mAIHT (one cheap iteration: only the format is under test here) and return the
    ``sparse_layers`` of the pruned weights."""
    config = MAIHTConfig(pattern=pattern, iterations=1, refit_iterations=0, sequence_length=32)
    pruner = MAIHTPruner(model, config, device="cpu")
    pruner.prune(calibration_ids(4, 32), progress=False)
    layers = {f"{r.name}.weight": config.nm for r in pruner.report.pruned}
    assert layers
    return layers


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_round_trip_is_exact(tmp_path, arch, dtype, pattern):
    model = make_tiny_model(arch, dtype=DTYPES[dtype])
    layers = prune(model, pattern)
    save_compressed(model, tmp_path, layers)

    index = json.loads((tmp_path / COMPRESSED_INDEX_NAME).read_text())
    assert set(index["metadata"]["layers"]) == set(layers)
    encoding = {"unstructured": "bitmask"}.get(pattern, "n:m")
    assert {info["encoding"] for info in index["metadata"]["layers"].values()} == {encoding}
    assert not set(layers) & set(index["weight_map"]), "pruned weights must not be stored dense"
    if arch == "gpt2" and pattern != "unstructured":  # Conv1D: N:M stored in the (out, in) view
        assert all(info["transposed"] for info in index["metadata"]["layers"].values())
    with safe_open(str(tmp_path / next(iter(index["weight_map"].values()))), framework="pt") as shard:
        assert shard.metadata()["format"] == "pt" and shard.metadata()["maiht_format"] == "maiht-compressed"

    loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.dtype == DTYPES[dtype]
    assert_same_model(model, loaded)


def test_tied_weights_written_once_and_tied_again(tmp_path):
    model = make_tiny_model("gpt2")
    save_compressed(model, tmp_path, prune(model, "unstructured"), max_shard_size="30KB")
    index = json.loads((tmp_path / COMPRESSED_INDEX_NAME).read_text())
    assert index["metadata"]["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in index["weight_map"]
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert_same_model(model, loaded)


def test_dtype_and_other_options_pass_through(tmp_path):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    save_compressed(model, tmp_path, prune(model, "2:4"))
    loaded, info = MAIHTModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert loaded.dtype == torch.float32 and not info["missing_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_compressed_folder_is_at_most_060_of_dense(tmp_path, dtype, pattern):
    import transformers

    # wide layers and a small vocabulary, so the dense embeddings do not dominate the folder
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).eval()
    layers = prune(model, pattern)
    model.save_pretrained(tmp_path / "dense")
    save_compressed(model, tmp_path / "compressed", layers)
    ratio = folder_bytes(tmp_path / "compressed") / folder_bytes(tmp_path / "dense")
    assert ratio <= 0.6, f"compressed / dense = {ratio:.3f}"  # about 0.54 (fp32), 0.57 (bf16)
    assert_same_model(model, MAIHTModelForCausalLM.from_pretrained(tmp_path / "compressed"))


@pytest.mark.parametrize("arch, pattern", [("llama", "unstructured"), ("gpt2", "2:4")])
def test_transformers_auto_class_and_pipeline_load_compact_folders(tmp_path, tokenizer, arch, pattern):
    """After ``import optimum_maiht``, transformers' own entry points load the compact format: the same
    tensors as the dense save, a plain model (no quantizer left on it), dtype and device_map honoured."""
    from transformers import AutoModelForCausalLM, pipeline

    model = make_tiny_model(arch)
    save_compressed(model, tmp_path / "compact", prune(model, pattern))
    tokenizer.save_pretrained(tmp_path / "compact")
    model.save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "dense"), loaded)
    assert not loaded.is_quantized and not hasattr(loaded.config, "quantization_config")
    assert not hasattr(loaded.config, "transformers_weights")
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", dtype=torch.bfloat16, device_map="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(half.state_dict()[name], tensor.bfloat16()), name
    generator = pipeline("text-generation", model=str(tmp_path / "compact"), device="cpu")
    assert_same_model(model, generator.model)


def test_without_the_package_transformers_refuses_with_its_name(tmp_path, monkeypatch):
    """The registration removed (as in an environment without optimum-maiht): transformers skips the
    unknown quantization method and stops on the marker, whose text names the package."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import auto

    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, prune(model, "unstructured"))
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "maiht")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "maiht")
    with pytest.raises(ValueError, match=r"pip install optimum-maiht and import optimum_maiht"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_folders_of_older_releases_still_load(tmp_path):
    """Written before the registration: the marker but no quantization_config."""
    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, prune(model, "2:4"))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_model(model, MAIHTModelForCausalLM.from_pretrained(tmp_path))


def test_lead_annotation_keeps_the_folder_loadable(tmp_path):
    from optimum_maiht.serialization import annotate_model_config

    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, prune(model, "2:4"))
    annotate_model_config(tmp_path, {"method": "mAIHT", "format": "compressed"})
    loaded = MAIHTModelForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(loaded.config, "transformers_weights")
    assert_same_model(model, loaded)


def test_pruner_saves_compressed_and_dense(tmp_path, tokenizer):
    model = make_tiny_model("gpt2")
    pruner = MAIHTPruner(
        model, MAIHTConfig(pattern="2:4", iterations=1, refit_iterations=0), tokenizer, device="cpu"
    )
    pruner.prune(calibration_ids(4, 32), progress=False)
    pruner.save_pretrained(tmp_path / "compressed", save_format="compressed")
    pruner.save_pretrained(tmp_path / "dense")
    config = json.loads((tmp_path / "compressed" / "config.json").read_text())
    assert config["maiht"]["format"] == "compressed"
    assert (tmp_path / "compressed" / "maiht_config.json").is_file()
    assert folder_bytes(tmp_path / "compressed") < folder_bytes(tmp_path / "dense")
    for folder in ("compressed", "dense"):
        assert_same_model(model, MAIHTModelForCausalLM.from_pretrained(tmp_path / folder))
    with pytest.raises(ValueError, match="save_format"):
        pruner.save_pretrained(tmp_path / "other", save_format="gguf")


def test_dense_folder_loads_as_usual(tmp_path):
    model = make_tiny_model("llama")
    prune(model, "unstructured")
    model.save_pretrained(tmp_path)
    assert_same_model(model, MAIHTModelForCausalLM.from_pretrained(tmp_path))


def test_hub_repo_id_is_loaded_from_a_hub_cache_snapshot(tmp_path, monkeypatch):
    """A Hub id: transformers downloads it (here: a pre-filled cache, offline), whose snapshot files are
    symlinks into the repository's blobs folder, which the path checks allow."""
    import os

    model = make_tiny_model("llama")
    save_compressed(model, tmp_path / "saved", prune(model, "unstructured"))
    repo = tmp_path / "hub" / "models--user--tiny-maiht"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for file in (tmp_path / "saved").iterdir():
        (repo / "blobs" / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.join("..", "..", "blobs", file.name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = MAIHTModelForCausalLM.from_pretrained("user/tiny-maiht", cache_dir=tmp_path / "hub")
    assert loaded.config.name_or_path == "user/tiny-maiht"
    assert_same_model(model, loaded)


# --------------------------------------------------------------------------------------------------
# damaged or incomplete folders


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, prune(model, "unstructured"), max_shard_size="40KB")
    index = json.loads((tmp_path / COMPRESSED_INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return tmp_path, index


@pytest.fixture
def saved_2of4(tmp_path):
    """A checkpoint whose decoder blocks are magnitude-pruned to 2:4 (fast: no mAIHT)."""
    from optimum_maiht.model_utils import find_decoder_blocks
    from optimum_maiht.solvers import LayerSpec, magnitude_prune

    model = make_tiny_model("llama")
    blocks_name, blocks = find_decoder_blocks(model)
    layers = {}
    with torch.no_grad():
        for name, module in blocks.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(magnitude_prune(module.weight, LayerSpec(0.5, (2, 4))))
                layers[f"{blocks_name}.{name}.weight"] = (2, 4)
    save_compressed(model, tmp_path, layers)
    return tmp_path, json.loads((tmp_path / COMPRESSED_INDEX_NAME).read_text())


def rewrite_stored(folder: Path, index: dict, name: str, change) -> None:
    """Apply ``change`` to the stored tensor ``name`` and write its shard back (metadata kept)."""
    shard = folder / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    change(tensors[name])
    save_file(tensors, str(shard), metadata=metadata)


def rewrite_index(folder: Path, index: dict) -> None:
    (folder / COMPRESSED_INDEX_NAME).write_text(json.dumps(index))


def test_missing_index_is_named(saved):
    folder, _ = saved
    (folder / COMPRESSED_INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=COMPRESSED_INDEX_NAME):
        MAIHTModelForCausalLM.from_pretrained(folder)


def test_missing_shard_is_named(saved):
    folder, index = saved
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        MAIHTModelForCausalLM.from_pretrained(folder)


def test_truncated_shard_is_reported(saved):
    folder, index = saved
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UnsafeFileError, match=rf"{shard.name}: the header entry .* damaged or truncated"):
        load_compressed_state_dict(folder)


def test_inconsistent_bitmask_is_reported(saved):
    folder, index = saved
    name = next(n for n in index["weight_map"] if n.endswith(".bitmask"))

    def flip_one_bit(mask):  # one weight more or fewer than the stored values
        mask[0, 0] ^= 1

    rewrite_stored(folder, index, name, flip_one_bit)
    with pytest.raises(CompressedCheckpointError, match="do not match the bitmask"):
        load_compressed_state_dict(folder)


@pytest.mark.parametrize("bits", [0b0111, 0b0001])
def test_broken_nm_positions_are_reported(saved_2of4, bits):
    folder, index = saved_2of4
    name = "model.layers.1.mlp.down_proj.weight"
    assert index["metadata"]["layers"][name]["encoding"] == "n:m"
    # the first group of 4 of row 0 gets 3 (or 1) positions instead of 2; the other group of the byte keeps 2
    rewrite_stored(
        folder, index, f"{name}.bitmask", lambda mask: mask[0, :1].copy_(torch.tensor([0x30 | bits]))
    )
    with pytest.raises(CompressedCheckpointError, match=rf"{name}: the stored 2:4 positions .* do not fit"):
        load_compressed_state_dict(folder)


def test_unknown_encoding_is_reported(saved_2of4):
    folder, index = saved_2of4
    name = "model.layers.0.self_attn.q_proj.weight"
    index["metadata"]["layers"][name]["encoding"] = "zstd"
    rewrite_index(folder, index)
    with pytest.raises(CompressedCheckpointError, match=rf"{name}: unknown encoding 'zstd'; .*corrupted"):
        MAIHTModelForCausalLM.from_pretrained(folder)


def test_invalid_nm_pattern_in_the_index_is_reported(saved_2of4):
    folder, index = saved_2of4
    index["metadata"]["layers"]["model.layers.0.self_attn.q_proj.weight"]["m"] = "4"
    rewrite_index(folder, index)
    with pytest.raises(CompressedCheckpointError, match=r"invalid N:M pattern n=2, m='4'"):
        load_compressed_state_dict(folder)


def test_dtype_mismatch_between_index_and_values_is_reported(saved_2of4):
    folder, index = saved_2of4
    name = "model.layers.0.mlp.gate_proj.weight"
    index["metadata"]["layers"][name]["dtype"] = "bfloat16"
    rewrite_index(folder, index)
    with pytest.raises(
        CompressedCheckpointError,
        match=rf"{name}.compressed is stored as F32 \[128, 32\], which does not fit .* \(bfloat16, weight",
    ):
        load_compressed_state_dict(folder)


def test_tied_alias_without_its_source_is_reported(saved):
    folder, index = saved
    index["metadata"]["tied"] = {"lm_head.weight": "model.embed_tokens.weight.missing"}
    rewrite_index(folder, index)
    with pytest.raises(
        CompressedCheckpointError,
        match=r"'tied' makes lm_head.weight a copy of model.embed_tokens.weight.missing, which the model "
        "does not tie",
    ):
        load_compressed_state_dict(folder)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[]", "holds a JSON array at the top level, expected a JSON object"),
        ('{"weight_map": {}}', "lacks 'metadata' or 'weight_map'"),
        (
            '{"metadata": {"maiht_format": "maiht-compressed", "layers": {}}}',
            "lacks 'metadata' or 'weight_map'",
        ),
        ('{"metadata": {}, "weight_map": {}}', "is not an optimum-maiht compressed index"),
        (
            '{"metadata": {"maiht_format": "maiht-compressed", "maiht_format_version": 1, "layers": {}, '
            '"tied": ["x"]}, "weight_map": {}}',
            "'tied' must map names to names",
        ),
    ],
)
def test_invalid_index_is_reported(saved, text, message):
    folder, _ = saved
    (folder / COMPRESSED_INDEX_NAME).write_text(text)
    with pytest.raises(ValueError, match=message):  # CompressedCheckpointError or files.UnsafeFileError
        MAIHTModelForCausalLM.from_pretrained(folder)


def test_newer_format_version_asks_for_an_upgrade(saved):
    folder, index = saved
    index["metadata"]["maiht_format_version"] = 99
    (folder / COMPRESSED_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CompressedCheckpointError, match="pip install -U optimum-maiht"):
        load_compressed_state_dict(folder)


# --------------------------------------------------------------------------------------------------
# the loader's arguments


def test_a_file_is_not_a_model_folder(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, {})
    monkeypatch.chdir(tmp_path)  # "config.json" alone could be a Hub id: only the file tells it apart
    paths = [
        "config.json",
        COMPRESSED_INDEX_NAME,
        tmp_path / "config.json",
        tmp_path / "nope" / "x",
        "./nope",
    ]
    for path in paths:
        with pytest.raises(FileNotFoundError, match=r"is not a model folder; give a folder with config.json"):
            MAIHTModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    "option",
    [
        {"gguf_file": "model.gguf"},
        {"state_dict": {}},
        {"quantization_config": {"load_in_8bit": True}},
        {"subfolder": "weights"},
    ],
)
def test_options_that_do_not_fit_a_compressed_folder_are_refused(tmp_path, option):
    model = make_tiny_model("llama")
    save_compressed(model, tmp_path, {})
    with pytest.raises(
        ValueError,
        match=rf"\['{next(iter(option))}'\] cannot be used with an optimum-maiht "
        "compressed checkpoint",
    ):
        MAIHTModelForCausalLM.from_pretrained(tmp_path, **option)


# --------------------------------------------------------------------------------------------------
# the encodings and argument checks


@pytest.mark.parametrize("cols", [1, 7, 8, 13, 64])
def test_bitmask_packing_round_trips(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.5
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_bitmask(packed, cols), mask)


def test_nan_is_kept_and_negative_zero_restored_as_zero():
    weight = torch.tensor([[1.5, -0.0, float("nan"), 0.0], [0.0, 0.0, 0.0, -2.0]])
    parts = compress_unstructured(weight)
    assert parts["compressed"].numel() == 3 and parts["row_offsets"].tolist() == [0, 2]
    restored = decompress("w", layer_entry("w", {"encoding": "bitmask", "dtype": "float32"}), parts, (2, 4))
    assert torch.equal(restored.isnan(), weight.isnan())  # NaN != NaN: compare NaNs and the rest apart
    assert torch.equal(torch.nan_to_num(restored), torch.nan_to_num(weight))


def test_nm_groups_with_fewer_nonzeros_are_padded():
    weight = torch.tensor([[0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0]])
    parts = compress_nm(weight, 2, 4)
    assert parts["compressed"].shape == (1, 4)
    info = {"encoding": "n:m", "n": 2, "m": 4, "transposed": False, "dtype": "float32"}
    assert torch.equal(decompress("w", layer_entry("w", info), parts, (1, 8)), weight)


def test_2d_checkpoints_keep_format_version_1(saved_2of4):
    """Without fused expert weights nothing changed: version 1, which every release reads."""
    folder, index = saved_2of4
    assert index["metadata"]["maiht_format_version"] == 1
    for shard in set(index["weight_map"].values()):
        with safe_open(str(folder / shard), framework="pt") as f:
            assert f.metadata()["maiht_format_version"] == "1"


def test_bad_sparse_layers_are_refused(tmp_path):
    model = make_tiny_model("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        save_compressed(model, tmp_path / "a", {name: (2, 4)})
    with pytest.raises(ValueError, match="not parameters of the model"):
        save_compressed(model, tmp_path / "b", {"model.layers.0.mlp.nope.weight": None})
    with pytest.raises(ValueError, match=r"\(N, M\)"):
        save_compressed(model, tmp_path / "c", {name: (4, 2)})
    model.save_pretrained(tmp_path / "d")
    with pytest.raises(FileExistsError, match="empty folder"):
        save_compressed(model, tmp_path / "d", {})
