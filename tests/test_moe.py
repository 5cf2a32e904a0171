"""Mixture-of-experts models: every expert pruned on its own routed tokens, nothing skipped silently."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import calibration_ids, make_tiny_model
from moe_models import MOE_FAMILIES, make_moe_model
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_maiht import MAIHTConfig, MAIHTModelForCausalLM, MAIHTPruner
from optimum_maiht.experts import ExpertGramRecorder, eager_experts, expert_groups, find_fused_experts
from optimum_maiht.model_card import render_model_card
from optimum_maiht.model_utils import find_decoder_blocks
from optimum_maiht.solvers import relative_output_error

SMALL = dict(num_samples=8, sequence_length=32, batch_size=4, iterations=4, refit_iterations=4)


def matrices_in_blocks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every matrix-shaped parameter inside the decoder blocks, by full name (cloned)."""
    blocks_name, blocks = find_decoder_blocks(model)
    return {f"{blocks_name}.{n}": p.detach().clone() for n, p in blocks.named_parameters() if p.dim() >= 2}


def expert_slices(model: nn.Module, report) -> dict[str, torch.Tensor]:
    """``{"...gate_up_proj[e]": (out, in) weight}`` for every fused expert slice in the report."""
    params = dict(model.named_parameters())
    slices = {}
    for layer in report.pruned:
        if layer.name.endswith("]"):
            name, index = layer.name[:-1].split("[")
            w = params[name][int(index)]
            slices[layer.name] = w.t() if layer.transposed else w
    return slices


def assert_pattern(name: str, w: torch.Tensor, config: MAIHTConfig) -> None:
    out, din = w.shape
    zeros = w == 0
    if config.nm:
        n, m = config.nm
        assert ((~zeros).reshape(out, din // m, m).sum(-1) <= n).all(), f"{name}: invalid {n}:{m} group"
        assert int(zeros.sum()) == out * din * (m - n) // m, name
    else:
        assert (zeros.sum(1) == round(config.sparsity * din)).all(), f"{name}: wrong sparsity per row"


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_is_pruned_routers_stay_and_the_checkpoint_reloads(family, pattern, tmp_path):
    model = make_moe_model(family)
    before = matrices_in_blocks(model)
    config = MAIHTConfig(pattern=pattern, min_expert_tokens=0, **SMALL)
    pruner = MAIHTPruner(model, config)
    pruner.prune(calibration_ids(), progress=False)
    report = pruner.report

    fused = {w.name: w for w in find_fused_experts(model)}
    slices = expert_slices(model, report)
    assert fused and len(slices) == sum(w.num_experts for w in fused.values()), "every expert slice pruned"
    for name, w in slices.items():
        assert_pattern(name, w, config)
    assert all(
        layer.statistics == "routed" and layer.tokens > 0 for layer in report.pruned if "[" in layer.name
    )

    # every matrix of the blocks is accounted for: pruned, or kept dense (and then unchanged) with a reason
    pruned_params = {
        name.split("[")[0] if "[" in name else f"{name}.weight"
        for name in (layer.name for layer in report.pruned)
    }
    kept = {k.name: k.reason for k in report.kept_dense}
    assert set(before) == pruned_params | set(kept) and not pruned_params & set(kept)
    after = dict(model.named_parameters())
    for name in kept:
        assert torch.equal(after[name], before[name]), f"{name} was kept dense but changed"
    routers = [n for n in kept if n.endswith(("gate.weight", "router.weight"))]
    assert routers and all("ignored by the pattern" in kept[n] for n in routers)
    assert report.sparsity == pytest.approx(0.5)

    ids = calibration_ids(4, 16, seed=1)
    with torch.no_grad():
        logits = model(ids).logits
    out = pruner.save_pretrained(tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, logits)
    compact = pruner.save_pretrained(tmp_path / "compact", save_format="compressed")
    reloaded = MAIHTModelForCausalLM.from_pretrained(compact).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_an_expert_without_routed_tokens_gets_all_token_statistics_and_is_reported(caplog):
    model = make_moe_model("gpt_oss")
    for block in model.model.layers:
        block.mlp.router.bias.data[3] = -1e4  # the router never picks expert 3
    config = MAIHTConfig(min_expert_tokens=1, **SMALL)
    pruner = MAIHTPruner(model, config)
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    assert "experts [3] received fewer calibration tokens" in caplog.text
    starved = [layer for layer in pruner.report.pruned if layer.name.endswith("[3]")]
    assert len(starved) == 4  # gate_up and down of 2 blocks
    for layer in starved:
        assert layer.statistics == "all tokens" and layer.tokens == 8 * 32
    others = [layer for layer in pruner.report.pruned if "[" in layer.name and layer not in starved]
    assert others and all(layer.statistics == "routed" for layer in others)
    for name, w in expert_slices(model, pruner.report).items():
        assert_pattern(name, w, config)


def test_without_forced_routing_an_unreached_expert_is_pruned_by_magnitude(caplog):
    model = make_moe_model("gpt_oss")
    for block in model.model.layers:
        block.mlp.router.bias.data[2] = -1e4
    config = MAIHTConfig(min_expert_tokens=0, **SMALL)
    pruner = MAIHTPruner(model, config)
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    unreached = [layer for layer in pruner.report.pruned if layer.name.endswith("[2]")]
    assert unreached and all(
        layer.statistics == "none (magnitude)" and layer.tokens == 0 for layer in unreached
    )
    assert "no calibration token reached it" in caplog.text
    for name, w in expert_slices(model, pruner.report).items():
        assert_pattern(name, w, config)


def test_routed_statistics_fit_an_expert_better_on_its_own_tokens_than_all_token_statistics():
    """The objective of an expert is its output on the tokens routed to it: a Gram from all tokens
    optimises the wrong thing. Block 0 sees the same dense inputs in both runs, so compare there."""
    config = dict(min_expert_tokens=0, **SMALL)
    routed, everyone = make_moe_model("mixtral"), make_moe_model("mixtral")
    dense = make_moe_model("mixtral")
    MAIHTPruner(routed, MAIHTConfig(**config)).prune(calibration_ids(), progress=False)
    MAIHTPruner(everyone, MAIHTConfig(**{**config, "min_expert_tokens": 10**6})).prune(
        calibration_ids(), progress=False
    )

    experts = find_fused_experts(dense.model.layers[0], "model.layers.0.")
    with eager_experts(dense), ExpertGramRecorder(experts) as recorder, torch.no_grad():
        dense(calibration_ids())
    params = {"routed": dict(routed.named_parameters()), "all": dict(everyone.named_parameters())}
    errors = {"routed": 0.0, "all": 0.0}
    for w in experts:
        for e in range(w.num_experts):
            gram = recorder.gram[(w.name, e)]
            for kind in errors:
                errors[kind] += relative_output_error(
                    params[kind][w.name][e].detach(), w.param[e].detach(), gram
                )
    assert errors["routed"] < errors["all"], errors


def test_experts_per_pass_bounds_memory_without_changing_the_result():
    one, all_at_once = make_moe_model("qwen3_moe"), make_moe_model("qwen3_moe")
    MAIHTPruner(one, MAIHTConfig(experts_per_pass=1, min_expert_tokens=0, **SMALL)).prune(
        calibration_ids(), progress=False
    )
    MAIHTPruner(all_at_once, MAIHTConfig(min_expert_tokens=0, **SMALL)).prune(
        calibration_ids(), progress=False
    )
    for (name, a), b in zip(one.state_dict().items(), all_at_once.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    experts = find_fused_experts(make_moe_model("qwen3_moe").model.layers[0])
    assert expert_groups(experts, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert expert_groups(experts, None) == [list(range(8))]


class ToyExpertsMoE(nn.Module):
    """An MoE layer of older / remote-code style: a router ``nn.Linear`` and a ModuleList of expert MLPs."""

    def __init__(self, hidden: int, inner: int, experts: int):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden, inner, bias=False), nn.SiLU(), nn.Linear(inner, hidden, bias=False)
            )
            for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        logits[:, -1] = float("-inf")  # the last expert is never chosen, as a starved expert would be
        choice = logits.argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(-1)
            if rows.numel():
                out[rows] = expert(flat[rows])
        return out.reshape(x.shape)


def test_per_expert_linear_modules_are_pruned_on_their_routed_tokens(caplog):
    model = make_tiny_model("llama")
    for block in model.model.layers:
        block.mlp = ToyExpertsMoE(64, 32, 4)
    config = MAIHTConfig(**SMALL)
    pruner = MAIHTPruner(model, config)
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    report = {layer.name: layer for layer in pruner.report.pruned}
    names = set(report)
    for i in range(2):
        for e in range(4):
            assert (
                f"model.layers.{i}.mlp.experts.{e}.0" in names
                and f"model.layers.{i}.mlp.experts.{e}.2" in names
            )
    assert any(k.name.endswith("mlp.gate.weight") for k in pruner.report.kept_dense)
    assert report["model.layers.0.mlp.experts.3.0"].statistics == "none (magnitude)"
    assert "no calibration token reached this expert" in caplog.text
    routed = [report[f"model.layers.0.mlp.experts.{e}.0"].tokens for e in range(3)]
    assert sum(routed) == 8 * 32, "each token reaches exactly one of the experts 0-2"
    modules = dict(model.named_modules())
    for name in report:
        assert_pattern(name, modules[name].weight, config)
    rows = {row.type for row in pruner.report.sparsity_by_type()}
    assert {"mlp.experts.*.0", "mlp.experts.*.2"} <= rows


def test_a_block_whose_forward_fails_under_autocast_is_refitted_in_float32(caplog):
    """ToyExpertsMoE writes each expert's output into a float32 buffer: under bfloat16 autocast that
    raises, so the refit of those blocks runs in float32, with a warning, instead of stopping the run."""
    model = make_tiny_model("llama")
    model.model.layers[1].mlp = ToyExpertsMoE(64, 32, 4)
    config = MAIHTConfig(**SMALL, compute_dtype="bfloat16")
    pruner = MAIHTPruner(model, config)
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    blocks = pruner.report.reconstruction
    assert [b.precision for b in blocks] == ["bfloat16", "float32"]
    assert "block 1: its forward fails under bfloat16 autocast (RuntimeError: " in caplog.text
    assert "block 0: its forward fails" not in caplog.text
    assert all(b.skipped is None and b.error_refit <= b.error_solved for b in blocks if not b.solved_again)


def test_the_card_groups_experts_and_dense_matrices_by_type():
    model = make_moe_model("qwen2_moe")
    pruner = MAIHTPruner(model, MAIHTConfig(pattern="2:4", min_expert_tokens=0, **SMALL))
    pruner.prune(calibration_ids(), progress=False)
    card = str(render_model_card(pruner.report))
    rows = [line for line in card.splitlines() if line.startswith("| `mlp.")]
    expert_rows = [row for row in rows if "experts." in row and "[*]" in row]
    assert len(expert_rows) == 2 and all("| 12 | 50.00% |" in row for row in expert_rows)  # 6 experts x 2
    dense_rows = [row for row in rows if "ignored by the pattern" in row]
    assert len(dense_rows) == 2, "router and shared-expert gate, one row per type"
    for row in rows:  # a regex's "|" must not split the Markdown table
        assert len(re.findall(r"(?<!\\)\|", row)) == (4 if row in dense_rows else 6), row
    assert "every expert was pruned as its own linear problem (24 expert" in " ".join(card.split())
