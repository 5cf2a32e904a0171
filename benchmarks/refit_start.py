"""Which start serves the block refit best, on two model families (issue #29): held-out perplexity.

    python benchmarks/refit_start.py --start sparsegpt --epochs 1 --setting 2:4
    python benchmarks/refit_start.py --model GEMMA3_FOLDER --start maiht-sparsegpt --iterations 5 --cg 5

One run per call, appended to ``results/refit_start.json``; ``--render`` writes ``results/refit_start.md``.
The start (``--start``): ``wanda`` (Wanda's mask, weights unchanged), ``sparsegpt`` (our SparseGPT,
``solver="sparsegpt", scope="layer"``), ``maiht-wanda`` (mAIHT from Wanda's mask, the former default) or
``maiht-sparsegpt`` (mAIHT from SparseGPT's solution, ``start="sparsegpt"``), with ``--iterations`` /
``--cg`` for mAIHT; then ``--epochs`` of the block refit (0: the layer solves alone); ``--option KEY=VALUE``
sets any other ``MAIHTConfig`` field (e.g. ``scope=layer``), named in the row. Calibration: ``--windows``
windows of ``--length`` tokens of the bundled WikiText-2 validation text (seed 0, BOS first), batches of 8;
perplexity on the first ``--eval`` windows of ``--length`` tokens of WikiText-2 test, which calibration
never sees.
``GEMMA3_FOLDER``: Gemma 3 270M as a float32 folder (see ``refit_reader.py``). One torch thread: two runs
can share the 2-core machine; the prune times are then not comparable with ``quality.py``'s.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch
from bench_common import DATA_DIR, RESULTS_DIR, TEST, machine, parse_options, versions
from refit_reader import perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.data import prepare_calibration, special_prefix, token_windows, tokenize
from optimum_maiht.demo import demo_model_path

RESULTS = RESULTS_DIR / "refit_start.json"
STARTS = {
    "wanda": {"solver": "wanda"},
    "sparsegpt": {"solver": "sparsegpt", "scope": "layer"},
    "maiht-wanda": {"solver": "maiht", "start": "wanda"},
    "maiht-sparsegpt": {"solver": "maiht", "start": "sparsegpt"},
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = args.model or str(demo_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    import pyarrow.parquet as pq

    text = "\n\n".join(pq.read_table(DATA_DIR / TEST, columns=["text"]).column("text").to_pylist())
    evaluation = token_windows(tokenize(tokenizer, text), args.eval, args.length, special_prefix(tokenizer))
    calibration = prepare_calibration("wikitext2", tokenizer, args.windows, args.length, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    setting = (
        {"pattern": args.setting} if ":" in args.setting else {"sparsity": float(args.setting[:-1]) / 100}
    )
    mine = (
        {"iterations": args.iterations, "refit_iterations": args.cg} if args.start.startswith("maiht") else {}
    )
    fields = {**setting, **STARTS[args.start], **mine, "reconstruction_epochs": args.epochs}
    fields |= {"num_samples": args.windows, "sequence_length": args.length, "batch_size": 8}
    config = MAIHTConfig(**fields | args.option)  # --option overrides the start's fields (scope=row)
    start = time.perf_counter()
    pruner = MAIHTPruner(model, config, tokenizer, device="cpu")
    pruner.prune(calibration, progress=False)
    seconds = time.perf_counter() - start
    report = pruner.report
    errors = [layer.error for layer in report.pruned]
    # the refit's rate always named: the rows without it used the former absolute rate (before 626d520)
    options = {"reconstruction_lr": config.reconstruction_lr, **args.option} if args.epochs else args.option
    blocks = [b for b in report.reconstruction or [] if b.skipped is None]
    return {
        "model": type(model).__name__,
        "setting": args.setting,
        "start": args.start,
        "iterations": mine.get("iterations"),
        "cg": mine.get("refit_iterations"),
        "epochs": args.epochs,
        "options": options,
        # with the refit, the layer statistics come from the dense model's inputs since 920b693 (rows
        # without this key: from the pruned model's); a block whose refit is rejected is solved again on the
        # pruned model's inputs since the fallback of this session's sequential._prune_block
        "statistics": "dense inputs, rejected refits solved again" if args.epochs else "pruned inputs",
        "windows": args.windows,
        "length": args.length,
        "eval_windows": args.eval,
        "perplexity": round(perplexity(model, evaluation), 3),
        "prune_s": round(seconds, 1),
        "layer_error_geomean": round(math.exp(sum(math.log(max(e, 1e-12)) for e in errors) / len(errors)), 5),
        "blocks_refitted": sum(b.epochs > 0 for b in blocks),
        "blocks_solved_again": sum(b.solved_again for b in blocks),
        "blocks": len(blocks) if blocks else None,
        "refit": [[b.block, round(b.error_solved, 5), round(b.error_refit, 5), b.epochs] for b in blocks],
    }


MODELS = {"LlamaForCausalLM": "SmolLM2-135M-Instruct", "Gemma3ForCausalLM": "Gemma 3 270M"}
START_NAMES = {
    "wanda": "Wanda's mask",
    "sparsegpt": "SparseGPT",
    "maiht-wanda": "mAIHT from Wanda's mask",
    "maiht-sparsegpt": "mAIHT from SparseGPT's solution",
}


def render(runs: list[dict[str, Any]]) -> str:
    """The table: one row per (model, windows, start, iterations, epochs), one column per setting."""
    settings = sorted({r["setting"] for r in runs}, key=lambda s: (":" in s, s))
    rows: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        options = ", ".join(f"{k}={v}" for k, v in sorted(r.get("options", {}).items()))
        if r.get("statistics", "pruned inputs") != "pruned inputs":
            label = "statistics from the " + r["statistics"]
            options += f", {label}" if options else label
        key = (r["model"], r["windows"], r["start"], r["iterations"], r["cg"], r["epochs"], options)
        rows.setdefault(key, {})[r["setting"]] = r
    lines = [
        "# Which start serves the block refit (issue #29)",
        "",
        "Held-out perplexity (the first 32 windows of 256 tokens of WikiText-2 test) after pruning on "
        "256-token windows of the bundled WikiText-2 validation text (seed 0, batches of 8). Geometric mean "
        "of the layers' relative output errors in brackets (on the Gram matrices the solves saw: of the "
        "dense model's inputs in the rows marked so). `benchmarks/refit_start.py`; records in "
        "`refit_start.json`.",
        "",
        "| model | windows | start | mAIHT iterations / CG | refit epochs | " + " | ".join(settings) + " |",
        "|---|---:|---|---|---:|" + "---:|" * len(settings),
    ]
    for key in sorted(rows, key=lambda k: (k[0], k[1], k[5], k[2], -(k[3] or 0), k[6])):
        model, windows, start, iterations, cg, epochs, options = key
        cells = []
        for s in settings:
            r = rows[key].get(s)
            cells.append("–" if r is None else f"{r['perplexity']:.2f} ({r['layer_error_geomean']:.4f})")
        mine = "–" if iterations is None else f"{iterations} / {cg}"
        name = MODELS.get(model, model)
        label = START_NAMES[start] + (f" [{options}]" if options else "")
        lines.append(f"| {name} | {windows} | {label} | {mine} | {epochs} | " + " | ".join(cells) + " |")
    notes = sorted({r["provenance"] for r in runs if "provenance" in r})
    notes += sorted({r["machine"]["note"] for r in runs if "note" in r.get("machine", {})})
    lines += ["", *[f"- {note}." for note in notes]] if notes else []
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local model folder (default: the demo model)")
    parser.add_argument("--setting", default="2:4", help="'2:4', '4:8', or a percentage such as '50%%'")
    parser.add_argument("--start", default="maiht-sparsegpt", choices=list(STARTS))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cg", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another MAIHTConfig field, e.g. scope=layer (repeatable)",
    )
    parser.add_argument("--render", action="store_true", help="only write results/refit_start.md")
    args = parser.parse_args()
    args.option = parse_options(args.option)
    record = None
    if not args.render:
        torch.set_num_threads(1)
        record = run(args)
        print(json.dumps(record), flush=True)
    # read after the run: two runs sharing the machine each add their record
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    if record is not None:
        data["runs"].append({**record, "machine": machine(), "versions": versions()})
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS_DIR / "refit_start.md").write_text(render(data["runs"]))


if __name__ == "__main__":
    main()
