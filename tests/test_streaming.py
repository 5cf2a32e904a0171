"""Streaming a checkpoint block by block (``MAIHTPruner.prune_to_folder``, ``optimum-cli maiht prune``'s
default) and resuming a killed run: the folder written is the in-memory path's, tensor for tensor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids, make_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.conversion import CheckpointMismatchError
from optimum_maiht.pipeline.capture import activations_device
from optimum_maiht.report import PruneReport
from optimum_maiht.streaming import (
    PARTIAL_SUFFIX,
    ResumeError,
    StreamingStore,
    partial_folder,
)
from optimum_maiht.writer import write_safetensors

BLOCKS = 4
SHARD = "100KB"  # a tiny model in several shards: blocks and outside weights spread over files
WORKER = Path(__file__).resolve().parent / "streaming_worker.py"


def run_config(**changes) -> MAIHTConfig:
    values = dict(num_samples=8, sequence_length=32, batch_size=4, iterations=3, refit_iterations=3)
    return MAIHTConfig(**{**values, **changes})


def make_checkpoint(folder: Path, tied: bool = False, seed: int = 0, shard: str = SHARD) -> Path:
    """A random Llama-style model of BLOCKS blocks saved by transformers (by default in several shards),
    with a tokenizer."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    make_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 2 or shard != SHARD
    return folder


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(a: Path, b: Path, sharded: bool = True) -> None:
    """Every tensor of every shard equal (``torch.equal``), the same files and the same index."""
    ta, tb = folder_tensors(a), folder_tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [
        name for name in ta if ta[name].dtype != tb[name].dtype or not torch.equal(ta[name], tb[name])
    ]
    assert not different, different[:5]
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert shards == sorted(p.name for p in b.glob("*.safetensors")) and (len(shards) > 1) == sharded
    for index in a.glob("*.index.json"):
        assert json.loads(index.read_text()) == json.loads((b / index.name).read_text())


def in_memory(source: Path, output: Path, config: MAIHTConfig, save_format: str = "dense") -> PruneReport:
    pruner = MAIHTPruner.from_pretrained(source, config)
    pruner.prune(calibration_ids(), progress=False)
    pruner.save_pretrained(output, save_format=save_format, max_shard_size=SHARD)
    return pruner.report


def streamed(source: Path, output: Path, config: MAIHTConfig, **options) -> PruneReport:
    options = {"max_shard_size": SHARD, "progress": False, **options}
    return MAIHTPruner.prune_to_folder(source, output, config, calibration_ids(), **options)


@pytest.mark.parametrize("save_format", ["dense", "compressed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streaming_writes_the_in_memory_folder(tmp_path: Path, save_format: str, tied: bool) -> None:
    source = make_checkpoint(tmp_path / "src", tied=tied)
    config = run_config(pattern="2:4" if save_format == "compressed" else "unstructured")
    report = in_memory(source, tmp_path / "memory", config, save_format)
    streamed_report = streamed(source, tmp_path / "streamed", config, save_format=save_format)

    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    assert len(streamed_report.pruned) == len(report.pruned) == BLOCKS * 7
    assert [layer.error for layer in streamed_report.layers] == [layer.error for layer in report.layers]
    for name in ("config.json", "generation_config.json", "maiht_config.json"):
        assert (tmp_path / "memory" / name).read_text() == (tmp_path / "streamed" / name).read_text(), name
    assert (tmp_path / "streamed" / "README.md").is_file() and (
        tmp_path / "streamed" / "maiht_report.json"
    ).is_file()
    assert not partial_folder(tmp_path / "streamed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "src", "streamed"]  # no temporary left
    if save_format == "dense":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        assert (model.model.layers[BLOCKS - 1].mlp.up_proj.weight == 0).float().mean() == 0.5


def fail_after(monkeypatch: pytest.MonkeyPatch, stop: int) -> None:
    """Make the streaming run fail right after block ``stop`` is in the partial folder."""
    done = StreamingStore.done

    def done_then_fail(self, index, block, record):
        done(self, index, block, record)
        if index == stop:
            raise KeyboardInterrupt("interrupted for the test")

    monkeypatch.setattr(StreamingStore, "done", done_then_fail)


def test_interrupted_run_resumes_bit_identical_and_refuses_a_different_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_checkpoint(tmp_path / "src")
    config = run_config()
    streamed(source, tmp_path / "whole", config)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        fail_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            streamed(source, out, config)
    partial = partial_folder(out)
    assert sorted(p.name for p in (partial / "blocks").glob("*.json")) == [
        "block-00000.json",
        "block-00001.json",
    ]
    assert not out.exists()

    with pytest.raises(ResumeError, match="resume=True.*--resume.*delete") as refused:
        streamed(source, out, config)
    assert "2 blocks pruned" in str(refused.value) and partial.is_dir()  # reported, not deleted

    with pytest.raises(ResumeError, match=r"config \(sparsity: 0\.5 -> 0\.6\)"):
        streamed(source, out, run_config(sparsity=0.6), resume=True)
    with pytest.raises(ResumeError, match="calibration"):
        MAIHTPruner.prune_to_folder(source, out, config, calibration_ids(seed=1), resume=True, progress=False)
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(ResumeError, match="model"):
        streamed(other, out, config, resume=True)
    assert partial.is_dir()

    loaded = []
    load = StreamingStore.load
    monkeypatch.setattr(
        StreamingStore,
        "load",
        lambda self, i, block: loaded.append((i, i in self._done)) or load(self, i, block),
    )
    state = json.loads((partial / "state.json").read_text())
    assert state["world_size"] == 1
    (partial / "state.json").write_text(json.dumps({**state, "world_size": 2}))  # as if started by torchrun
    with caplog.at_level("WARNING", logger="optimum_maiht.streaming"):
        report = streamed(source, out, config, resume=True)
    assert "had 2 processes and this one has 1" in caplog.text  # said, not refused
    assert sorted({i for i, from_partial in loaded if from_partial}) == [0, 1]  # read back, not pruned again
    assert_same_tensors(tmp_path / "whole", out)
    assert len(report.block_seconds) == BLOCKS and len(report.pruned) == BLOCKS * 7
    assert not partial.exists()


def test_sigkilled_run_resumes_bit_identical(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "src")
    streamed(source, tmp_path / "whole", run_config())
    out = tmp_path / "out"
    blocks = partial_folder(out) / "blocks"
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent)}
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), str(source), str(out), "1"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(blocks.glob("*.json"))) < 2:
            assert worker.poll() is None, worker.stderr.read()
            assert time.monotonic() < deadline, "the worker did not prune two blocks in time"
            time.sleep(0.1)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert not out.exists() and len(list(blocks.glob("*.json"))) == 2

    streamed(source, out, run_config(), resume=True)
    assert_same_tensors(tmp_path / "whole", out)
    assert not partial_folder(out).exists()


def test_a_checkpoint_lacking_weights_is_refused_naming_one(tmp_path: Path) -> None:
    """Weights under other names (an older naming) are missing weights: the error names one, before any
    block is read or any folder written."""
    source = make_checkpoint(tmp_path / "src")
    shard = sorted(source.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    renamed = {name.replace("model.", "transformer.", 1): t for name, t in tensors.items()}
    save_file(renamed, str(shard), metadata={"format": "pt"})
    index = source / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {
        name.replace("model.", "transformer.", 1) if file == shard.name else name: file
        for name, file in data["weight_map"].items()
    }
    index.write_text(json.dumps(data))
    first = sorted(n for n in tensors if n.startswith("model."))[0]
    with pytest.raises(CheckpointMismatchError, match="lacks model"):
        streamed(source, tmp_path / "out", run_config())
    assert not (tmp_path / "out").exists() and not partial_folder(tmp_path / "out").exists()
    assert first.startswith("model.")


def test_a_hub_id_is_downloaded_first_and_named_in_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    source = make_checkpoint(tmp_path / "src")
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(source)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    report = streamed("someone/tiny-llama", tmp_path / "out", run_config())
    assert asked[0][0] == "someone/tiny-llama" and "*.bin" in asked[0][1]["ignore_patterns"]
    assert report.base_model == "someone/tiny-llama"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: someone/tiny-llama" in card


def test_incremental_safetensors_writer_round_trips_every_dtype(tmp_path: Path) -> None:
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "i64": torch.tensor([5, -1], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    planned = {name: torch.empty_like(t, device="meta") for name, t in tensors.items()}
    fetched = []
    write_safetensors(
        tmp_path / "x.safetensors", planned, lambda n: fetched.append(n) or tensors[n], {"a": "b"}
    )
    assert fetched == list(tensors)  # one at a time, in order
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in tensors.items())
    with pytest.raises(RuntimeError, match="planned"):
        write_safetensors(tmp_path / "y.safetensors", planned, lambda n: torch.zeros(2), {})


def test_offloading_activations_is_chosen_by_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1, vocab_size=32)
    )
    ids = torch.zeros(8, 128, dtype=torch.long)  # activations: 2 * 8 * 128 * 64 * 4 bytes = 512 KiB
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**31))
    assert activations_device(model, ids, cuda, None) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20 - 1, 2**31))  # < 2x 512 KiB
    assert activations_device(model, ids, cuda, None) == torch.device("cpu")
    assert activations_device(model, ids, cuda, True) == torch.device("cpu")
    assert activations_device(model, ids, cuda, False) is None
    assert activations_device(model, ids, torch.device("cpu"), True) is None  # nothing to offload


def test_offloaded_activations_are_parked_between_uses_and_give_the_same_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the activations offloaded, every block reads its hidden states through the placement's
    ``fetch`` (to the compute device), and everything fetched was ``park``-ed there first (on the CPU
    beside a GPU); the pruned model is the same. A spy placement makes the moves visible on the CPU."""
    import optimum_maiht.pipeline.sequential as sequential
    from optimum_maiht.pipeline import Placement

    parked: list[torch.Tensor] = []
    fetched: list[torch.Tensor] = []

    class SpyPlacement(Placement):
        def park(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.parked is None:
                return tensor
            parked.append(tensor.clone())
            return parked[-1]

        def fetch(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.parked is None or tensor.dtype == torch.long:  # token ids at capture
                return tensor
            assert any(tensor is p for p in parked), "a block read activations that were never parked"
            fetched.append(tensor.clone())
            return fetched[-1]

    def prune(offload: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        ).eval()
        capturing = [False]
        real_capture = sequential.capture_block_inputs

        def capture(*args, **kwargs):
            capturing[0] = True
            try:
                return real_capture(*args, **kwargs)
            finally:
                capturing[0] = False

        def check(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            assert capturing[0] or any(hidden is f for f in fetched), "hidden states not fetched"

        for block in model.model.layers if offload else []:
            block.register_forward_pre_hook(check, with_kwargs=True)
        monkeypatch.setattr(sequential, "Placement", SpyPlacement)
        monkeypatch.setattr(sequential, "capture_block_inputs", capture)
        monkeypatch.setattr(
            sequential, "activations_device", lambda *a: torch.device("cpu") if offload else None
        )
        # the layer solves' passes (the refit reads its pieces of the same parked tensors by row slices)
        config = run_config(reconstruction_epochs=0)
        MAIHTPruner(model, config, offload_activations=offload).prune(calibration_ids(), progress=False)
        return model.state_dict()

    kept = prune(False)
    assert not parked and not fetched
    offloaded = prune(True)
    batches = 2  # 8 windows in batches of 4
    assert len(parked) >= batches * 3  # block 0's inputs, then each block's outputs
    assert len(fetched) >= batches * 2 * 2  # both passes (statistics, propagation) of both blocks
    assert all(torch.equal(offloaded[name], kept[name]) for name in kept)


def test_cli_streams_by_default_and_resume_needs_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from test_cli import run_cli

    source = make_checkpoint(tmp_path / "src", shard="5GB")  # one model.safetensors, no index
    assert [p.name for p in source.glob("*.safetensors")] == ["model.safetensors"]
    (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    common = ["--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--sequence-length", "32"]
    common += ["--iterations", "2", "--refit-iterations", "2"]
    opened = []
    monkeypatch.setattr(StreamingStore, "open", classmethod(_recording_open(opened)))

    out = tmp_path / "out"
    assert run_cli(monkeypatch, "maiht", "prune", "--model", str(source), "--output", str(out), *common) == 0
    captured = capsys.readouterr()
    assert opened == [str(source)] and "streaming" in captured.err and "mAIHT pruning done" in captured.out
    assert (out / "maiht_report.json").is_file() and not partial_folder(out).exists()

    memory = tmp_path / "memory"
    args = ["maiht", "prune", "--model", str(source), "--output", str(memory), "--no-stream", *common]
    assert run_cli(monkeypatch, *args) == 0
    assert opened == [str(source)]  # --no-stream: loaded whole
    assert_same_tensors(memory, out, sharded=False)

    capsys.readouterr()
    args = ["maiht", "prune", "--model", str(source), "--output", str(tmp_path / "x"), "--resume", "--eval"]
    assert run_cli(monkeypatch, *args, *common) == 1
    assert "--resume continues a streaming run, which --eval turns off" in capsys.readouterr().err

    (tmp_path / ("y" + PARTIAL_SUFFIX)).mkdir()
    args = ["maiht", "prune", "--model", str(source), "--output", str(tmp_path / "y"), *common]
    assert run_cli(monkeypatch, *args) == 1
    assert "--resume" in capsys.readouterr().err


def _recording_open(opened: list[str]):
    original = StreamingStore.open.__func__

    def record(cls, source, *args, **kwargs):
        opened.append(str(source))
        return original(cls, source, *args, **kwargs)

    return record
