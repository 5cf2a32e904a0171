"""The sequential pruner on tiny models of every supported architecture: prune, save, reload, errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import ARCHITECTURES, calibration_ids, make_tiny_model, make_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.model_utils import find_decoder_blocks, weight_matrix
from optimum_maiht.pipeline.statistics import GramCollector

SMALL = dict(num_samples=8, sequence_length=32, batch_size=4, iterations=5, refit_iterations=5)


def pruned_layers(model, pruner):
    modules = dict(model.named_modules())
    return {r.name: weight_matrix(modules[r.name]).detach() for r in pruner.layer_reports if not r.skipped}


def assert_layer_patterns(model, pruner, config):
    layers = pruned_layers(model, pruner)
    assert layers, "nothing was pruned"
    for name, w in layers.items():
        out, din = w.shape
        zeros = w == 0
        if config.nm:
            n, m = config.nm
            assert (zeros.reshape(out, din // m, m).sum(-1) >= m - n).all(), f"{name}: invalid {n}:{m} group"
            assert int(zeros.sum()) == out * din * (m - n) // m, name
        else:
            assert (zeros.sum(1) == round(config.sparsity * din)).all(), f"{name}: wrong sparsity"


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_prunes_saves_and_reloads_with_equal_logits(arch, pattern, tmp_path):
    model = make_tiny_model(arch)
    ids = calibration_ids()
    with torch.no_grad():
        dense_logits = model(ids).logits
    config = MAIHTConfig(pattern=pattern, **SMALL)
    pruner = MAIHTPruner(model, config)
    assert pruner.prune(ids, progress=False) is model
    assert_layer_patterns(model, pruner, config)

    _, blocks = find_decoder_blocks(model)
    linears = [m for m in blocks.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert len(pruner.layer_reports) == len(linears), "every linear layer of every block is a target"
    for r in pruner.layer_reports:
        assert r.error <= r.error_wanda + 1e-9, r.name
        assert all(b <= a for a, b in zip(r.history, r.history[1:], strict=False)), r.name

    out = pruner.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(reloaded(ids).logits, logits)
    assert not torch.equal(logits, dense_logits)
    assert math.isfinite(float(logits.abs().max()))


def test_saved_folder_holds_config_report_and_annotation(tmp_path):
    pruner = MAIHTPruner(
        make_tiny_model("llama"), MAIHTConfig(pattern="4:8", **SMALL), tokenizer=make_tokenizer()
    )
    pruner.prune(calibration_ids(), progress=False)
    out = pruner.save_pretrained(tmp_path / "pruned")
    assert MAIHTConfig.from_pretrained(out) == pruner.config
    report = json.loads((out / "maiht_report.json").read_text())
    assert report["config"]["pattern"] == "4:8" and report["sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == sum(isinstance(m, nn.Linear) for m in pruner.model.model.layers.modules())
    layer = report["layers"][0]
    assert {"name", "shape", "sparsity", "error_wanda", "error", "iterations", "seconds"} <= set(layer)
    annotation = json.loads((out / "config.json").read_text())["maiht"]
    assert annotation["pattern"] == "4:8" and annotation["format"] == "dense"
    assert (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary folder left behind"


def test_saving_refuses_a_non_empty_folder_and_is_atomic(tmp_path, monkeypatch):
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL))
    with pytest.raises(RuntimeError, match="prune"):
        pruner.save_pretrained(tmp_path / "early")
    pruner.prune(calibration_ids(), progress=False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pruner.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "precious"

    def broken_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(type(pruner.model), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"], "a failed save changes nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"
    monkeypatch.undo()
    pruner.save_pretrained(target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()


def test_text_calibration_with_tokenizer_and_evaluation(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    pruner = MAIHTPruner(
        make_tiny_model("qwen2"), MAIHTConfig(pattern="2:4", **SMALL), tokenizer=make_tokenizer()
    )
    pruner.prune(
        [text, text], eval_dataset=[text], eval_sequence_length=32, eval_max_windows=4, progress=False
    )
    evaluation = pruner.report.evaluation
    assert math.isfinite(evaluation["perplexity_before"]) and math.isfinite(evaluation["perplexity_after"])
    assert evaluation["perplexity_before"] != evaluation["perplexity_after"]
    assert pruner.report.calibration["tokens"] == 8 * 32


def test_layers_reading_the_same_input_share_one_gram_matrix():
    model = make_tiny_model("llama")
    block = find_decoder_blocks(model)[1][0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    collector = GramCollector(layers)
    with torch.no_grad():
        model(calibration_ids())
    collector.remove()
    gram = collector.gram
    assert gram["self_attn.q_proj"] is gram["self_attn.k_proj"] is gram["self_attn.v_proj"]
    assert gram["mlp.gate_proj"] is gram["mlp.up_proj"]
    assert gram["self_attn.o_proj"] is not gram["self_attn.q_proj"]
    assert len({id(g) for g in gram.values()}) == 4


def test_targets_and_ignore_select_layers():
    model = make_tiny_model("llama")
    pruner = MAIHTPruner(model, MAIHTConfig(targets=["mlp"], ignore=["down_proj"], **SMALL))
    pruner.prune(calibration_ids(), progress=False)
    names = [r.name.split(".", 3)[-1] for r in pruner.layer_reports]
    assert names == ["mlp.gate_proj", "mlp.up_proj"] * 2
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()


def test_layers_whose_input_is_not_a_multiple_of_m_are_skipped_with_a_warning(caplog):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=100,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    pruner = MAIHTPruner(model, MAIHTConfig(pattern="1:3", **SMALL))
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    skipped = {r.name for r in pruner.layer_reports if r.skipped}
    assert skipped == {"model.layers.0.mlp.down_proj"}
    assert "not a multiple of M=3" in caplog.text
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()
    assert len(pruner.report.skipped) == 1


def test_non_finite_activations_do_not_make_a_nan_model(caplog):
    model = make_tiny_model("llama")

    def overflow(module, args, output):
        output = output.clone()
        output[0, :4] = float("inf")  # as an fp16 overflow would
        return output

    model.model.embed_tokens.register_forward_hook(overflow)
    pruner = MAIHTPruner(model, MAIHTConfig(**SMALL))
    with caplog.at_level(logging.WARNING):
        pruner.prune(calibration_ids(), progress=False)
    assert "non-finite" in caplog.text
    for name, w in pruned_layers(model, pruner).items():
        assert torch.isfinite(w).all(), name
    assert all(math.isfinite(r.error) for r in pruner.layer_reports)


def test_sequence_length_is_capped_at_the_model_context(caplog):
    model = make_tiny_model("llama")  # 128 positions
    text = "abcdefghij " * 400
    pruner = MAIHTPruner(
        model,
        MAIHTConfig(num_samples=2, sequence_length=4096, iterations=1, refit_iterations=1),
        tokenizer=make_tokenizer(),
    )
    with caplog.at_level(logging.WARNING):
        pruner.prune([text], progress=False)
    assert "exceeds the model's context of 128" in caplog.text
    assert pruner.report.calibration["sequence_length"] == 128


def test_errors_on_bad_models_and_data(tmp_path):
    with pytest.raises(ValueError, match="no decoder blocks"):
        MAIHTPruner(nn.Sequential(nn.Linear(4, 4)), MAIHTConfig(**SMALL)).prune(calibration_ids())
    tied = make_tiny_model("llama")
    tied.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tied to the input embedding"):
        MAIHTPruner(tied, MAIHTConfig(targets=["lm_head"], ignore=[], **SMALL)).prune(calibration_ids())
    with pytest.raises(ValueError, match="no target layers"):
        MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(targets=["nothing"], **SMALL)).prune(
            calibration_ids()
        )

    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(**SMALL), tokenizer=make_tokenizer())
    weights = {name: p.detach().clone() for name, p in pruner.model.named_parameters()}
    with pytest.raises(ValueError, match="empty"):
        pruner.prune([""])
    with pytest.raises(ValueError, match="empty"):
        pruner.prune(torch.zeros(0, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="windows of 32"):
        pruner.prune(["too short"])
    with pytest.raises(FileNotFoundError, match="neither a file"):
        pruner.prune(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="LongTensor"):
        pruner.prune(torch.rand(4, 32))
    with pytest.raises(TypeError, match="calibration data must be"):
        pruner.prune(42)
    for name, p in pruner.model.named_parameters():
        assert torch.equal(p, weights[name]), f"{name} changed although every prune() call failed"
    assert pruner.report is None

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        MAIHTPruner.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        MAIHTPruner.from_pretrained(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        MAIHTPruner.from_pretrained(tmp_path / "file.bin")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            MAIHTPruner(make_tiny_model("llama"), device="cuda")


def test_from_pretrained_loads_model_and_tokenizer_from_a_folder(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    pruner = MAIHTPruner.from_pretrained(tmp_path / "m", MAIHTConfig(pattern="2:4", **SMALL))
    assert pruner.tokenizer is not None
    pruner.prune(["some text for calibration " * 30], progress=False)
    assert pruner.report.sparsity == pytest.approx(0.5)


def test_progress_bar_names_the_layer_being_solved_and_the_time_per_block(monkeypatch):
    import optimum_maiht.pipeline.sequential as sequential

    postfixes: list[str] = []
    real_tqdm = sequential.tqdm

    def recording_tqdm(*args, **kwargs):
        bar = real_tqdm(*args, **kwargs)
        bar.set_postfix_str = lambda text, refresh=True: postfixes.append(text)
        return bar

    monkeypatch.setattr(sequential, "tqdm", recording_tqdm)
    model = make_tiny_model("llama")
    MAIHTPruner(model, MAIHTConfig(iterations=2, refit_iterations=2)).prune(calibration_ids(), progress=True)
    blocks = len(find_decoder_blocks(model)[1])
    for i in range(blocks):
        assert f"block {i}: calibration" in " ".join(postfixes)
        for layer in ("self_attn.q_proj", "mlp.down_proj"):
            assert any(p.startswith(f"model.layers.{i}.{layer}") for p in postfixes), (i, layer, postfixes)
    assert not postfixes[0].endswith("s/block") and postfixes[-1].endswith("s/block")
