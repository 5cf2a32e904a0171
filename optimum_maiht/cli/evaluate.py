"""``optimum-cli maiht eval``: perplexity (``optimum_maiht.evaluation.perplexity``) and measured sparsity
of any causal LM, dense, pruned or saved compressed."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from optimum_maiht.constants import DEFAULT_EVAL_TEXT

from .arguments import (
    EvalWindows,
    add_evaluation_flags,
    add_model_loading,
    add_verbose,
    context_check,
    device_flag,
    dtype_flag,
    evaluation_windows,
    model_source,
    require_at_least,
    setup_parser,
)
from .errors import run_guarded

EXAMPLE = "example:\n  optimum-cli maiht eval --model smollm2-maiht-2of4 --max-windows 40\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``eval``: model, evaluation windows, batch size, loading, output form."""
    setup_parser(
        parser,
        "Measure the perplexity of any causal LM (dense, pruned, or saved compressed) on non-overlapping "
        "windows of text, and its exact-zero sparsity by layer type.",
        EXAMPLE,
    )
    parser.add_argument("--model", required=True, metavar="ID_OR_DIR", help="Hub model id or local folder")
    add_evaluation_flags(parser, DEFAULT_EVAL_TEXT)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (>= 1)")
    add_model_loading(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_verbose(parser)


def load_causal_lm(source: str, dtype: str, device: Any) -> tuple[Any, Any]:
    """Model (on ``device``) and tokenizer of a checkpoint, dense or saved compressed, pruned or not."""
    from transformers import AutoTokenizer

    from optimum_maiht.modeling import MAIHTModelForCausalLM

    model = MAIHTModelForCausalLM.from_pretrained(source, dtype=dtype_flag(dtype))
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(device), tokenizer


def evaluate(args: argparse.Namespace, windows: EvalWindows, device: Any) -> dict[str, Any]:
    """Load the model, then measure; the result as printed by ``--json``."""
    from optimum_maiht.data import describe_data
    from optimum_maiht.evaluation import perplexity, sparsity_by_layer_type

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, args.dtype, device)
    context_check(model, windows.sequence_length, "--sequence-length")
    ppl = perplexity(
        model,
        tokenizer,
        windows.dataset,
        windows.sequence_length,
        windows.max_windows,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    return {
        "model": args.model,
        "dataset": describe_data(args.dataset),
        "sequence_length": windows.sequence_length,
        "windows": windows.max_windows,
        "perplexity": ppl,
        "sparsity": sparsity_by_layer_type(model),
        "seconds": round(time.perf_counter() - start, 2),
    }


def print_table(result: dict[str, Any]) -> None:
    """The human-readable form of :func:`evaluate`'s result."""
    width = max(len(kind) for kind in result["sparsity"])
    print(f"model       {result['model']}")
    windows = result["windows"] or "all"
    print(
        f"perplexity  {result['perplexity']:.3f} on {result['dataset']}, {windows} windows of "
        f"{result['sequence_length']} tokens ({result['seconds']:.1f} s)"
    )
    print("sparsity by layer type (exact zeros, decoder blocks):")
    for kind, value in result["sparsity"].items():
        print(f"  {kind:<{width}}  {value:7.2%}")


def run(args: argparse.Namespace) -> None:
    """Check every flag, then load the model, measure, print."""
    windows = evaluation_windows(args)
    require_at_least(args.batch_size, "--batch-size", 1, "windows per forward pass")
    model_source(args.model)
    result = evaluate(args, windows, device_flag(args.device))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


class EvalCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="eval", help="Perplexity and measured sparsity of a causal LM, dense or pruned."
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        run_guarded(run, self.args)
