"""Streaming every model: fused mixture-of-experts and renamed checkpoints are converted block by block with
transformers' own conversion, pruned, and saved back in the checkpoint's layout; the folder is the
in-memory run's, tensor for tensor. A checkpoint that does not fit its config stops with the tensor named,
before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, calibration_ids, make_tiny_model, make_tokenizer
from moe_models import MOE_FAMILIES, make_moe_model
from safetensors.torch import load_file, save_file
from test_streaming import assert_same_tensors, fail_after, folder_tensors, partial_folder, run_config
from transformers import AutoModelForCausalLM

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.conversion import CheckpointMismatchError
from optimum_maiht.experts import find_fused_experts
from optimum_maiht.files import UnsafeFileError

SHARD = "60KB"


def checkpoint(folder: Path, family: str) -> Path:
    """A tiny random model of ``family`` saved by transformers (its checkpoint layout), sharded."""
    model = make_moe_model(family) if family in MOE_FAMILIES else make_tiny_model(family)
    model.save_pretrained(folder, max_shard_size=SHARD)
    make_tokenizer().save_pretrained(folder)
    return folder


def both_ways(source: Path, tmp_path: Path, config: MAIHTConfig) -> None:
    """Prune ``source`` in memory and streamed; the two folders hold the same files and tensors."""
    pruner = MAIHTPruner.from_pretrained(source, config)
    pruner.prune(calibration_ids(), progress=False)
    pruner.save_pretrained(tmp_path / "memory", max_shard_size=SHARD)
    MAIHTPruner.prune_to_folder(
        source, tmp_path / "streamed", config, calibration_ids(), max_shard_size=SHARD, progress=False
    )
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    assert not partial_folder(tmp_path / "streamed").exists()


def assert_expert_pattern(folder: Path, pattern: str) -> None:
    """Every expert slice of every fused expert weight, as transformers loads the folder, has the pattern."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    fused = find_fused_experts(model)
    assert fused
    for weight in fused:
        for e in range(weight.num_experts):
            slice_ = weight.param[e]
            view = slice_.t() if type(model).__name__.startswith("GptOss") else slice_  # (in, out) storage
            if pattern == "2:4":
                groups = (view.reshape(view.shape[0], -1, 4) != 0).sum(-1)
                assert int(groups.max()) <= 2, (weight.name, e)
            else:
                assert float((view == 0).float().mean()) == pytest.approx(0.5, abs=1e-9), (weight.name, e)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "gpt_neox"])
def test_fused_experts_and_renamed_checkpoints_stream_like_the_in_memory_run(
    tmp_path: Path, family: str
) -> None:
    source = checkpoint(tmp_path / "src", family)
    pattern = "2:4" if family in ("mixtral", "gpt_oss") else "unstructured"
    both_ways(source, tmp_path, run_config(pattern=pattern, min_expert_tokens=0))
    if family in MOE_FAMILIES:
        assert_expert_pattern(tmp_path / "streamed", pattern)
    saved = set(folder_tensors(tmp_path / "streamed"))
    assert saved == set(load_file_names(source)), "saved in the checkpoint's own layout"


def load_file_names(folder: Path) -> list[str]:
    return [name for path in folder.glob("*.safetensors") for name in load_file(path)]


def test_a_killed_moe_run_resumes_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = checkpoint(tmp_path / "src", "qwen2_moe")
    config = run_config(min_expert_tokens=0)
    options = {"max_shard_size": SHARD, "progress": False}
    MAIHTPruner.prune_to_folder(source, tmp_path / "whole", config, calibration_ids(), **options)
    with monkeypatch.context() as patch:
        fail_after(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            MAIHTPruner.prune_to_folder(source, tmp_path / "out", config, calibration_ids(), **options)
    assert partial_folder(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()
    MAIHTPruner.prune_to_folder(source, tmp_path / "out", config, calibration_ids(), resume=True, **options)
    assert_same_tensors(tmp_path / "whole", tmp_path / "out")


def _damage(source: Path, name: str, change) -> Path:
    """Rewrite the shard holding ``name`` with ``change(tensor)`` in its place."""
    for path in source.glob("*.safetensors"):
        tensors = load_file(path)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, str(path), metadata={"format": "pt"})
            return path
    raise AssertionError(f"{name} is in no shard")


@pytest.mark.parametrize(
    "family, name, change",
    [
        ("llama", "model.layers.1.input_layernorm.weight", lambda t: torch.cat([t, t])),  # a norm
        ("llama", "model.embed_tokens.weight", lambda t: t[:-1]),  # an embedding
        ("llama", "model.layers.0.mlp.down_proj.weight", lambda t: t.t().contiguous()),  # a projection
        ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w1.weight", lambda t: t[:-1]),  # an expert
        ("llama", "model.layers.1.self_attn.q_proj.weight", lambda t: t.to(torch.int32)),  # a dtype
    ],
    ids=["norm", "embedding", "projection", "expert", "dtype"],
)
def test_a_mismatched_tensor_stops_the_run_naming_it_and_writes_nothing(
    tmp_path: Path, family: str, name: str, change
) -> None:
    source = checkpoint(tmp_path / "src", family)
    shard = _damage(source, name, change)
    with pytest.raises(CheckpointMismatchError) as error:
        MAIHTPruner.prune_to_folder(source, tmp_path / "out", run_config(), calibration_ids(), progress=False)
    assert name in str(error.value) and shard.name in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial folder


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE_FAMILIES + ARCHITECTURES)
def test_optimum_cli_streams_every_family(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """``optimum-cli maiht prune`` streams (its default) every family the pipeline supports, to the target
    pattern on every expert slice, and the folder loads to the in-memory run's tensors."""
    from test_cli import run_cli

    source = checkpoint(tmp_path / "src", family)
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    common = ["--model", str(source), "--dataset", str(tmp_path / "calib.txt"), "--pattern", "2:4"]
    common += [
        "--num-samples",
        "4",
        "--sequence-length",
        "32",
        "--iterations",
        "2",
        "--refit-iterations",
        "2",
    ]
    common += ["--min-expert-tokens", "0"]
    assert run_cli(monkeypatch, "maiht", "prune", *common, "--output", str(tmp_path / "streamed")) == 0
    assert not partial_folder(tmp_path / "streamed").exists()
    assert (
        run_cli(monkeypatch, "maiht", "prune", *common, "--output", str(tmp_path / "memory"), "--no-stream")
        == 0
    )
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    memory = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert streamed.keys() == memory.keys()
    for key, tensor in memory.items():
        assert torch.equal(streamed[key], tensor), key
    if family in MOE_FAMILIES:
        assert_expert_pattern(tmp_path / "streamed", "2:4")


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_an_index_naming_a_file_outside_the_folder_is_refused_alike(tmp_path: Path, where: str) -> None:
    """The streaming reader resolves every shard the index names inside the checkpoint folder
    (``files.resolve_inside``): ``..``, an absolute path and a symlink out are refused, with the same
    message whether the outside file exists or not, and nothing is written."""
    source = checkpoint(tmp_path / "src", "llama")
    index = source / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    messages = []
    for exists in (True, False):
        target = outside / ("real.safetensors" if exists else "missing.safetensors")
        if exists:
            shutil.copy(source / victim, target)
        if where == "symlink":
            link = source / f"link-{exists}.safetensors"
            link.symlink_to(target)
            name = link.name
        else:
            name = str(target) if where == "absolute" else f"../outside/{target.name}"
        bad = {**data, "weight_map": {k: (name if f == victim else f) for k, f in data["weight_map"].items()}}
        index.write_text(json.dumps(bad))
        with pytest.raises(UnsafeFileError) as error:
            MAIHTPruner.prune_to_folder(
                source, tmp_path / "out", run_config(), calibration_ids(), progress=False
            )
        message = str(error.value)  # the name is shown cut to 80 characters: compare what surrounds it
        messages.append((message.split(" the shard named in")[0], message.split(" points outside")[1]))
        assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()
    assert messages[0] == messages[1]  # nothing said about whether the outside file exists
