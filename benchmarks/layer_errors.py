"""Per-layer relative output error of magnitude, Wanda, SparseGPT and mAIHT on the same Gram matrices.

For the first decoder blocks of the dense demo model, the calibration windows (the same tensor as
``quality.py``) are propagated through the *dense* blocks and each target layer's ``H = X^T X`` is
collected with optimum_maiht's own pipeline stages (``capture_block_inputs``, ``replay``, ``GramCollector``).
Every method is a layer solver of ``optimum_maiht.solvers`` (``make_solver``), prunes the layer's weight
against that one ``H`` and is scored by ``tr(E H E^T) / tr(W0 H W0^T)``. SparseGPT here is ours
(``optimum_maiht.solvers.sparsegpt``, the paper's Algorithm 1 with its mask choice over each 128-column
block), since a full-model peer run cannot be scored on identical inputs.

    python benchmarks/layer_errors.py                  # 3 blocks, 50% unstructured and 2:4
    python benchmarks/layer_errors.py --blocks 1 --output /tmp/layer_errors   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    RESULTS_DIR,
    calibration_ids,
    command_line,
    load_demo,
    machine,
    tensor_digest,
    versions,
)

from optimum_maiht.configuration import MAIHTConfig
from optimum_maiht.model_utils import find_decoder_blocks, weight_matrix
from optimum_maiht.pipeline.capture import Placement, capture_block_inputs, replay
from optimum_maiht.pipeline.statistics import GramCollector
from optimum_maiht.solvers import LayerSpec, make_solver, relative_output_error
from optimum_maiht.targets import find_targets

logger = logging.getLogger("layer_errors")

SETTINGS = {"50%": (0.5, None), "2:4": (0.5, (2, 4))}
METHODS = {
    "magnitude": (make_solver("magnitude"), "layer"),
    "wanda": (make_solver("wanda"), "row"),
    "sparsegpt": (make_solver("sparsegpt"), "layer"),
    "maiht": (make_solver("maiht"), "row"),
}
"""Each method's layer solver (at its defaults) and its unstructured comparison group: magnitude over the
whole layer (the classic baseline), Wanda and mAIHT per row, SparseGPT over each 128-column block (the
paper's choice; ``scope="layer"``). N:M patterns ignore the group."""


def collect_grams(
    model: Any, ids: torch.Tensor, num_blocks: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """``{layer name: {"weight", "gram", "block"}}`` for the target linears of the first ``num_blocks``
    blocks, the calibration run through the dense blocks (nothing is pruned)."""
    blocks_name, blocks = find_decoder_blocks(model)
    targets = [t.linears for t in find_targets(model, blocks_name, blocks, MAIHTConfig())]
    hidden, calls = capture_block_inputs(model, blocks, ids, batch_size, Placement(torch.device("cpu")))
    layers: dict[str, dict[str, Any]] = {}
    for i in range(num_blocks):
        collector = GramCollector(targets[i])
        try:
            hidden = replay(blocks[i], hidden, calls[i], after_batch=collector.end_batch)
        finally:
            collector.remove()
        for name, layer in targets[i].items():
            layers[name] = {
                "weight": weight_matrix(layer).detach().clone(),
                "gram": collector.gram[name],
                "block": i,
            }
    return layers


def prune_all(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> dict[str, tuple[torch.Tensor, float]]:
    """Each method's pruned weight and its seconds (the solver's call, its own error scores included)."""
    out = {}
    for method, (solve, scope) in METHODS.items():
        start = time.perf_counter()
        pruned = solve(weight, gram, LayerSpec(sparsity, nm, scope)).weight
        out[method] = (pruned, time.perf_counter() - start)
    return out


def render_markdown(record: dict[str, Any]) -> str:
    """The per-layer table, one column per method per setting, plus the geometric means."""
    methods = record["methods"]
    settings = list(record["settings"])
    head = ["layer"] + [f"{m} {s}" for s in settings for m in methods]
    lines = [
        "# Per-layer relative output error: magnitude, Wanda, SparseGPT, mAIHT",
        "",
        f"Relative output error `tr(E H E^T) / tr(W0 H W0^T)` of each target layer of the first "
        f"{record['blocks']} decoder blocks of {record['model']}, every method on the same `H` (the "
        f"calibration, {record['calibration']['num_samples']} x {record['calibration']['sequence_length']} "
        "WikiText-2 validation tokens, run through the dense blocks). Lower is better; the best of each "
        "row is in bold. Every method is a layer solver of `optimum_maiht.solvers` at its defaults. "
        "Magnitude compares weights over the whole layer (the classic baseline), Wanda per output row; "
        "SparseGPT is **ours** (`optimum_maiht.solvers.sparsegpt`, from the paper: block size 128, 1% "
        "dampening, adaptive mask over each 128-column block), not llm-compressor's; mAIHT is "
        "`optimum_maiht.solvers.maiht`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name in record["layers"]:
        row = [name.replace("model.layers.", "")]
        for s in settings:
            errors = record["layers"][name][s]
            best = min(errors[m] for m in methods)
            row += [f"**{errors[m]:.3g}**" if errors[m] == best else f"{errors[m]:.3g}" for m in methods]
        lines.append("| " + " | ".join(row) + " |")
    row = ["geometric mean"]
    for s in settings:
        row += [f"{record['summary'][s][m]['geomean_error']:.3g}" for m in methods]
    lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| setting | method | geometric mean error | layers where best | seconds (all layers) |",
        "|---|---|---|---|---|",
    ]
    for s in settings:
        for m in methods:
            summary = record["summary"][s][m]
            lines.append(
                f"| {s} | {m} | {summary['geomean_error']:.3g} | {summary['wins']} | "
                f"{summary['seconds']:.1f} |"
            )
    lines += [
        "",
        f"Machine: {record['machine']['cpu']} ({record['machine']['cores']} cores, "
        f"{record['machine']['torch_threads']} torch threads). Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items())
        + ".",
        "",
        f"Command: `{record['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=3, help="first N decoder blocks (default 3)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="calibration window seed")
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "layer_errors", help="writes OUTPUT.json and OUTPUT.md"
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite OUTPUT.md from OUTPUT.json")
    args = parser.parse_args()
    if args.render_only:
        args.output.with_suffix(".md").write_text(
            render_markdown(json.loads(args.output.with_suffix(".json").read_text()))
        )
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model, tokenizer, path = load_demo()
    ids = calibration_ids(tokenizer, seed=args.seed)
    logger.info("collecting Gram matrices of the first %d blocks on %s", args.blocks, tuple(ids.shape))
    layers = collect_grams(model, ids, args.blocks, args.batch_size)
    methods = list(METHODS)
    record: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (demo model, fp32)",
        "blocks": args.blocks,
        "calibration": {
            "source": "WikiText-2 validation",
            "num_samples": int(ids.shape[0]),
            "sequence_length": int(ids.shape[1]),
            "seed": args.seed,
            "sha256": tensor_digest(ids),
        },
        "methods": methods,
        "settings": {
            s: {"sparsity": sp, "pattern": "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"}
            for s, (sp, nm) in SETTINGS.items()
        },
        "layers": {},
    }
    seconds: dict[str, dict[str, float]] = {s: dict.fromkeys(methods, 0.0) for s in SETTINGS}
    for name, entry in layers.items():
        record["layers"][name] = {}
        for setting, (sparsity, nm) in SETTINGS.items():
            pruned = prune_all(entry["weight"], entry["gram"], sparsity, nm)
            errors = {
                m: relative_output_error(w, entry["weight"], entry["gram"]) for m, (w, _) in pruned.items()
            }
            for m, (_, sec) in pruned.items():
                seconds[setting][m] += sec
            record["layers"][name][setting] = errors
            logger.info("%s %s: %s", name, setting, ", ".join(f"{m} {e:.4f}" for m, e in errors.items()))
    record["summary"] = {}
    for setting in SETTINGS:
        record["summary"][setting] = {}
        for m in methods:
            errs = torch.tensor([record["layers"][n][setting][m] for n in layers], dtype=torch.float64)
            wins = sum(
                1
                for n in layers
                if record["layers"][n][setting][m] == min(record["layers"][n][setting].values())
            )
            record["summary"][setting][m] = {
                "geomean_error": float(errs.clamp_min(1e-30).log().mean().exp()),
                "wins": wins,
                "seconds": round(seconds[setting][m], 2),
            }
    record.update(machine=machine(), versions=versions(), command=command_line())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(render_markdown(record))
    print(render_markdown(record))


if __name__ == "__main__":
    main()
