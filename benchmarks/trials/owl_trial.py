"""Trial: does an OWL-style non-uniform sparsity per block help mAIHT on the demo model?

OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity") gives blocks with more outlier weights a lower
sparsity, keeping the global sparsity: for block ``l`` the outlier ratio ``D_l`` is the share of Wanda
scores ``|W_ij| * ||X_j||`` over the block's target layers that exceed ``M`` times their mean (on the dense
model's activations); the ratios are min-max scaled to ``[0, 2 * lambda]``, shifted to mean ``1 - s``, and
used as each block's density. Every other setting is mAIHT's default and the calibration / evaluation are
``quality.py``'s, so the result compares directly with the uniform ``maiht`` rows of ``results/quality.json``.

This is a measurement, not a feature (not adopted: ``benchmarks/trials/README.md``). The per-block
sparsities reach the pipeline as ``MAIHTConfig.layer_sparsity``, one regex per block (its escaped name
prefix, anchored). Results are appended to ``benchmarks/results/owl_trial.json``.

    benchmarks/.venv-llmcompressor/bin/python benchmarks/trials/owl_trial.py --settings 70%,50%
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_common, quality

from bench_common import (
    BEFORE_29,
    EVAL_LENGTH,
    RESULTS_DIR,
    calibration_ids,
    command_line,
    load_demo,
    machine,
    tensor_digest,
    test_windows,
    versions,
)
from quality import append_record, parse_setting

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.evaluation import perplexity, sparsity_by_layer_type
from optimum_maiht.model_utils import block_prefix, find_decoder_blocks, weight_matrix
from optimum_maiht.targets import find_targets


def block_outlier_ratios(
    model: Any,
    layers_per_block: list[dict[str, torch.nn.Module]],
    ids: torch.Tensor,
    threshold: float,
    batch_size: int,
) -> list[float]:
    """Per block: share of Wanda scores above ``threshold`` x their mean, on the dense model's inputs."""
    sq_norms: dict[str, torch.Tensor] = {}
    hooks = []
    for layers in layers_per_block:
        for name, layer in layers.items():

            def hook(module: torch.nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sq_norms[name] = sq_norms.get(name, 0) + x.pow(2).sum(0)

            hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    ratios = []
    for layers in layers_per_block:
        scores = torch.cat(
            [
                (weight_matrix(layer).detach().abs().double() * sq_norms[name].sqrt()).flatten()
                for name, layer in layers.items()
            ]
        )
        ratios.append(float((scores > threshold * scores.mean()).double().mean()))
    return ratios


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Block sparsities with mean ``sparsity``: more outliers, lower sparsity, spread ``2 * lam``."""
    d = torch.tensor(ratios, dtype=torch.float64)
    d = (d - d.min()) / (d.max() - d.min()).clamp_min(1e-12) * 2 * lam
    density = d - d.mean() + (1 - sparsity)
    return (1 - density).tolist()


def block_plan(blocks_name: str, sparsities: list[float]) -> dict[str, float]:
    """``MAIHTConfig.layer_sparsity`` giving block ``i`` the sparsity ``sparsities[i]``: per block its name
    prefix (``model.layers.3.``) escaped and anchored, so that it matches no other block's layers."""
    return {"^" + re.escape(block_prefix(blocks_name, i)): s for i, s in enumerate(sparsities)}


def run(setting: str, lam: float, threshold: float, eval_windows: int, batch_size: int) -> dict[str, Any]:
    sparsity, pattern = parse_setting(setting)
    if pattern != "unstructured":
        raise ValueError(f"setting {setting!r}: OWL allocates unstructured sparsity only, use e.g. '70%'")
    model, tokenizer, path = load_demo()
    ids = calibration_ids(tokenizer)
    config = MAIHTConfig(
        sparsity=sparsity,
        num_samples=ids.shape[0],
        sequence_length=ids.shape[1],
        batch_size=batch_size,
        **BEFORE_29,
    )
    blocks_name, blocks = find_decoder_blocks(model)
    targets = [t.linears for t in find_targets(model, blocks_name, blocks, config)]
    start = time.perf_counter()
    ratios = block_outlier_ratios(model, targets, ids, threshold, batch_size)
    per_block = owl_sparsities(ratios, sparsity, lam)
    plan = dataclasses.replace(config, layer_sparsity=block_plan(blocks_name, per_block))
    pruner = MAIHTPruner(model, plan, tokenizer=tokenizer, device="cpu")
    pruner.prune(ids, progress=False)
    prune_seconds = time.perf_counter() - start
    windows = test_windows(tokenizer, eval_windows)
    ppl = perplexity(model, None, windows, EVAL_LENGTH, batch_size=4)
    return {
        "method": f"maiht[owl lambda={lam},M={threshold}]",
        "setting": setting,
        "ppl": ppl,
        "sparsity_measured": round(sparsity_by_layer_type(model)["overall"], 6),
        "block_outlier_ratios": ratios,
        "block_sparsities": per_block,
        "solver": pruner.report.solver,
        "layer_sparsity": plan.layer_sparsity,
        "eval": {"windows": int(windows.shape[0]), "sha256": tensor_digest(windows)},
        "calibration": {
            "num_samples": int(ids.shape[0]),
            "sequence_length": int(ids.shape[1]),
            "sha256": tensor_digest(ids),
        },
        "prune_seconds": round(prune_seconds, 2),
        "model": path.name,
        "machine": machine(),
        "versions": versions(),
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="70%,50%", help="unstructured settings, e.g. 50%%,70%%")
    parser.add_argument("--lam", type=float, default=0.08, help="OWL lambda: block sparsities span 2*lambda")
    parser.add_argument("--threshold", type=float, default=5.0, help="OWL M: outlier = score > M x mean")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = RESULTS_DIR / "owl_trial.json"
    for setting in args.settings.split(","):
        record = run(setting, args.lam, args.threshold, args.eval_windows, args.batch_size)
        append_record(record, out)
        print(
            f"{record['method']} {setting}: perplexity {record['ppl']:.3f}, measured sparsity "
            f"{record['sparsity_measured']:.4f}, prune {record['prune_seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
