"""The block refit's schedule, precision and epochs on the first blocks of a model (issue #29).

    benchmarks/.venv-llmcompressor/bin/python benchmarks/refit_schedule.py --setting 2:4 --blocks 4
    benchmarks/.venv-llmcompressor/bin/python benchmarks/refit_schedule.py --model GEMMA3_FOLDER --setting 50%

Each variant (:data:`VARIANTS`: one float32 epoch at a constant rate, the former default; the same with the
rate's decay; the decay in bfloat16; two bfloat16 epochs with the decay, the default; and around it, the
rates 2e-2 and 5e-3, the decay over the last half of the steps, and mAIHT's 20 iterations / 30 CG steps
instead of 5 / 5 before the refit) prunes the model cut
to its first ``--blocks`` decoder blocks with the defaults otherwise, on the quality benchmark's calibration
(128 x 512 tokens of WikiText-2 validation, seed 0). Each block's held-out output error before and after
its refit comes from the report (``reconstruction``), with the refit's seconds and precision. Block 0 sees
the same problem under every variant; later blocks see their inputs as the earlier refits left them.
Records are appended to ``results/refit_schedule.json``; ``--render`` writes ``results/refit_schedule.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
from bench_common import RESULTS_DIR, calibration_ids, load_demo, machine, versions

from optimum_maiht import MAIHTConfig, MAIHTPruner

RESULTS = RESULTS_DIR / "refit_schedule.json"
MODELS = {"LlamaForCausalLM": "SmolLM2-135M-Instruct", "Gemma3ForCausalLM": "Gemma 3 270M"}
VARIANTS: dict[str, dict[str, Any]] = {
    "1 epoch, float32, constant rate": dict(
        reconstruction_epochs=1, reconstruction_decay=0.0, compute_dtype="float32"
    ),
    "1 epoch, float32, decay": dict(reconstruction_epochs=1, compute_dtype="float32"),
    "1 epoch, bfloat16, decay": dict(reconstruction_epochs=1, compute_dtype="bfloat16"),
    "2 epochs, bfloat16, decay (defaults)": dict(compute_dtype="bfloat16"),
    "2 epochs, bfloat16, decay, rate 2e-2": dict(compute_dtype="bfloat16", reconstruction_lr=2e-2),
    "2 epochs, bfloat16, decay, rate 5e-3": dict(compute_dtype="bfloat16", reconstruction_lr=5e-3),
    "2 epochs, bfloat16, decay over the last half": dict(compute_dtype="bfloat16", reconstruction_decay=0.5),
    "2 epochs, bfloat16, decay over the last half, rate 2e-2": dict(
        compute_dtype="bfloat16", reconstruction_decay=0.5, reconstruction_lr=2e-2
    ),
    "2 epochs, bfloat16, decay, mAIHT 20 iterations / 30 CG": dict(
        compute_dtype="bfloat16", iterations=20, refit_iterations=30
    ),
}


def first_blocks(model: Any, count: int) -> None:
    """Cut ``model`` to its first ``count`` decoder blocks (and the per-layer lists of its config)."""
    model.model.layers = model.model.layers[:count]
    model.config.num_hidden_layers = count
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:count]


def run(args: argparse.Namespace, name: str) -> dict[str, Any]:
    model, tokenizer, path = load_demo(folder=args.model)
    first_blocks(model, args.blocks)
    ids = calibration_ids(tokenizer, 128, 512, 0)
    setting = (
        {"pattern": args.setting} if ":" in args.setting else {"sparsity": float(args.setting[:-1]) / 100}
    )
    config = MAIHTConfig(**setting, num_samples=128, sequence_length=512, **VARIANTS[name])
    start = time.perf_counter()
    pruner = MAIHTPruner(model, config, tokenizer, device="cpu")
    pruner.prune(ids, progress=False)
    blocks = pruner.report.reconstruction or []
    return {
        "model": type(model).__name__,
        "setting": args.setting,
        "variant": name,
        "blocks": [
            {
                "block": b.block,
                "error_solved": round(b.error_solved, 6),
                "error_refit": round(b.error_refit, 6),
                "ratio": round(b.error_refit / b.error_solved, 4) if b.error_solved else None,
                "epochs": b.epochs,
                "seconds": b.seconds,
                "precision": b.precision,
                "solved_again": b.solved_again,
            }
            for b in blocks
        ],
        "prune_s": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "versions": versions(),
    }


def render(records: list[dict[str, Any]]) -> str:
    lines = [
        "# The block refit's schedule, precision and epochs (issue #29)",
        "",
        "Held-out output error of each block after its refit over the error before (the layer solves'), on "
        "the first blocks, 128 x 512 calibration tokens; the refit's seconds per block in brackets (none "
        "where the run shared the cores). Lower is better. `benchmarks/refit_schedule.py`; records in "
        "`refit_schedule.json`.",
        "",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["setting"]), []).append(r)
    for (model, setting), runs in sorted(groups.items()):
        count = max(len(r["blocks"]) for r in runs)
        lines += [f"## {MODELS.get(model, model)}, {setting}", ""]
        lines += ["| variant | " + " | ".join(f"block {k}" for k in range(count)) + " | geometric mean |"]
        lines += ["|---|" + "---:|" * (count + 1)]
        for r in sorted(runs, key=lambda r: ("provenance" in r, r["variant"])):
            cells = [_cell(b) for b in r["blocks"]] + ["–"] * (count - len(r["blocks"]))
            ratios = [b["ratio"] for b in r["blocks"] if b["ratio"]]
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else float("nan")
            label = r["variant"] + (" [scratch harness]" if "provenance" in r else "")
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean:.3f} |")
        host = runs[-1]["machine"]
        kernels = host.get("cpu_capability", "?")
        lines += ["", f"Machine: {host.get('cpu', '?')}, torch kernels {kernels}.", ""]
    notes = sorted({r["provenance"] for r in records if "provenance" in r})
    lines += [f"- {note}." for note in notes]
    return "\n".join(lines) + "\n"


def _cell(block: dict[str, Any]) -> str:
    seconds = block["seconds"]
    return f"{block['ratio']:.3f}" + ("" if seconds is None else f" ({seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local model folder (default: the demo model)")
    parser.add_argument("--setting", default="2:4", help="'2:4', '4:8', or a percentage such as '50%%'")
    parser.add_argument("--blocks", type=int, default=4, help="decoder blocks kept (the first ones)")
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names of VARIANTS, separated by ';'")
    parser.add_argument("--render", action="store_true", help="only write results/refit_schedule.md")
    args = parser.parse_args()
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.render:
        torch.manual_seed(0)
        for name in args.variants.split(";"):
            records.append(run(args, name))
            RESULTS.write_text(json.dumps(records, indent=1) + "\n")
    (RESULTS_DIR / "refit_schedule.md").write_text(render(records))


if __name__ == "__main__":
    main()
