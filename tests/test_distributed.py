"""Several processes (torch.distributed, gloo on the CPU): the same result as one process, failures shared.

Each test launches 2 ranks the way ``torchrun`` does (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``) with ``tests/dist_worker.py``, and compares with one process run here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from dist_worker import CASES, EVAL, FAILURE, RECONSTRUCTION, prune
from transformers import AutoModelForCausalLM

from optimum_maiht import distributed
from optimum_maiht.distributed import SINGLE, Distributed
from optimum_maiht.evaluation import perplexity
from optimum_maiht.pipeline.solve import plan_solves
from optimum_maiht.report import PruneReport

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TIMEOUT = 120
OPTIMUM_TIMEOUT = distributed.TIMEOUT_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world_size: int = 2) -> list[subprocess.CompletedProcess]:
    """Run the ranks to the end (killed after TIMEOUT seconds: a hang fails the test)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "OPTIMUM_MAIHT_DIST_TIMEOUT": "60",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + TIMEOUT
    results = []
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} did not finish within {TIMEOUT} s (hang)")
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, output))
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    results = launch("compare", out)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    return out, results


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_prune_like_one(case, two_ranks):
    out, _ = two_ranks
    model, pruner = prune(case)  # one process, here
    single = pruner.report
    ranks = [torch.load(out / f"{case}-rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, tensor in ranks[0]["state"].items():  # both ranks hold the same pruned model
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    report = PruneReport.from_dict(ranks[0]["report"])
    assert report.world_size == 2 and single.world_size == 1
    # the windows shared out, the log-likelihoods summed: the one-process perplexity of this model
    ppl = perplexity(model, None, calibration_ids(**EVAL), batch_size=2)
    assert ranks[0]["perplexity"] == ranks[1]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert ranks[1]["report"]["layers"] == ranks[0]["report"]["layers"]
    assert len(report.block_seconds) == len(single.block_seconds)

    params = dict(model.named_parameters())
    assert [layer.name for layer in report.layers] == [layer.name for layer in single.layers]
    for mine, theirs in zip(single.layers, report.layers, strict=True):
        assert (mine.tokens, mine.statistics, mine.shape) == (theirs.tokens, theirs.statistics, theirs.shape)
        assert theirs.sparsity == pytest.approx(mine.sparsity, abs=1e-12), mine.name
        assert theirs.error_wanda == pytest.approx(mine.error_wanda, rel=1e-4), mine.name
        assert theirs.error == pytest.approx(mine.error, rel=1e-4), mine.name
        assert len(theirs.history) == len(mine.history)
        assert theirs.history == pytest.approx(mine.history, rel=1e-4), mine.name
    for name, tensor in ranks[0]["state"].items():
        if name in params and params[name].dim() >= 2:
            agree = float(((tensor == 0) == (params[name] == 0)).float().mean())
            assert agree >= 0.999, (name, agree)
            assert torch.allclose(tensor, params[name], rtol=1e-3, atol=1e-5), name

    # only rank 0 wrote its folder, and it loads
    saved = out / f"{case}-saved-rank0"
    assert not (out / f"{case}-saved-rank1").exists()
    assert json.loads((saved / "maiht_report.json").read_text())["world_size"] == 2
    if "moe" not in case:
        AutoModelForCausalLM.from_pretrained(saved)


@pytest.mark.parametrize("where", ["solve", "forward", "refit"])
def test_a_failure_on_one_rank_stops_every_rank_with_its_message(where, tmp_path):
    start = time.monotonic()
    results = launch(f"fail_{where}", tmp_path)
    assert time.monotonic() - start < TIMEOUT
    for rank, result in enumerate(results):
        assert result.returncode != 0, f"rank {rank} succeeded:\n{result.stdout[-3000:]}"
        assert FAILURE in result.stdout, f"rank {rank}:\n{result.stdout[-3000:]}"
    assert "ValueError: rank 1/2 failed: ValueError: " + FAILURE in results[0].stdout


def test_two_processes_refit_blocks_with_the_same_steps(tmp_path):
    """Block reconstruction under two ranks: the gradients are summed every step, so both ranks hold the
    same refitted model; the 2:4 pattern survives and the refit lowers the blocks' output error."""
    results = launch("reconstruction", tmp_path)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
    ranks = [torch.load(tmp_path / f"rec-rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
        if name.endswith("proj.weight"):
            assert int((tensor.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2, name
    report = PruneReport.from_dict(ranks[0]["report"])
    for mine, theirs in zip(*(r["report"]["reconstruction"] for r in ranks), strict=True):
        assert {**mine, "seconds": 0} == {**theirs, "seconds": 0}  # the same errors and epochs
    assert report.config["reconstruction_epochs"] == RECONSTRUCTION["reconstruction_epochs"]
    assert [b.block for b in report.reconstruction] == [0, 1]
    assert all(b.epochs_run >= 1 for b in report.reconstruction)
    assert any(b.error_refit < b.error_solved for b in report.reconstruction)
    # block 0's held-out error after the layer solves is the one-process figure: the same global held-out
    # batches, the errors summed over the ranks (the solves differ only in summation order)
    from optimum_maiht import MAIHTConfig, MAIHTPruner

    single = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**RECONSTRUCTION))
    single.prune(calibration_ids(), progress=False)
    first = single.report.reconstruction[0]
    assert report.reconstruction[0].error_solved == pytest.approx(first.error_solved, rel=1e-4)


def test_single_process_takes_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.current("cpu") is SINGLE
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.current("cpu") is SINGLE and not distributed.launched()


def test_plan_spreads_the_cost_and_splits_only_row_separable_layers():
    # Llama-3-8B block: q, k, v, o, gate, up, down
    h, i, kv = 4096, 14336, 1024
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    for world in (1, 2, 4, 8):
        for split in (False, True):
            pieces = plan_solves(shapes, world, split)
            assert pieces == plan_solves(shapes, world, split)  # deterministic
            for job, (out, _) in enumerate(shapes):  # every row of every layer exactly once
                rows = sorted((p.start, p.stop) for p in pieces if p.job == job)
                assert rows[0][0] == 0 and rows[-1][1] == out
                assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
            if not split:
                assert len(pieces) == len(shapes)
            loads = [sum(p.cost for p in pieces if p.owner == r) for r in range(world)]
            total = sum(loads)
            if split:
                assert max(loads) <= 1.1 * total / world, (world, loads)
    unsplit = plan_solves(shapes, 4, False)
    assert max(sum(p.cost for p in unsplit if p.owner == r) for r in range(4)) == unsplit[-1].cost  # down


def test_windows_are_shared_out_whole_batches_first():
    windows = torch.arange(10)[:, None]

    def shards(world, batch):
        parts = []
        for rank in range(world):
            fake = Distributed.__new__(Distributed)
            fake.rank, fake.world_size = rank, world
            parts.append(fake.shard_windows(windows, batch)[:, 0].tolist())
        return parts

    assert shards(2, 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert shards(3, 2) == [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert shards(4, 8) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert shards(12, 1)[10:] == [[8], [9]]
    assert sum(shards(12, 1), []) == list(range(10))


def test_two_processes_stream_resume_and_write_once(tmp_path):
    """Streaming under torchrun: rank 0 alone writes the partial folder and the output, which matches a
    one-process streamed run up to summation order (masks >= 99.9% equal, the rows whose masks agree
    close: a flipped weight moves its row), a dense and a fused-expert checkpoint alike; a run failing on
    rank 1 after two blocks resumes (the finished blocks broadcast by rank 0) and ends bit-identical to the
    uninterrupted two-process run."""
    from dist_worker import STREAM, STREAM_SHARD
    from moe_models import make_moe_model
    from test_streaming import assert_same_tensors, folder_tensors, make_checkpoint

    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.streaming import partial_folder

    make_checkpoint(tmp_path / "checkpoint")
    make_moe_model("qwen3_moe").save_pretrained(tmp_path / "moe-checkpoint", max_shard_size=STREAM_SHARD)
    results = launch("stream", tmp_path)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout[-4000:]}"
        record = json.loads((tmp_path / f"stream-rank{rank}.json").read_text())
        assert record["world_size"] == 2 and record["same_errors"], record
        expected = FAILURE if rank == 1 else "rank 1/2 failed: ValueError: " + FAILURE
        assert record["failure"] == expected, record
        assert record["finished"] == ["block-00000.json", "block-00001.json"], record
    assert_same_tensors(tmp_path / "whole", tmp_path / "resumed")
    assert not partial_folder(tmp_path / "resumed").exists()
    report = PruneReport.from_dict(json.loads((tmp_path / "whole" / "maiht_report.json").read_text()))
    assert report.world_size == 2 and len(report.pruned) == 4 * 7

    one = tmp_path / "one"
    config = MAIHTConfig(**STREAM)
    MAIHTPruner.prune_to_folder(
        tmp_path / "checkpoint", one, config, calibration_ids(), max_shard_size=STREAM_SHARD
    )
    moe = tmp_path / "moe-one"
    config = MAIHTConfig(**STREAM, min_expert_tokens=0)
    MAIHTPruner.prune_to_folder(
        tmp_path / "moe-checkpoint", moe, config, calibration_ids(), max_shard_size=STREAM_SHARD
    )
    for whole, single in ((tmp_path / "whole", one), (tmp_path / "moe-whole", moe)):
        mine, theirs = folder_tensors(single), folder_tensors(whole)
        assert sorted(mine) == sorted(theirs)
        experts = [name for name in mine if ".experts." in name]
        assert experts or whole.name == "whole"  # the MoE folder is in the checkpoint's per-expert layout
        for name, tensor in mine.items():
            if tensor.dim() >= 2 and ".layers." in name:
                same = (tensor == 0) == (theirs[name] == 0)
                assert float(same.float().mean()) >= 0.999, (name, float(same.float().mean()))
                # a flipped weight moves the rest of its row (the solve compensates): compare the others
                rows = same.reshape(-1, same.shape[-1]).all(-1)
                mine_rows, their_rows = (t.reshape(-1, t.shape[-1])[rows] for t in (tensor, theirs[name]))
                assert torch.allclose(mine_rows, their_rows, rtol=1e-3, atol=1e-5), name


@pytest.mark.slow
def test_optimum_cli_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 $(command -v optimum-cli) maiht prune`` (streaming, the default): one
    folder written by rank 0, the summary printed once, the report's world size 2, every pruned layer at
    a valid 2:4."""
    from conftest import make_tiny_model, make_tokenizer

    from optimum_maiht.data import bundled_text

    make_tiny_model("llama").save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(bundled_text("wikitext2")[:8000], encoding="utf-8")
    cli = Path(sys.executable).with_name("optimum-cli")
    command = [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(cli)],
        *["maiht", "prune", "--model", "tiny", "--output", "out", "--pattern", "2:4", "--device", "cpu"],
        *["--dataset", "calib.txt", "--num-samples", "8", "--sequence-length", "32", "--batch-size", "2"],
        *["--iterations", "5", "--refit-iterations", "5"],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", OPTIMUM_TIMEOUT: "60"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("mAIHT pruning done") == 1, result.stdout
    assert result.stderr.count("block by block into") == 1, result.stderr[-3000:]  # streamed; said once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "out", "tiny"]
    report = PruneReport.from_dict(json.loads((tmp_path / "out" / "maiht_report.json").read_text()))
    assert report.world_size == 2 and report.pruned
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    params = dict(model.named_parameters())
    for layer in report.pruned:
        weight = params[f"{layer.name}.weight"]
        assert int((weight.reshape(-1, 4) != 0).sum(dim=1).max()) <= 2, layer.name
