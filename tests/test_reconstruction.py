"""Block reconstruction (``reconstruction_epochs > 0``): the refit of a pruned block's kept weights to the
dense block's output lowers its error, never moves a zero, keeps the starting weights when it cannot help,
and is off by default (docs/design.md, "Block reconstruction")."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, calibration_ids, make_tiny_model
from moe_models import MOE_FAMILIES, make_moe_model
from test_streaming import assert_same_tensors, fail_after, in_memory, make_checkpoint, streamed

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.cli.prune import prune_summary
from optimum_maiht.distributed import SINGLE
from optimum_maiht.experts import eager_experts
from optimum_maiht.model_card import render_model_card
from optimum_maiht.model_utils import final_norm, find_decoder_blocks, is_norm
from optimum_maiht.pipeline import BlockCall, BlockContext, Placement
from optimum_maiht.pipeline.capture import capture_block_inputs, first_reader, replay
from optimum_maiht.pipeline.precision import agreed_dtype, native_bfloat16, resolve_compute_dtype
from optimum_maiht.pipeline.reconstruct import (
    REFIT_BYTES_PER_WEIGHT,
    _refit_pieces,
    holdout_batches,
    holdout_error,
    reconstruct_block,
    refit_block,
)
from optimum_maiht.pipeline.solve import Solving, solve_block
from optimum_maiht.report import BlockReconstruction, PruneReport
from optimum_maiht.streaming import StreamingStore, partial_folder
from optimum_maiht.targets import find_targets

CPU = Placement(torch.device("cpu"))

SMALL = dict(num_samples=16, sequence_length=32, batch_size=2, iterations=3, refit_iterations=3)


def config(**changes) -> MAIHTConfig:
    """The refit's tests in float32 wherever they run ("auto" is bfloat16 on a CPU that has it natively)."""
    fields = {**SMALL, "reconstruction_epochs": 3, "reconstruction_lr": 5e-3}
    return MAIHTConfig(**fields | {"compute_dtype": "float32"} | changes)


def pruned_block(model, cfg: MAIHTConfig) -> tuple[BlockContext, list]:
    """Block 0 of ``model`` pruned by the layer solves, with what its refit needs: its context (block,
    targets, pruned inputs, calls, dense outputs) and its layer reports."""
    name, blocks = find_decoder_blocks(model)
    targets = find_targets(model, name, blocks, cfg)[0]
    ids = calibration_ids(cfg.num_samples, cfg.sequence_length)
    hidden, calls = capture_block_inputs(model, blocks, ids, cfg.batch_size, CPU)
    block = blocks[0]
    dense = replay(block, hidden, calls[0])
    ctx = BlockContext(0, block, targets, calls[0], hidden, CPU, dense)
    layers = solve_block(
        targets, functools.partial(replay, block, hidden, calls[0]), Solving.from_config(cfg, SINGLE)
    )
    return ctx, layers


def refit(ctx: BlockContext, layers: list, cfg: MAIHTConfig) -> BlockReconstruction:
    return reconstruct_block(ctx, layers, cfg, SINGLE)


def target_weights(targets) -> dict[str, torch.Tensor]:
    weights = {n: m.weight for n, m in targets.linears.items()}
    return weights | {w.name: w.param for w in targets.experts}


def block_error(
    ctx: BlockContext, batches: list[int] | None = None, autocast: torch.dtype | None = None
) -> float:
    """The mean over the tokens of ``batches`` (default all) of each token's squared error relative to its
    dense output's squared norm, both read by ``ctx.reader`` when there is one; the block's matrix products
    under ``autocast`` (``None``: float32)."""
    hidden, calls, dense = ctx.hidden, ctx.calls, ctx.dense
    batches = range(len(hidden)) if batches is None else batches
    out = replay(ctx.block, [hidden[k] for k in batches], [calls[k] for k in batches], autocast=autocast)
    if ctx.reader is not None:
        with torch.no_grad():
            out, dense = [ctx.reader(o) for o in out], [ctx.reader(d) for d in dense]
    errors = [
        ((o.double() - dense[k].double()).square().sum(-1) / dense[k].double().square().sum(-1)).flatten()
        for o, k in zip(out, batches, strict=True)
    ]
    return float(torch.cat(errors).mean())


@pytest.mark.parametrize(
    "family, pattern, piece",
    [
        ("llama", "unstructured", 1),  # one window per Adam step (the default)
        ("llama", "2:4", 1),
        ("qwen3_moe", "unstructured", 1),
        ("qwen3_moe", "2:4", 1),
        ("llama", "unstructured", 2),  # one step per batch of 2 windows
        ("qwen3_moe", "2:4", 2),
        ("llama", "2:4", "bfloat16"),  # forward and backward under autocast, the weights in float32
        ("qwen3_moe", "unstructured", "bfloat16"),
    ],
)
def test_refit_lowers_the_block_error_and_never_moves_a_zero(
    family: str, pattern: str, piece: int | str
) -> None:
    moe = family == "qwen3_moe"
    model = make_moe_model(family) if moe else make_tiny_model(family)
    precision = piece if isinstance(piece, str) else "float32"
    piece = 1 if isinstance(piece, str) else piece
    cfg = config(pattern=pattern, min_expert_tokens=0, reconstruction_batch_size=piece)
    cfg = dataclasses.replace(cfg, compute_dtype=precision)
    with eager_experts(model) if moe else contextlib.nullcontext():
        ctx, layers = pruned_block(model, cfg)
        block, targets = ctx.block, ctx.targets
        weights = target_weights(targets)
        assert not moe or targets.experts  # the fused expert slices are refitted too
        before = {n: w.detach().clone() for n, w in weights.items()}
        others = {n: p.detach().clone() for n, p in block.named_parameters() if p.dim() < 2}  # norms
        held = holdout_batches([len(ctx.hidden)], cfg.reconstruction_holdout)
        autocast = torch.bfloat16 if precision == "bfloat16" else None  # as the refit measures
        measure = functools.partial(block_error, ctx, autocast=autocast)
        error_start, held_start = measure(), measure(held)
        result = refit(ctx, layers, cfg)
        error_end, held_end = measure(), measure(held)

    assert result.skipped is None and result.epochs >= 1 and result.precision == precision
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert error_end < 0.95 * error_start  # on every calibration window
    same = 1e-5 if autocast is None else 1e-3  # bfloat16: whole batches here, pieces there
    assert result.error_solved == pytest.approx(held_start, rel=same)  # the report: the held-out ones
    assert result.error_refit == pytest.approx(held_end, rel=same)
    assert result.error_refit < result.error_solved
    for name, weight in weights.items():
        assert torch.equal(weight == 0, before[name] == 0), name  # the same zeros, exactly
        assert not torch.equal(weight, before[name]), name  # and the kept weights moved
        if pattern == "2:4":
            groups = (weight.reshape(*weight.shape[:-1], -1, 4) != 0).sum(-1)
            assert int(groups.max()) <= 2, name
        else:
            assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-9), name
    for name, param in block.named_parameters():
        if name in others:
            assert torch.equal(param, others[name]), name  # norms are not refitted


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3", "gpt2", "opt", "gpt_neox", "qwen2_moe"])
def test_a_piece_of_a_batch_gives_those_rows_of_the_whole_batch(family: str) -> None:
    """Cutting a recorded call by rows (attention masks, position ids, rotary tables) changes nothing
    for the windows kept: the refit's pieces see exactly what the whole batch saw."""
    moe = family == "qwen2_moe"
    model = make_moe_model(family) if moe else make_tiny_model(family)
    with eager_experts(model) if moe else contextlib.nullcontext():
        _, blocks = find_decoder_blocks(model)
        hidden, calls = capture_block_inputs(model, blocks, calibration_ids(8, 32), 4, CPU)
        ctx = BlockContext(1, blocks[1], None, calls[1], hidden, CPU)
        pieces = _refit_pieces(ctx, calls[1], 3, torch.device("cpu"))
        assert [(p.batch, p.rows.start) for p in pieces] == [(0, 0), (0, 3), (1, 0), (1, 3)]
        with torch.no_grad():
            for p in pieces:
                whole = calls[1][p.batch].run(blocks[1], hidden[p.batch])[p.rows]
                cut = p.call.run(blocks[1], hidden[p.batch][p.rows])
                torch.testing.assert_close(cut, whole, rtol=1e-5, atol=1e-6)


def test_a_call_that_cannot_be_cut_falls_back_to_whole_batches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A per-window tensor the row rule misses (simulated: the cut call's rotary tables are wrong) is
    caught by the check: the refit runs on whole batches, as with ``reconstruction_batch_size=batch_size``."""

    def wrong_cut(call, rows, batch):
        return call.map_tensors(lambda t: 2 * t if t.is_floating_point() else t)

    monkeypatch.setattr(BlockCall, "rows", wrong_cut)
    states = []
    for piece in (1, SMALL["batch_size"]):
        ctx, layers = pruned_block(make_tiny_model("llama"), config())
        cfg = config(reconstruction_batch_size=piece)
        with caplog.at_level(logging.WARNING, logger="optimum_maiht.pipeline.reconstruct"):
            refit(ctx, layers, cfg)
        states.append({n: t.clone() for n, t in ctx.block.state_dict().items()})
    assert "cannot be cut into pieces of 1 windows" in caplog.text
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


def test_refit_keeps_the_starting_weights_when_it_cannot_help(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(reconstruction_lr=10.0)  # diverges
    ctx, layers = pruned_block(make_tiny_model("llama"), cfg)
    before = {n: p.detach().clone() for n, p in ctx.block.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="optimum_maiht.pipeline.reconstruct"):
        result = refit(ctx, layers, cfg)
    assert result.epochs == 0 and result.epochs_run >= 1
    assert result.error_refit == result.error_solved
    for name, tensor in ctx.block.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert "never lowered the held-out output error" in caplog.text


def test_the_refits_steps_follow_each_weights_scale() -> None:
    """Two chained layers, the first 10x larger and the second 10x smaller than in a reference: the same
    function, so the refit must take the same path, each step scaled with its tensor, and end with the
    reference's weights scaled the same way. An absolute learning rate moves both by the same amount:
    relatively 100x more for the small one."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16, 8, generator=generator) for _ in range(8)]
    masks = [torch.rand(6, 8, generator=generator) > 0.5, torch.rand(4, 6, generator=generator) > 0.5]
    start = [
        torch.randn(6, 8, generator=generator) * masks[0],
        torch.randn(4, 6, generator=generator) * masks[1],
    ]
    dense = [torch.randn(6, 8, generator=generator), torch.randn(4, 6, generator=generator)]
    targets = [x @ dense[0].T @ dense[1].T for x in inputs]
    cfg = config(reconstruction_lr=1e-2, reconstruction_epochs=2)
    ends = []
    for scale in (1.0, 10.0):
        params = [(start[0] * scale).requires_grad_(), (start[1] / scale).requires_grad_()]

        def forward(k: int, params: list[torch.Tensor] = params) -> torch.Tensor:
            return inputs[k] @ params[0].T @ params[1].T

        result = refit_block(forward, params, masks, targets, (range(7), [7]), cfg, 0, SINGLE)
        assert result.epochs >= 1 and result.error_refit < result.error_solved
        ends.append([p.detach() for p in params])
    torch.testing.assert_close(ends[1][0], ends[0][0] * 10.0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ends[1][1], ends[0][1] / 10.0, rtol=1e-4, atol=1e-6)


def one_layer_problem() -> tuple[torch.Generator, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """A seeded refit problem of one 4 x 8 linear layer: 8 pieces of 16 inputs, a random mask and the
    outputs of a random dense layer; the generator goes on to draw the starting weights."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(16, 8, generator=generator) for _ in range(8)]
    mask = torch.rand(4, 8, generator=generator) > 0.5
    targets = [x @ torch.randn(4, 8, generator=generator).T for x in inputs]
    return generator, inputs, mask, targets


def test_the_rate_falls_linearly_over_the_last_share_of_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """``reconstruction_decay``: the rate of every tensor is constant, then falls linearly over the last
    share of all the epochs' steps (a step's rate is the base rate times the steps left, itself included,
    over the decay's steps); 0 keeps it constant."""
    generator, inputs, mask, targets = one_layer_problem()
    rates: list[list[float]] = []
    step = torch.optim.Adam.step

    def recorded(self, *args, **kwargs):
        rates.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recorded)
    for decay, expected in [(0.5, [1.0] * 7 + [k / 7 for k in range(7, 0, -1)]), (0.0, [1.0] * 14)]:
        rates.clear()
        weight = (torch.randn(4, 8, generator=generator) * mask).requires_grad_()
        cfg = config(reconstruction_epochs=2, reconstruction_decay=decay, reconstruction_lr=1e-3)
        base = 1e-3 * float(weight.detach().norm()) / int(mask.sum()) ** 0.5
        split = (range(7), [7])
        forward = functools.partial(lambda k, w: inputs[k] @ w.T, w=weight)
        result = refit_block(forward, [weight], [mask], targets, split, cfg, 0, SINGLE)
        assert result.epochs_run == 2  # the rate falls over both epochs' 14 steps
        assert [r[0] / base for r in rates] == pytest.approx(expected, rel=1e-6)


def test_the_refit_stops_early_only_once_its_rate_falls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held-out errors that rise for two epochs and then fall: with the rate's decay in the third epoch the
    refit runs to it and keeps that epoch (two epochs at the full rate say nothing about the decay); with a
    constant rate it stops after :data:`PATIENCE` epochs without improvement and keeps the start."""
    generator, inputs, mask, targets = one_layer_problem()
    for decay, run, kept in [(0.25, 3, 3), (0.0, 2, 0)]:
        held_out = iter([1.0, 1.1, 1.2, 0.9])  # before, then after each epoch
        monkeypatch.setattr(
            "optimum_maiht.pipeline.reconstruct.output_error", lambda *args, errors=held_out: next(errors)
        )
        weight = (torch.randn(4, 8, generator=generator) * mask).requires_grad_()
        cfg = config(reconstruction_epochs=3, reconstruction_decay=decay)
        forward = functools.partial(lambda k, w: inputs[k] @ w.T, w=weight)
        result = refit_block(forward, [weight], [mask], targets, (range(7), [7]), cfg, 0, SINGLE)
        assert (result.epochs_run, result.epochs) == (run, kept), decay
        assert result.holdout_history == [1.1, 1.2, 0.9][:run]


def test_auto_precision_is_bfloat16_where_the_device_has_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bfloat16(cpu) is native
        assert resolve_compute_dtype(cpu, "auto") == (torch.bfloat16 if native else torch.float32)
        assert resolve_compute_dtype(cpu, "float32") == torch.float32  # an explicit choice is kept
        assert resolve_compute_dtype(cpu, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_compute_dtype(cpu, "auto") == torch.bfloat16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probes
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_compute_dtype(cpu, "auto") == torch.float32
    assert resolve_compute_dtype(torch.device("meta"), "auto") == torch.float32


def test_every_rank_refits_in_the_same_dtype(caplog: pytest.LogCaptureFixture) -> None:
    """The refit's steps are summed over the ranks, so they agree on its dtype: float32 when another rank
    wants it (a GPU without bfloat16 beside one with it) or when the forward fails there under autocast."""

    class OtherRank:  # this rank plus one other, whose votes are given
        def __init__(self, votes: list[float]) -> None:
            self.votes = votes

        def sum(self, values: list[float]) -> list[float]:
            return [v + o for v, o in zip(values, self.votes, strict=True)]

    layer = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="optimum_maiht.pipeline.precision"):
        for votes, expected in [([0.0, 0.0], torch.bfloat16), ([1.0, 0.0], torch.float32)]:
            dtype = agreed_dtype(
                lambda k: layer(torch.ones(2, 4)), 1, torch.bfloat16, cpu, OtherRank(votes), 3
            )
            assert dtype == expected
        assert not caplog.text
        dtype = agreed_dtype(
            lambda k: layer(torch.ones(2, 4)), 1, torch.bfloat16, cpu, OtherRank([0.0, 1.0]), 3
        )
    assert dtype == torch.float32
    assert (
        "block 3: its forward fails under bfloat16 autocast (on another rank); running it in float32"
        in caplog.text
    )


def test_half_precision_block_is_refitted_in_float32_and_cast_back() -> None:
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    cfg = config(pattern="2:4")
    ctx, layers = pruned_block(model, cfg)
    zeros = {n: w == 0 for n, w in target_weights(ctx.targets).items()}
    result = refit(ctx, layers, cfg)
    assert result.epochs >= 1 and result.error_refit < result.error_solved
    assert all(p.dtype == torch.bfloat16 for p in ctx.block.parameters())
    for name, weight in target_weights(ctx.targets).items():
        assert torch.equal(weight == 0, zeros[name]), name


def test_too_few_batches_skip_the_refit_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = config(num_samples=4, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="optimum_maiht.pipeline.reconstruct"):
        pruner = MAIHTPruner(model, cfg)
        pruner.prune(calibration_ids(4, 32), progress=False)
    reference = MAIHTPruner(
        make_tiny_model("llama"), config(num_samples=4, batch_size=4, reconstruction_epochs=0)
    )
    reference.prune(calibration_ids(4, 32), progress=False)
    assert "block reconstruction skipped" in caplog.text and "raise num_samples" in caplog.text
    assert [b.skipped is not None for b in pruner.report.reconstruction] == [True, True]
    for name, param in model.named_parameters():
        assert torch.equal(param, reference.model.get_parameter(name)), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_holdout_batches_spread_over_every_rank() -> None:
    assert holdout_batches([16], 0.125) == [4, 12]  # one in eight, spread out
    assert holdout_batches([3], 0.125) == [1]  # at least one
    assert holdout_batches([8], 0.25) == [2, 6]
    assert holdout_batches([2], 0.9) == [1]  # at least one batch to train on
    assert [holdout_batches([4, 4], 0.25, rank) for rank in (0, 1)] == [[2], [2]]  # the same global batches
    assert [holdout_batches([5, 3], 0.25, rank) for rank in (0, 1)] == [[2], [1]]


def test_a_block_over_the_memory_limit_keeps_its_solved_weights(caplog: pytest.LogCaptureFixture) -> None:
    model = make_tiny_model("llama")
    weights = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)
    )
    limit = weights * REFIT_BYTES_PER_WEIGHT / 2**30 * 0.99  # just under block 0's refit
    with caplog.at_level(logging.WARNING, logger="optimum_maiht.pipeline.reconstruct"):
        pruner = MAIHTPruner(model, config(reconstruction_max_gib=limit))
        pruner.prune(calibration_ids(16, 32), progress=False)
    reference = MAIHTPruner(make_tiny_model("llama"), config(reconstruction_epochs=0))
    reference.prune(calibration_ids(16, 32), progress=False)
    skipped = [b.skipped for b in pruner.report.reconstruction]
    assert all(s is not None and "more than reconstruction_max_gib" in s for s in skipped), skipped
    assert "raise it to refit this block" in caplog.text
    for name, param in model.named_parameters():
        assert torch.equal(param, reference.model.get_parameter(name)), name
    unlimited = MAIHTPruner(make_tiny_model("llama"), config(reconstruction_max_gib=None))
    unlimited.prune(calibration_ids(16, 32), progress=False)
    assert all(b.skipped is None for b in unlimited.report.reconstruction)


def test_on_by_default_and_zero_epochs_never_refit(monkeypatch: pytest.MonkeyPatch) -> None:
    import optimum_maiht.pipeline.sequential as sequential

    assert MAIHTConfig().reconstruction_epochs == 2
    assert MAIHTConfig.from_preset("fast").reconstruction_epochs == 0

    def never(*args, **kwargs):
        raise AssertionError("block reconstruction ran while off")

    monkeypatch.setattr(sequential, "reconstruct_block", never)
    off = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL, reconstruction_epochs=0))
    off.prune(calibration_ids(16, 32), progress=False)
    other = MAIHTConfig(**SMALL, reconstruction_epochs=0, reconstruction_lr=0.5, reconstruction_holdout=0.5)
    zero = MAIHTPruner(make_tiny_model("llama"), other)
    zero.prune(calibration_ids(16, 32), progress=False)
    for name, tensor in off.model.state_dict().items():
        assert torch.equal(tensor, zero.model.state_dict()[name]), name
    assert off.report.reconstruction is None and "reconstruction" not in off.report.to_dict()
    assert "Block reconstruction" not in str(render_model_card(off.report))


def test_the_defaults_refit_every_block_and_never_raise_its_held_out_error() -> None:
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL))
    pruner.prune(calibration_ids(16, 32), progress=False)
    blocks = pruner.report.reconstruction
    assert [b.block for b in blocks] == [0, 1] and all(b.skipped is None for b in blocks)
    assert all(b.epochs_run == 2 for b in blocks)
    assert all(b.error_refit <= b.error_solved for b in blocks if not b.solved_again)
    assert all(b.error_refit < b.error_solved and not b.solved_again for b in blocks if b.epochs > 0)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_block_the_refit_does_not_help_ends_as_with_the_refit_off(family: str) -> None:
    """A rate so large that no epoch lowers the held-out error: the pruned model is the refit-off run's, to
    the bit. Block 1, whose layer solves used the dense model's inputs, is solved again on the pruned ones;
    block 0, whose two inputs are the same, keeps its solves. The report says which and measures the held-out
    error of the weights kept."""
    make = make_moe_model if family == "qwen3_moe" else make_tiny_model
    ids = calibration_ids(16, 32)
    off = MAIHTPruner(make(family), config(reconstruction_epochs=0, min_expert_tokens=0))
    off.prune(ids, progress=False)
    on = MAIHTPruner(
        make(family), config(reconstruction_epochs=1, reconstruction_lr=1e3, min_expert_tokens=0)
    )
    on.prune(ids, progress=False)
    blocks = on.report.reconstruction
    assert [(b.block, b.skipped, b.epochs) for b in blocks] == [(0, None, 0), (1, None, 0)]
    assert [b.solved_again for b in blocks] == [False, True]
    assert blocks[0].error_refit == blocks[0].error_solved
    assert blocks[1].error_refit != blocks[1].error_solved  # measured again, on other weights
    for name, tensor in off.model.state_dict().items():
        assert torch.equal(tensor, on.model.state_dict()[name]), name
    untimed = [[{**layer.to_dict(), "seconds": 0} for layer in r.report.layers] for r in (on, off)]
    assert untimed[0] == untimed[1]  # the layer reports too: errors, histories, tokens
    card = str(render_model_card(on.report))
    assert f"| 1 | {blocks[1].error_solved:.4f} | {blocks[1].error_refit:.4f} | 0 of 1, solved again" in card
    assert "1 of them solved again on the pruned inputs" in prune_summary(
        on.report, "tiny", Path("x"), "dense", 1.0
    )


def test_the_held_out_error_of_any_weights_is_the_refits_measure() -> None:
    cfg = config()
    ctx, layers = pruned_block(make_tiny_model("llama"), cfg)
    ctx.reader = copy.deepcopy(ctx.block.post_attention_layernorm).requires_grad_(False)
    solved = holdout_error(ctx, layers, cfg, SINGLE)
    result = refit(ctx, layers, cfg)
    assert result.epochs >= 1
    assert solved == pytest.approx(result.error_solved, rel=1e-6)
    assert holdout_error(ctx, layers, cfg, SINGLE) == pytest.approx(result.error_refit, rel=1e-6)


def _block1_input_gram(model, ids: torch.Tensor, batch_size: int, autocast: bool = False) -> torch.Tensor:
    """``X^T X`` of block 1's first projection's inputs when ``model`` runs on ``ids`` (its blocks under
    bfloat16 autocast with ``autocast``)."""
    layer = model.model.layers[1].self_attn.q_proj
    gram = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        gram.add_(x.T @ x)

    handle = layer.register_forward_pre_hook(hook)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        for start in range(0, len(ids), batch_size):
            model(input_ids=ids[start : start + batch_size], use_cache=False)
    handle.remove()
    return gram


@pytest.mark.parametrize(
    "epochs, precision", [(0, "float32"), (1, "float32"), (0, "bfloat16"), (1, "bfloat16")]
)
def test_the_statistics_come_from_the_dense_inputs_with_the_refit(epochs: int, precision: str) -> None:
    """With the refit on, one pass of the dense block on the dense model's inputs gives both its targets and
    the layer statistics, so block 1's Gram matrices are the dense model's; without it they come from the
    pruned model's inputs (docs/design.md, "Statistics from the dense model's inputs"). With
    ``compute_dtype="bfloat16"`` the passes of a float32 block run under its autocast, with the refit on or
    off, and the report says so."""
    cfg = config(reconstruction_epochs=epochs, compute_dtype=precision)
    bf16 = precision == "bfloat16"
    ids = calibration_ids(cfg.num_samples, cfg.sequence_length)
    dense_model = make_tiny_model("llama")
    grams = []

    def recording(weight, gram, spec):
        grams.append(gram.double())
        return Solving.from_config(cfg, SINGLE).solver(weight, gram, spec)

    pruner = MAIHTPruner(make_tiny_model("llama"), cfg, solver=recording)
    pruner.prune(ids, progress=False)
    expected_dense = _block1_input_gram(dense_model, ids, cfg.batch_size, bf16)
    assert not torch.allclose(expected_dense, _block1_input_gram(dense_model, ids, cfg.batch_size, not bf16))
    pruned_copy = copy.deepcopy(pruner.model)  # block 1 pruned too, but only its inputs are read
    expected_pruned = _block1_input_gram(pruned_copy, ids, cfg.batch_size, bf16)
    assert not torch.allclose(expected_dense, expected_pruned, rtol=1e-3)
    expected = expected_dense if epochs else expected_pruned
    same_size = [g for g in grams if g.shape == expected.shape]
    assert any(torch.allclose(g, expected, rtol=1e-4, atol=1e-6) for g in same_size)
    assert {b.precision for b in pruner.report.reconstruction or []} == ({precision} if epochs else set())
    assert pruner.report.block_dtypes == [precision, precision]


def test_the_report_and_the_card_show_the_refit(tmp_path: Path) -> None:
    pruner = MAIHTPruner(make_tiny_model("llama"), config())
    pruner.prune(calibration_ids(16, 32), progress=False)
    report = pruner.report
    assert [b.block for b in report.reconstruction] == [0, 1]
    assert all(isinstance(b, BlockReconstruction) and b.epochs_run >= 1 for b in report.reconstruction)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["config"]["reconstruction_epochs"] == 3
    assert set(data["reconstruction"][0]) >= {"error_solved", "error_refit", "epochs", "epochs_run"}
    again = PruneReport.from_dict(data)
    assert again.reconstruction == report.reconstruction
    mean = report.reconstruction_mean()
    assert mean is not None and mean["error_refit"] < mean["error_solved"]
    card = str(render_model_card(report))
    assert "with **mAIHT from SparseGPT's solution**" in card
    assert "Block reconstruction:" in card and f"{mean['error_refit']:.4f} after" in card
    for b in report.reconstruction:
        row = f"| {b.block} | {b.error_solved:.4f} | {b.error_refit:.4f} | {b.epochs} of {b.epochs_run} |"
        assert row in card
    assert "`reconstruction_epochs` | `3`" in card
    assert all(b.precision == "float32" for b in report.reconstruction)
    assert "The refit's forward and backward passes ran in float32" in card
    assert report.block_dtypes == again.block_dtypes == ["float32", "float32"]
    assert "the matrix products of the calibration passes in float32" in card
    summary = prune_summary(report, "tiny", tmp_path, "dense", 1.0)
    kept = sum(b.epochs == 0 for b in report.reconstruction)
    line = f"{mean['error_solved']:.4f} -> {mean['error_refit']:.4f} (mean of 2 blocks; {kept} kept"
    assert line in summary
    assert "solver       mAIHT from SparseGPT's solution" in summary
    assert data["report_version"] == 4


def test_a_version_2_report_gives_its_held_out_errors() -> None:
    """Version 2 measured the refit on every window too; its held-out errors are the ones version 3 keeps."""
    block = {"block": 0, "error_before": 0.5, "error_after": 0.4, "holdout_before": 0.3, "holdout_after": 0.2}
    block |= {"epochs": 1, "epochs_run": 2, "seconds": 1.0}
    data = {"report_version": 2, "config": {}, "layers": [], "reconstruction": [block]}
    (read,) = PruneReport.from_dict(data).reconstruction
    assert (read.error_solved, read.error_refit, read.epochs) == (0.3, 0.2, 1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"reconstruction_epochs": -1}, "reconstruction_epochs must be an integer from 0 to 1,000"),
        ({"reconstruction_epochs": 1.5}, "reconstruction_epochs must be an integer from 0 to 1,000"),
        ({"reconstruction_epochs": True}, "reconstruction_epochs must be an integer from 0 to 1,000"),
        ({"reconstruction_lr": 0}, "reconstruction_lr must be a finite number > 0"),
        ({"reconstruction_lr": float("nan")}, "reconstruction_lr must be a finite number > 0"),
        ({"reconstruction_lr": float("inf")}, "reconstruction_lr must be a finite number > 0"),
        ({"reconstruction_lr": "1e-4"}, "reconstruction_lr must be a finite number > 0"),
        ({"reconstruction_holdout": 0}, r"reconstruction_holdout must be a share in \(0, 1\)"),
        ({"reconstruction_holdout": 1}, r"reconstruction_holdout must be a share in \(0, 1\)"),
        ({"reconstruction_batch_size": 0}, "reconstruction_batch_size must be an integer from 1 to 65,536"),
        ({"reconstruction_batch_size": 2.0}, "reconstruction_batch_size must be an integer from 1 to 65,536"),
        ({"reconstruction_max_gib": 0}, r"reconstruction_max_gib must be a number of GiB in \(0, "),
        ({"reconstruction_max_gib": float("nan")}, r"reconstruction_max_gib must be a number of GiB"),
        ({"reconstruction_max_gib": "16"}, r"reconstruction_max_gib must be a number of GiB"),
        ({"start": "magnitude"}, "start must be 'wanda' or 'sparsegpt', got 'magnitude'"),
        ({"reconstruction_decay": 1}, r"reconstruction_decay must be a share in \[0, 1\)"),
        ({"reconstruction_decay": -0.1}, r"reconstruction_decay must be a share in \[0, 1\)"),
        ({"reconstruction_decay": float("nan")}, r"reconstruction_decay must be a share in \[0, 1\)"),
        ({"reconstruction_decay": "0.25"}, r"reconstruction_decay must be a share in \[0, 1\)"),
        (
            {"compute_dtype": "float16"},
            "compute_dtype must be 'auto' or 'float32' or 'bfloat16', got 'float16'",
        ),
    ],
)
def test_config_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAIHTConfig(**changes)


def test_a_config_with_the_former_name_of_compute_dtype_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "maiht_config.json").write_text(json.dumps({"reconstruction_precision": "bfloat16"}))
    with caplog.at_level(logging.WARNING, logger="optimum_maiht.configuration"):
        assert MAIHTConfig.from_pretrained(tmp_path).compute_dtype == "bfloat16"
    assert "reconstruction_precision is now called compute_dtype" in caplog.text
    both = {"reconstruction_precision": "bfloat16", "compute_dtype": "float32"}
    with pytest.raises(ValueError, match="give only compute_dtype"):
        MAIHTConfig.from_dict(both)
    with pytest.raises(ValueError, match="got 'float16'"):  # validated under its new name
        MAIHTConfig.from_dict({"reconstruction_precision": "float16"})


def test_config_json_round_trip(tmp_path: Path) -> None:
    cfg = MAIHTConfig(
        reconstruction_epochs=3,
        reconstruction_lr=3e-4,
        reconstruction_holdout=0.25,
        reconstruction_batch_size=2,
        reconstruction_max_gib=None,
        reconstruction_decay=0.0,
        compute_dtype="bfloat16",
    )
    again = MAIHTConfig.from_pretrained(cfg.save_pretrained(tmp_path))
    assert again == cfg and again.reconstruction_lr == 3e-4 and again.reconstruction_batch_size == 2
    assert again.reconstruction_max_gib is None
    default = MAIHTConfig()
    assert (default.reconstruction_epochs, default.reconstruction_holdout) == (2, 0.125)
    assert (default.start, default.reconstruction_max_gib) == ("sparsegpt", 32.0)
    assert (default.reconstruction_decay, default.compute_dtype) == (0.25, "auto")
    assert (again.reconstruction_decay, again.compute_dtype) == (0.0, "bfloat16")


@pytest.mark.parametrize("precision, epochs", [("float32", 3), ("bfloat16", 3), ("bfloat16", 0)])
def test_streaming_with_reconstruction_writes_the_in_memory_folder_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, epochs: int
) -> None:
    """The resumed run's dense outputs of its finished blocks come from the same passes, in the same dtype;
    without the refit its passes over the finished blocks run in that dtype too."""
    source = make_checkpoint(tmp_path / "src")
    cfg = config(
        num_samples=8,
        batch_size=2,
        iterations=2,
        refit_iterations=2,
        compute_dtype=precision,
        reconstruction_epochs=epochs,
    )
    report = in_memory(source, tmp_path / "memory", cfg)
    with monkeypatch.context() as patch:
        fail_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            streamed(source, tmp_path / "streamed", cfg)
    assert partial_folder(tmp_path / "streamed").is_dir()
    dense_loads = []
    load_dense = StreamingStore.load_dense
    monkeypatch.setattr(
        StreamingStore,
        "load_dense",
        lambda self, i, b: dense_loads.append((i, i in self._done)) or load_dense(self, i, b),
    )
    resumed = streamed(source, tmp_path / "streamed", cfg, resume=True)
    # the finished blocks' dense outputs, from the checkpoint (the others' dense weights are loaded too)
    assert [i for i, finished in dense_loads if finished] == ([0, 1] if epochs else [])
    assert_same_tensors(tmp_path / "memory", tmp_path / "streamed")
    assert (
        report.block_dtypes == resumed.block_dtypes == [precision] * 4
    )  # the finished ones from their record
    assert len(report.reconstruction or []) == (4 if epochs else 0)
    for mine, theirs in zip(report.reconstruction or [], resumed.reconstruction or [], strict=True):
        assert {**mine.to_dict(), "seconds": 0} == {**theirs.to_dict(), "seconds": 0}


def test_an_expert_module_no_token_reaches_is_left_as_pruned() -> None:
    """Per-expert ``nn.Linear`` modules: the expert the router never chooses gets no gradient (no error)
    and keeps the weights of its layer solve; the others are refitted."""
    from test_moe import ToyExpertsMoE

    model = make_tiny_model("llama")
    for block in model.model.layers:
        block.mlp = ToyExpertsMoE(64, 32, 4)
    # whole batches: on this random toy, steps of one window at lr 1e-4 never lower the held-out error
    cfg = config(reconstruction_batch_size=SMALL["batch_size"])
    ctx, layers = pruned_block(model, cfg)
    before = {n: w.detach().clone() for n, w in target_weights(ctx.targets).items()}
    result = refit(ctx, layers, cfg)
    after = target_weights(ctx.targets)
    assert result.epochs >= 1 and result.error_refit < result.error_solved
    assert torch.equal(after["model.layers.0.mlp.experts.3.0"], before["model.layers.0.mlp.experts.3.0"])
    assert not torch.equal(after["model.layers.0.mlp.experts.0.0"], before["model.layers.0.mlp.experts.0.0"])


def every_family() -> list[str]:
    return ARCHITECTURES + MOE_FAMILIES


def family_model(family: str):
    return make_moe_model(family) if family in MOE_FAMILIES else make_tiny_model(family)


@pytest.mark.parametrize("family", every_family())
def test_the_refits_block_forward_is_the_models_forward(family: str) -> None:
    """What the refit runs (each block's recorded call, in float32, on whole batches and on the pieces of
    one window) gives exactly the outputs the model's own forward gives each block (issue #29: the refit
    optimises the block the model runs, sliding-window layers, rotary tables and masks included)."""
    model = family_model(family)
    ids = calibration_ids(4, 32)
    _, blocks = find_decoder_blocks(model)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            seen[i] = (x.detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone())

        return record

    with eager_experts(model):
        handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        hidden, calls = capture_block_inputs(model, blocks, ids, 4, CPU)
        assert torch.equal(hidden[0], seen[0][0])
        for i, block in enumerate(blocks):
            x, y = seen[i]
            ctx = BlockContext(i, block, None, [c.float32() for c in calls[i]], [x], CPU)
            with torch.no_grad():
                assert torch.equal(ctx.calls[0].run(block, x), y), i
                for piece in _refit_pieces(ctx, ctx.calls, 1, torch.device("cpu")):
                    torch.testing.assert_close(piece.call.run(block, x[piece.rows]), y[piece.rows]), i


READERS = {"gpt2": "ln_1", "opt": "self_attn_layer_norm"}


@pytest.mark.parametrize("family", every_family())
def test_the_refit_reads_a_blocks_output_through_the_next_norm(family: str) -> None:
    """Each block's refit measures its output through the norm that reads it next: the next block's input
    norm (found by a forward, not by name), the model's final norm after the last block."""
    model = family_model(family)
    blocks_name, blocks = find_decoder_blocks(model)
    with eager_experts(model):
        hidden, calls = capture_block_inputs(model, blocks, calibration_ids(2, 16), 2, CPU)
        assert first_reader(blocks[0], calls[0][0], hidden[0]) == READERS.get(family, "input_layernorm")
    final = final_norm(model, blocks_name)
    assert final is not None and is_norm(final)
    assert all(final is not module for block in blocks for module in block.modules())


def test_the_pipeline_refits_through_the_next_blocks_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The context each refit gets carries a float32 copy of the right reader: block 0's is block 1's input
    norm, the last block's the final norm; the reported errors are measured through it."""
    import optimum_maiht.pipeline.sequential as sequential

    model = make_tiny_model("llama")
    with torch.no_grad():  # readers that differ from each other and from 1
        model.model.layers[1].input_layernorm.weight.uniform_(0.5, 2.0)
        model.model.norm.weight.uniform_(0.1, 3.0)
    expected = [model.model.layers[1].input_layernorm.weight.clone(), model.model.norm.weight.clone()]
    readers = []

    def spy(ctx, layers, cfg, parallel):
        readers.append(ctx.reader)
        return reconstruct_block(ctx, layers, cfg, parallel)

    monkeypatch.setattr(sequential, "reconstruct_block", spy)
    pruner = MAIHTPruner(model, config())
    pruner.prune(calibration_ids(16, 32), progress=False)
    assert [type(r).__name__ for r in readers] == ["LlamaRMSNorm", "LlamaRMSNorm"]
    for reader, weight in zip(readers, expected, strict=True):
        assert reader.weight.dtype == torch.float32 and not reader.weight.requires_grad
        assert torch.equal(reader.weight, weight)
    assert pruner.report.reconstruction[0].epochs >= 1


def test_the_refit_lowers_the_error_the_reader_sees_and_reports_it() -> None:
    cfg = config()
    model = make_tiny_model("llama")
    ctx, layers = pruned_block(model, cfg)
    ctx.reader = copy.deepcopy(model.model.layers[1].input_layernorm).requires_grad_(False)
    with torch.no_grad():
        ctx.reader.weight.uniform_(0.25, 4.0)
    held = holdout_batches([len(ctx.hidden)], cfg.reconstruction_holdout)
    before = block_error(ctx, held)
    assert before != pytest.approx(block_error(dataclasses.replace(ctx, reader=None), held), rel=1e-3)
    result = refit(ctx, layers, cfg)
    assert result.error_solved == pytest.approx(before, rel=1e-5)
    assert result.error_refit == pytest.approx(block_error(ctx, held), rel=1e-5)
    assert result.epochs >= 1 and result.error_refit < result.error_solved
