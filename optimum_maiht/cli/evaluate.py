"""``optimum-cli maiht eval``: perplexity (``optimum_maiht.evaluation.perplexity``), measured sparsity and,
with ``--tasks``, lm-evaluation-harness accuracy (``optimum_maiht.zeroshot.evaluate_tasks``) of any causal
LM, dense, pruned or saved compressed."""

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
    add_zero_shot_flags,
    context_check,
    device_flag,
    dtype_flag,
    evaluation_windows,
    model_source,
    require_at_least,
    setup_parser,
    zero_shot_options,
)
from .errors import run_guarded

EXAMPLE = """examples:
  # perplexity on the bundled WikiText-2 test excerpt, windows of the model's length (<= 2048):
  optimum-cli maiht eval --model smollm2-maiht-2of4
  # plus the pruning papers' seven zero-shot tasks (pip install "optimum-maiht[eval]"; data from the Hub):
  optimum-cli maiht eval --model smollm2-maiht-2of4 \\
      --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --json
  # a task of your own on local data (a folder of lm-eval task YAMLs):
  optimum-cli maiht eval --model smollm2-maiht-2of4 --include-path my_tasks --tasks my_task --limit 200
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``eval``: model, evaluation windows, batch size, loading, output form."""
    setup_parser(
        parser,
        "Measure the perplexity of any causal LM (dense, pruned, or saved compressed) on non-overlapping "
        "windows of text, its exact-zero sparsity by layer type and, with --tasks, its accuracy on "
        "lm-evaluation-harness tasks.",
        EXAMPLE,
    )
    parser.add_argument("--model", required=True, metavar="ID_OR_DIR", help="Hub model id or local folder")
    add_evaluation_flags(parser, DEFAULT_EVAL_TEXT)
    add_zero_shot_flags(parser.add_argument_group("zero-shot tasks (lm-evaluation-harness)"))
    parser.add_argument(
        "--batch-size", type=int, default=4, help="windows (or lm-eval requests) per forward pass (>= 1)"
    )
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


def evaluate(
    args: argparse.Namespace, windows: EvalWindows, device: Any, tasks: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load the model, then measure; the result as printed by ``--json`` (``zero_shot`` with ``--tasks``:
    its ``results`` hold, per task, the metrics as lm-eval names them)."""
    from optimum_maiht.data import describe_data
    from optimum_maiht.evaluation import default_sequence_length, perplexity, sparsity_by_layer_type

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(args.model, args.dtype, device)
    length = windows.sequence_length or default_sequence_length(model)
    context_check(model, length, "--sequence-length")
    ppl = perplexity(
        model,
        tokenizer,
        windows.dataset,
        length,
        max_windows=windows.max_windows,
        batch_size=args.batch_size,
        progress=not args.json,
    )
    result = {
        "model": args.model,
        "dataset": describe_data(args.dataset),
        "sequence_length": length,
        "windows": windows.max_windows,
        "perplexity": ppl,
        "sparsity": sparsity_by_layer_type(model),
    }
    if tasks is not None:
        from optimum_maiht.zeroshot import evaluate_tasks

        scores = evaluate_tasks(model, tokenizer, batch_size=args.batch_size, **tasks)
        result["zero_shot"] = scores.to_dict()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def print_table(result: dict[str, Any]) -> None:
    """The human-readable form of :func:`evaluate`'s result."""
    width = max(len(kind) for kind in result["sparsity"])
    print(f"model       {result['model']}")
    windows = f"the first {result['windows']}" if result["windows"] else "all"
    print(
        f"perplexity  {result['perplexity']:.3f} on {result['dataset']}, {windows} non-overlapping windows "
        f"of {result['sequence_length']} tokens ({result['seconds']:.1f} s in all)"
    )
    print("sparsity by layer type (exact zeros, decoder blocks):")
    for kind, value in result["sparsity"].items():
        print(f"  {kind:<{width}}  {value:7.2%}")
    if "zero_shot" in result:
        print_zero_shot(result["zero_shot"])


def print_zero_shot(zero_shot: dict[str, Any]) -> None:
    """Per task, every metric lm-eval reports, with its standard error; then the mean."""
    limit = zero_shot["limit"]
    limit_text = f", limit {limit} per task" if limit is not None else ""
    print(f"lm-eval {zero_shot['lm_eval_version']} tasks{limit_text} (value +- standard error):")
    rows = []
    for task, entry in zero_shot["results"].items():
        shots = f"{entry['num_fewshot']}-shot" if entry.get("num_fewshot") is not None else ""
        for metric in entry.get("higher_is_better") or {}:
            stderr = entry.get(_stderr_key(metric))
            spread = f" +- {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            rows.append((task, metric, f"{entry[metric]:.4f}{spread}", shots))
    widths = [max([len(row[i]) for row in rows], default=0) for i in range(3)]
    for task, metric, value, shots in rows:
        print(f"  {task:<{widths[0]}}  {metric:<{widths[1]}}  {value:<{widths[2]}}  {shots}")
    mean = zero_shot["mean"]
    if mean["value"] is not None:
        count = len(mean["tasks"])
        print(f"  mean {mean['metric']} over {count} task{'s' * (count != 1)}: {mean['value']:.4f}")


def _stderr_key(metric: str) -> str:
    name, comma, kind = metric.partition(",")
    return f"{name}_stderr{comma}{kind}"


def run(args: argparse.Namespace) -> None:
    """Check every flag, then load the model, measure, print."""
    windows = evaluation_windows(args)
    require_at_least(args.batch_size, "--batch-size", 1, "windows per forward pass")
    model_source(args.model)
    device = device_flag(args.device)
    tasks = zero_shot_options(args)
    result = evaluate(args, windows, device, tasks)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


class EvalCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="eval",
        help="Perplexity, measured sparsity and lm-eval task accuracy of a causal LM, dense or pruned.",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        run_guarded(run, self.args)
