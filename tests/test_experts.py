"""Per-expert Gram matrices of fused MoE weights (optimum_maiht.experts) on six tiny MoE families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moe_models import MOE_FAMILIES, make_moe_model
from torch import nn

from optimum_maiht.experts import (
    ExpertGramRecorder,
    FusedExpertWeight,
    eager_experts,
    find_fused_experts,
    weight_view,
)

TOKENS = (4, 32)


def _block_call(model: nn.Module, layer: nn.Module) -> tuple[tuple, dict]:
    """The args and kwargs ``layer`` receives in a forward of ``model`` on random tokens."""
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(
                input_ids=torch.randint(3, 128, TOKENS, generator=torch.Generator().manual_seed(1)),
                use_cache=False,
            )
    finally:
        handle.remove()
    return captured[0]


def _run(layer: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    with torch.no_grad():
        out = layer(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


class _Setup:
    """A family's model in eager mode, its last (MoE) block, the block's call and its fused weights."""

    def __init__(self, family: str):
        self.model = make_moe_model(family)
        self.model.set_experts_implementation("eager")
        layers = self.model.model.layers
        self.prefix = f"model.layers.{len(layers) - 1}."
        self.layer = layers[-1]
        self.call = _block_call(self.model, self.layer)
        self.fused = find_fused_experts(self.layer, self.prefix)
        self.by_name = {f.name: f for f in self.fused}
        self.owner = self.fused[0].module

    def routing(self, recorder: ExpertGramRecorder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the block (under ``recorder`` if given); the experts module's input rows and routing index."""
        seen = []
        handle = self.owner.register_forward_pre_hook(lambda m, a: seen.append(a))
        try:
            if recorder is None:
                _run(self.layer, self.call)
            else:
                with recorder:
                    _run(self.layer, self.call)
        finally:
            handle.remove()
        hidden, index = seen[0][0], seen[0][1]
        assert not index.is_floating_point() and index.shape == (hidden.shape[0], 2)
        return hidden, index

    def expected_grams(self, x: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
        """X^T X for each fused weight of expert ``e`` fed the rows ``x``, recomputed from the weights."""
        gate_up, down = (
            self.by_name[self.prefix + f"mlp.experts.{n}"] for n in ("gate_up_proj", "down_proj")
        )
        layout = "in_out" if getattr(self.owner, "is_transposed", False) else "out_in"
        h = F.linear(x, weight_view(gate_up, e, layout))
        if getattr(self.owner, "has_bias", False):
            h = h + self.owner.gate_up_proj_bias[e]
        act = self.owner._apply_gate(h)
        return {gate_up.name: x.T @ x, down.name: act.T @ act}


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def setup(request) -> _Setup:
    return _Setup(request.param)


def test_factories_default_to_a_fused_implementation():
    for family in MOE_FAMILIES:
        model = make_moe_model(family)
        with torch.no_grad():
            logits = model(input_ids=torch.randint(3, 128, TOKENS)).logits
        assert logits.shape == (*TOKENS, 128) and bool(torch.isfinite(logits).all())
        assert model.config._experts_implementation == "grouped_mm", family
        with eager_experts(model):
            assert model.config._experts_implementation == "eager"
        assert model.config._experts_implementation == "grouped_mm"


def test_finds_every_fused_expert_parameter(setup):
    model = setup.model
    found = {f.name: f for f in find_fused_experts(model)}
    expected = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert set(found) == expected and expected
    assert set(setup.by_name) == {
        setup.prefix + "mlp.experts.gate_up_proj",
        setup.prefix + "mlp.experts.down_proj",
    }
    for f in setup.fused:
        assert f.param is dict(model.named_parameters())[f.name]
        assert f.module is model.get_submodule(f.name.rsplit(".", 1)[0])
        assert f.num_experts == f.param.shape[0] >= 4
    with ExpertGramRecorder(setup.fused) as recorder:
        _run(setup.layer, setup.call)
    assert set(recorder.layout) == set(setup.by_name)
    assert {name for name, _ in recorder.gram} == set(setup.by_name)


def test_block_output_unchanged(setup):
    reference = _run(setup.layer, setup.call)
    with ExpertGramRecorder(setup.fused, keep_calls=True) as recorder:
        recorded = _run(setup.layer, setup.call)
        recorder.replay_all_tokens([0])
        after_replay = _run(setup.layer, setup.call)
    assert torch.equal(reference, recorded) and torch.equal(reference, after_replay)


def test_gram_is_routed_tokens_gram(setup):
    recorder = ExpertGramRecorder(setup.fused)
    hidden, index = setup.routing(recorder)
    num_experts = setup.fused[0].num_experts
    for e in range(num_experts):
        rows = (index == e).any(dim=-1)
        for name, expected in setup.expected_grams(hidden[rows], e).items():
            assert recorder.tokens.get((name, e), 0) == int(rows.sum())
            if rows.any():
                torch.testing.assert_close(recorder.gram[(name, e)], expected, rtol=1e-4, atol=1e-4)
            else:
                assert (name, e) not in recorder.gram
    for name in setup.by_name:
        assert sum(recorder.tokens.get((name, e), 0) for e in range(num_experts)) == index.numel()
    assert not recorder.dropped


def test_layout(setup):
    with ExpertGramRecorder(setup.fused) as recorder:
        _run(setup.layer, setup.call)
    transposed = type(setup.model).__name__.startswith("GptOss")
    assert set(recorder.layout.values()) == {"in_out" if transposed else "out_in"}
    gate_up = setup.by_name[setup.prefix + "mlp.experts.gate_up_proj"]
    hidden = setup.call[0][0] if setup.call[0] else setup.call[1]["hidden_states"]
    view = weight_view(gate_up, 1, recorder.layout[gate_up.name])
    assert view.shape == (gate_up.param.shape[2 if transposed else 1], hidden.shape[-1])
    saved = gate_up.param.detach().clone()
    try:
        with torch.no_grad():
            view.copy_(torch.zeros_like(view))
        assert not gate_up.param[1].any() and torch.equal(gate_up.param[0], saved[0])
    finally:
        with torch.no_grad():
            gate_up.param.copy_(saved)


def test_selected_experts_bound_memory(setup):
    recorder = ExpertGramRecorder(setup.fused, experts={1, 3})
    hidden, index = setup.routing(recorder)
    hit = {int(e) for e in index.unique()}
    assert set(recorder.gram) == {(name, e) for name in setup.by_name for e in {1, 3} & hit}
    assert set(recorder.tokens) == {(name, e) for name in setup.by_name for e in hit}


def test_replay_forces_every_token_through_the_expert(setup):
    experts = [0, setup.fused[0].num_experts - 1]
    recorder = ExpertGramRecorder(setup.fused, experts=[], keep_calls=True)
    seen = []
    handle = setup.owner.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with recorder:
            _run(setup.layer, setup.call)
            _run(setup.layer, setup.call)  # two calibration batches
            recorder.replay_all_tokens(experts)
    finally:
        handle.remove()
    hidden = seen[0]
    assert len(seen) == 2 + 2 * len(experts)  # the two calibration calls, then the replays
    assert not recorder.gram and set(recorder.gram_all) == {(n, e) for n in setup.by_name for e in experts}
    for e in experts:
        for name, expected in setup.expected_grams(hidden, e).items():
            assert recorder.tokens_all[(name, e)] == 2 * hidden.shape[0]
            torch.testing.assert_close(recorder.gram_all[(name, e)], 2 * expected, rtol=1e-4, atol=1e-3)


def test_starved_experts(setup):
    recorder = ExpertGramRecorder(setup.fused, experts=[])
    _, index = setup.routing(recorder)
    counts = torch.bincount(index.flatten(), minlength=setup.fused[0].num_experts)
    threshold = int(counts.max())
    every = range(setup.fused[0].num_experts)
    assert recorder.starved(threshold, every) == [e for e, c in enumerate(counts.tolist()) if c < threshold]
    assert recorder.starved(0, every) == []
    assert recorder.starved(threshold, [0]) == [e for e in [0] if counts[e] < threshold]  # only those asked


def test_fused_implementation_is_refused():
    model = make_moe_model("mixtral")
    layer = model.model.layers[-1]
    call = _block_call(model, layer)
    with pytest.raises(RuntimeError, match="eager"):
        with ExpertGramRecorder(find_fused_experts(layer)):
            _run(layer, call)
    with eager_experts(model), ExpertGramRecorder(find_fused_experts(layer)) as recorder:
        _run(layer, call)
    assert recorder.gram


class _ToyExperts(nn.Module):
    """Minimal fused experts: given a (tokens, top_k) routing index and weights, or routing by itself."""

    def __init__(self, self_routed: bool = False):
        super().__init__()
        self.self_routed = self_routed
        self.weight = nn.Parameter(torch.randn(3, 5, 4))

    def forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.self_routed:
            index = x.argmax(dim=-1, keepdim=True) % 3
            weights = torch.ones(index.shape)
        assert weights.shape == index.shape
        out = torch.zeros(x.shape[0], 5)
        for e in index.unique().tolist():
            rows, pos = torch.where(index == e)
            out[rows] += F.linear(x[rows], self.weight[e]) * weights[rows, pos, None]
        return out


def test_non_finite_rows_are_dropped_and_counted():
    toy = _ToyExperts()
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    index = torch.tensor([[0], [0], [0], [1], [1], [2]])
    with ExpertGramRecorder(find_fused_experts(toy)) as recorder:
        toy(x, index, torch.ones(6, 1))
    assert recorder.dropped == {("weight", 0): 1}
    assert recorder.tokens == {("weight", 0): 2, ("weight", 1): 2, ("weight", 2): 1}
    torch.testing.assert_close(recorder.gram[("weight", 0)], x[[0, 1]].T @ x[[0, 1]])


def test_replay_keeps_index_and_weights_shapes_consistent():
    toy = _ToyExperts()
    x = torch.randn(7, 4)
    index = torch.tensor([[0, 1]] * 7)
    with eager_experts(toy), ExpertGramRecorder(find_fused_experts(toy), keep_calls=True) as recorder:
        toy(x, index=index, weights=torch.full((7, 2), 0.5))
        recorder.replay_all_tokens([2])
    assert recorder.tokens == {("weight", 0): 7, ("weight", 1): 7} and recorder.tokens_all == {
        ("weight", 2): 7
    }
    torch.testing.assert_close(recorder.gram_all[("weight", 2)], x.T @ x)


def test_routing_that_cannot_be_forced_raises():
    toy = _ToyExperts(self_routed=True)
    with ExpertGramRecorder(find_fused_experts(toy), keep_calls=True) as recorder:
        toy(torch.randn(6, 4))
        with pytest.raises(ValueError, match="cannot be forced"):
            recorder.replay_all_tokens([0])
    with pytest.raises(RuntimeError, match="keep_calls"):
        recorder.replay_all_tokens([0])


def test_find_fused_experts_skips_non_floating_and_names_with_prefix():
    toy = _ToyExperts()
    toy.register_buffer("table", torch.zeros(2, 2, 2))
    toy.ints = nn.Parameter(torch.zeros(2, 2, 2, dtype=torch.int64), requires_grad=False)
    found = find_fused_experts(nn.ModuleDict({"experts": toy}), "block.")
    assert [(f.name, f.num_experts) for f in found] == [("block.experts.weight", 3)]
    assert isinstance(found[0], FusedExpertWeight) and found[0].module is toy
