"""``optimum-cli maiht push``: upload a saved folder with ``optimum_maiht.hub.push_to_hub``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .arguments import add_verbose, setup_parser
from .errors import CLIError, run_guarded

EXAMPLE = (
    "example:\n  optimum-cli maiht push --model smollm2-maiht-2of4 --repo-id me/SmolLM2-135M-maiht-2of4 "
    "--private\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``push``: the folder, the repo and the commit options."""
    setup_parser(
        parser,
        "Upload a folder saved by `optimum-cli maiht prune` (weights, configs, report, model card) to a Hub "
        "model repo, creating the repo if needed. The token comes from HF_TOKEN or `hf auth login`; "
        "HF_ENDPOINT is respected.",
        EXAMPLE,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the saved folder to upload")
    parser.add_argument("--repo-id", required=True, metavar="REPO_ID", help="e.g. user/model-name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument(
        "--commit-message", default=None, help="commit message (default: one written by optimum-maiht)"
    )
    parser.add_argument("--revision", default=None, help="branch to commit to (default: the main branch)")
    add_verbose(parser)


def push_folder(folder: Path, repo_id: str, **options: Any) -> str:
    """Upload a saved folder with ``optimum_maiht.hub.push_to_hub`` (token from HF_TOKEN / login)."""
    from optimum_maiht.hub import push_to_hub

    return push_to_hub(folder, repo_id, **options)


def run(args: argparse.Namespace) -> None:
    """Check the folder, upload it, print the commit (or pull request) URL."""
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise CLIError(f"--model {args.model}: folder not found (push uploads a saved folder)")
    url = push_folder(
        folder,
        args.repo_id,
        private=True if args.private else None,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        revision=args.revision,
    )
    print(f"pushed {folder} to {url}")


class PushCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="push", help="Upload a saved (pruned) model folder to the Hugging Face Hub.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        run_guarded(run, self.args)
