"""The layer-solver seam in the pipeline: every solver prunes every supported family to the target pattern,
the report and the card name it, a per-layer sparsity plan is followed, and an experiment's own solver is
called for every layer."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, calibration_ids, make_tiny_model
from moe_models import MOE_FAMILIES, make_moe_model

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.constants import SOLVER_NAMES
from optimum_maiht.model_card import render_model_card
from optimum_maiht.model_utils import weight_matrix
from optimum_maiht.solvers import LayerSpec, SolverResult, make_solver

SMALL = dict(num_samples=8, sequence_length=32, batch_size=4, iterations=2, refit_iterations=2)


def pruned_weights(pruner: MAIHTPruner) -> dict[str, torch.Tensor]:
    """Every pruned (out, in) matrix of the report, from the model: a layer's weight, or an expert slice."""
    params = dict(pruner.model.named_parameters())
    modules = dict(pruner.model.named_modules())
    found = {}
    for layer in pruner.report.pruned:
        if layer.name.endswith("]"):
            name, index = layer.name[:-1].split("[")
            matrix = params[name][int(index)]
            found[layer.name] = matrix.t() if layer.transposed else matrix
        else:
            found[layer.name] = weight_matrix(modules[layer.name])  # GPT-2's Conv1D stores (in, out)
    return found


@pytest.mark.parametrize("family", ARCHITECTURES + MOE_FAMILIES)
def test_every_solver_prunes_every_family_to_the_pattern(family: str) -> None:
    for solver in SOLVER_NAMES:
        for pattern in ("2:4", "unstructured"):
            model = make_moe_model(family) if family in MOE_FAMILIES else make_tiny_model(family)
            config = MAIHTConfig(**SMALL, solver=solver, pattern=pattern, min_expert_tokens=0)
            pruner = MAIHTPruner(model, config)
            pruner.prune(calibration_ids(), progress=False)
            assert pruner.report.solver == solver and pruner.report.pruned, (family, solver)
            for name, weight in pruned_weights(pruner).items():
                zeros = weight == 0
                if pattern == "2:4":
                    kept = (~zeros).reshape(weight.shape[0], -1, 4).sum(-1)
                    assert int(kept.max()) <= 2, (family, solver, name)
                else:
                    assert float(zeros.float().mean()) == pytest.approx(0.5, abs=1e-9), (family, solver, name)


def test_the_report_and_the_card_name_the_solver() -> None:
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL, solver="sparsegpt", pattern="2:4"))
    pruner.prune(calibration_ids(), progress=False)
    data = pruner.report.to_dict()
    assert data["solver"] == "sparsegpt" and data["config"]["solver"] == "sparsegpt"
    card = str(render_model_card(pruner.report))
    assert (
        "with **SparseGPT**" in card and "Output error, SparseGPT" in card and "mAIHT (monotone" not in card
    )
    assert all(layer.error <= layer.error_wanda * 10 for layer in pruner.report.pruned)  # both filled


def test_a_per_layer_sparsity_plan_is_followed() -> None:
    plan = {r"mlp\.down_proj$": 0.25, r"\.layers\.1\.": 0.75}  # the first match wins
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL, sparsity=0.5, layer_sparsity=plan))
    pruner.prune(calibration_ids(), progress=False)
    for layer in pruner.report.pruned:
        want = 0.25 if layer.name.endswith("mlp.down_proj") else 0.75 if ".layers.1." in layer.name else 0.5
        assert layer.sparsity == pytest.approx(want, abs=1e-9), layer.name


def test_an_experiment_s_own_solver_is_called_for_every_layer() -> None:
    seen: list[tuple[tuple[int, ...], LayerSpec]] = []
    sparsegpt = make_solver("sparsegpt")

    def my_solver(weight: torch.Tensor, gram: torch.Tensor, spec: LayerSpec) -> SolverResult:
        seen.append((tuple(weight.shape), spec))
        return sparsegpt(weight, gram, spec)

    model = make_tiny_model("llama")
    pruner = MAIHTPruner(model, MAIHTConfig(**SMALL, pattern="4:8"), solver=my_solver)
    pruner.prune(calibration_ids(), progress=False)
    again = sum(b.solved_again for b in pruner.report.reconstruction)  # a rejected refit: solved again
    assert len(pruner.report.pruned) == 2 * 7 and len(seen) == 7 * (2 + again)
    assert all(spec == LayerSpec(0.5, nm=(4, 8)) for _, spec in seen)
    assert pruner.report.solver == "my_solver"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"solver": "obs"}, "solver must be 'maiht' or 'sparsegpt' or 'wanda' or 'magnitude', got 'obs'"),
        ({"layer_sparsity": {"q_proj": 1.0}}, r"layer_sparsity\['q_proj'\] must be a sparsity in \(0, 1\)"),
        ({"layer_sparsity": {"(": 0.5}}, "layer_sparsity has an invalid regular expression"),
        (
            {"layer_sparsity": {"q_proj": 0.4}, "pattern": "2:4"},
            "layer_sparsity applies to pattern='unstructured'",
        ),
        ({"layer_sparsity": ["q_proj"]}, "layer_sparsity must map regexes to sparsities"),
    ],
)
def test_bad_solver_or_plan_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAIHTConfig(**changes)
