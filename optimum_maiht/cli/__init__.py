"""``optimum-cli maiht prune | eval | push``: the command classes registered with optimum-cli.

Each command reads its flags, checks them before any loading, and calls the API (``MAIHTPruner``,
``evaluation.perplexity``, ``hub.push_to_hub``); ``errors`` turns user errors into one line.

Start-up rule: optimum-cli imports this package on every start, whatever the command, so at module level
it may import only the standard library, ``optimum.commands.base``, ``optimum_maiht.constants`` and
``optimum_maiht.configuration`` (an import error here would break every optimum-cli command, and importing
torch would slow them all down). torch, transformers and the rest of ``optimum_maiht`` are imported inside
``run()``. ``tests/test_cli.py`` checks this rule.
"""

from __future__ import annotations

import argparse

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .arguments import CONFIG_FLAGS, ConfigFlag, HelpFormatter, config_flags, setup_parser
from .errors import USER_ERRORS, CLIError, is_user_error, run_guarded
from .evaluate import EvalCommand
from .prune import PruneCommand, build_config, prune_summary
from .push import PushCommand

__all__ = [
    "CONFIG_FLAGS",
    "USER_ERRORS",
    "CLIError",
    "ConfigFlag",
    "EvalCommand",
    "HelpFormatter",
    "MAIHTCommand",
    "PruneCommand",
    "PushCommand",
    "build_config",
    "config_flags",
    "is_user_error",
    "prune_summary",
    "run_guarded",
]


class MAIHTCommand(BaseOptimumCLICommand):
    """The ``maiht`` group: ``prune``, ``eval`` and ``push``."""

    COMMAND = CommandInfo(
        name="maiht", help="Prune causal LMs with mAIHT, evaluate them, push them to the Hub."
    )
    SUBCOMMANDS = tuple(
        CommandInfo(name=cls.COMMAND.name, help=cls.COMMAND.help, subcommand_class=cls)
        for cls in (PruneCommand, EvalCommand, PushCommand)
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        setup_parser(
            parser,
            "optimum-maiht: one-shot pruning of causal LMs with mAIHT (2:4, N:M or unstructured). Run "
            "`optimum-cli maiht COMMAND --help` for each command's flags.",
        )
