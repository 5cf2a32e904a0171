"""The flags the commands share and the checks of their values, made before anything is loaded.

Module level reads only the standard library, ``optimum_maiht.constants`` and (inside
:func:`config_flags`) ``optimum_maiht.configuration``; the checks that need the API import it when called.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimum_maiht.constants import BUNDLED_ALIASES, BUNDLED_TEXTS

from .errors import CLIError, about_flag

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""``--dtype`` choices: ``auto`` keeps the checkpoint's dtype."""
EVAL_MAX_WINDOWS = 0
"""``--max-windows`` / ``--eval-max-windows`` default: the whole text, as the papers measure it."""
LENGTH_HELP = (
    "tokens per window, >= 2 (default: the model's training length, max_position_embeddings, capped at "
    "2048, as the papers measure it)"
)
TASKS_HELP = (
    "comma-separated lm-evaluation-harness tasks, groups or tags (needs pip install "
    '"optimum-maiht[eval]"), e.g. the pruning papers\' seven: boolq,rte,hellaswag,winogrande,arc_easy,'
    "arc_challenge,openbookqa (their data comes from the Hugging Face Hub). lm-eval's own 'wikitext' task is "
    "word-level rolling perplexity, not comparable with the perplexity measured here (default: no task)"
)


@dataclass(frozen=True)
class ConfigFlag:
    """How one ``MAIHTConfig`` field appears on the command line (its default comes from the dataclass)."""

    type: Callable[[str], Any]
    help: str
    nargs: str | None = None
    metavar: str | None = None
    default_text: str | None = None


def regex_sparsity(text: str) -> tuple[str, float]:
    """``--layer-sparsity`` entries: ``REGEX=SPARSITY`` (the last ``=`` splits them)."""
    regex, sep, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not regex or number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not REGEX=SPARSITY, e.g. 'mlp.down_proj=0.4'")
    return regex, number


NO_LIMIT = "none"
"""What ``--reconstruction-max-gib none`` parses to (a flag's ``None`` means "not given"); ``build_config``
turns it into the field's ``None``."""


def number_or_none(text: str) -> float | str:
    """A number, or :data:`NO_LIMIT` for ``none``."""
    if text.strip().lower() == NO_LIMIT:
        return NO_LIMIT
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None


CONFIG_FLAGS: dict[str, ConfigFlag] = {
    "solver": ConfigFlag(
        str,
        "layer solver: 'maiht' (this package's), or the baselines 'sparsegpt', 'wanda', 'magnitude' on the "
        "same calibration",
    ),
    "start": ConfigFlag(
        str,
        "where mAIHT starts each layer: 'sparsegpt' (SparseGPT's solution, which mAIHT can only improve) or "
        "'wanda' (Wanda's mask, faster)",
    ),
    "sparsity": ConfigFlag(
        float,
        "fraction of weights set to zero in every target layer, in (0, 1)",
        default_text="0.5, or 1 - N/M for an N:M pattern",
    ),
    "pattern": ConfigFlag(
        str, "'unstructured', or N:M such as 2:4 or 4:8 (keep N of every M consecutive input weights)"
    ),
    "scope": ConfigFlag(str, "unstructured comparison group: 'row' (per output channel) or 'layer'"),
    "formulation": ConfigFlag(
        str,
        "'constraint' (projection onto the sparsity set) or 'penalty' (the paper's l0-penalty form, "
        "unstructured only)",
    ),
    "iterations": ConfigFlag(int, "mAIHT iterations per layer"),
    "refit_iterations": ConfigFlag(int, "conjugate-gradient steps refitting the kept weights on the mask"),
    "ridge": ConfigFlag(float, "ridge added to the unit diagonal of the scaled Gram matrix"),
    "targets": ConfigFlag(str, "regexes of the linear layers (inside decoder blocks) to prune", "+", "REGEX"),
    "ignore": ConfigFlag(
        str, "regexes of layers kept dense; give the flag alone to ignore nothing", "*", "REGEX"
    ),
    "num_samples": ConfigFlag(int, "calibration windows"),
    "sequence_length": ConfigFlag(int, "tokens per calibration window (capped at the model's context)"),
    "batch_size": ConfigFlag(
        int,
        "windows per forward pass (memory; with block reconstruction also the unit held out to choose its "
        "epochs; also used by --eval)",
    ),
    "seed": ConfigFlag(int, "seed of the calibration windows' choice and of the power iteration"),
    "compute_dtype": ConfigFlag(
        str,
        "dtype of the matrix products of a float32 block's calibration passes and block reconstruction: "
        "float32, bfloat16 (autocast; outputs, weights, Adam and Gram matrices stay float32) or auto "
        "(bfloat16 where the device has it natively); --dtype is the dtype the model is loaded in",
    ),
    "experts_per_pass": ConfigFlag(
        int,
        "mixture-of-experts blocks: experts whose Gram matrices are gathered in one calibration pass "
        "(memory only)",
        default_text="as many as fit in 2 GiB",
    ),
    "min_expert_tokens": ConfigFlag(
        int,
        "an expert routed fewer calibration tokens than this takes its statistics from every token "
        "(0: always the routed ones)",
    ),
    "reconstruction_epochs": ConfigFlag(
        int,
        "block reconstruction: at most this many epochs refitting each block's kept weights to the dense "
        "block's output, the epoch kept chosen on held-out calibration windows (0: off)",
    ),
    "reconstruction_lr": ConfigFlag(
        float, "Adam learning rate of the block reconstruction, relative to the RMS of each weight tensor"
    ),
    "reconstruction_decay": ConfigFlag(
        float,
        "share of the block reconstruction's steps, at its end, over which its rate falls linearly to 0 "
        "(0: constant)",
    ),
    "reconstruction_holdout": ConfigFlag(
        float, "share of the calibration batches held out to choose the block reconstruction's epochs"
    ),
    "reconstruction_batch_size": ConfigFlag(
        int,
        "calibration windows per Adam step of the block reconstruction (each batch is cut into pieces; "
        "--batch-size or more: one step per batch)",
    ),
    "reconstruction_max_gib": ConfigFlag(
        number_or_none,
        "a block whose refit would hold more GiB than this (22 bytes per pruned weight) keeps its "
        "solved weights, with a warning; 'none': no limit",
    ),
    "layer_sparsity": ConfigFlag(
        regex_sparsity,
        "per-layer sparsity plan, unstructured only: a target whose full name matches REGEX (the first that "
        "does) gets that sparsity instead of --sparsity",
        "+",
        "REGEX=SPARSITY",
        default_text="none: every layer at --sparsity",
    ),
}
"""CLI wording of the ``MAIHTConfig`` fields; a field missing here still gets a flag (see config_flags)."""


def config_flags() -> list[tuple[str, ConfigFlag, Any]]:
    """``(field, flag, default)`` for every ``MAIHTConfig`` field, in the dataclass's order.

    Needs ``optimum_maiht.configuration`` only (standard library): cheap at optimum-cli start-up as long as
    ``optimum_maiht/__init__.py`` imports its heavy modules lazily.
    """
    from dataclasses import MISSING, fields

    from optimum_maiht.configuration import MAIHTConfig

    result = []
    for f in fields(MAIHTConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        flag = CONFIG_FLAGS.get(f.name)
        if flag is None:  # a field added to MAIHTConfig without CLI wording yet
            is_list = isinstance(default, list)
            kind = str if is_list or default is None else type(default)
            flag = ConfigFlag(kind, f"MAIHTConfig.{f.name}", "+" if is_list else None)
        result.append((f.name, flag, default))
    return result


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it; keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if action.required or "(default:" in text else super()._get_help_string(action)


# --- flag builders ------------------------------------------------------------------------------------


def setup_parser(parser: argparse.ArgumentParser, description: str, epilog: str | None = None) -> None:
    """Description, examples and the help formatter of one command."""
    parser.formatter_class = HelpFormatter
    parser.description = description
    parser.epilog = epilog


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="log progress at INFO level and show the full traceback of any error",
    )


def add_model_loading(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (prune and eval)."""
    parser.add_argument(
        "--device", default="auto", help="'cpu', 'cuda' or 'cuda:N'; 'auto' is CUDA when available, else CPU"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype to load the model in; 'auto' keeps the checkpoint's",
    )


def text_help(purpose: str) -> str:
    """Help of a text flag: the bundled names (from ``optimum_maiht.constants``) or a file."""
    aliases = "".join(f"; '{alias}' is short for '{name}'" for alias, name in BUNDLED_ALIASES.items())
    names = ", ".join(f"'{name}'" for name in BUNDLED_TEXTS)
    return f"{purpose}: a bundled WikiText-2 excerpt ({names}{aliases}) or a .txt / .jsonl / .parquet file"


def add_evaluation_flags(parser: Any, default_dataset: str, prefix: str = "") -> None:
    """``--{prefix}dataset``, ``--{prefix}sequence-length``, ``--{prefix}max-windows``: the evaluation
    windows of ``eval`` (no prefix) and of ``prune --eval`` (prefix ``eval-``)."""
    parser.add_argument(
        f"--{prefix}dataset",
        default=default_dataset,
        metavar="NAME_OR_FILE",
        help=text_help("evaluation text"),
    )
    parser.add_argument(f"--{prefix}sequence-length", type=int, default=None, help=LENGTH_HELP)
    parser.add_argument(
        f"--{prefix}max-windows",
        type=int,
        default=EVAL_MAX_WINDOWS,
        help="windows evaluated, the first ones (0: the whole text; a few for a quick look)",
    )


def add_zero_shot_flags(parser: Any, prefix: str = "") -> None:
    """``--{prefix}tasks``, ``--{prefix}num-fewshot``, ``--{prefix}limit``, ``--{prefix}include-path``: the
    lm-evaluation-harness tasks of ``eval`` (no prefix) and of ``prune`` (prefix ``eval-``)."""
    parser.add_argument(f"--{prefix}tasks", default=None, metavar="TASKS", help=TASKS_HELP)
    parser.add_argument(
        f"--{prefix}num-fewshot",
        type=int,
        default=None,
        metavar="K",
        help="few-shot examples per prompt (default: each task's own, 0 for the seven above)",
    )
    parser.add_argument(
        f"--{prefix}limit",
        type=_count_or_fraction,
        default=None,
        metavar="N",
        help="documents per task, or a fraction of them below 1: quicker, noisier numbers (default: all)",
    )
    parser.add_argument(
        f"--{prefix}include-path",
        default=None,
        metavar="DIR",
        help="folder of your own lm-eval task YAMLs, e.g. on local data: dataset_path: json with data_files, "
        "read from the working directory (default: none)",
    )


# --- checks of the values, before any loading -----------------------------------------------------------


def _count_or_fraction(text: str) -> int | float:
    """``--limit``: ``"100"`` -> 100, ``"0.1"`` -> 0.1 (its range is checked with the other flags)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def require_at_least(value: int, flag: str, minimum: int, meaning: str) -> None:
    """A one-line error naming ``flag`` and the smallest value it takes."""
    if value < minimum:
        raise CLIError(f"{flag} {value} is too small: give {minimum} or more ({meaning})")


@dataclass(frozen=True)
class EvalWindows:
    """The checked evaluation flags."""

    dataset: str
    sequence_length: int | None
    """``None``: the model's training length capped at 2048 (known once the model is loaded)."""
    max_windows: int | None
    """``None``: every window of the text (``--max-windows 0``)."""


def evaluation_windows(args: argparse.Namespace, prefix: str = "") -> EvalWindows:
    """The flags of :func:`add_evaluation_flags`, checked: a window needs 2 tokens, a count is >= 0, the
    text is bundled or a file."""
    dest = prefix.replace("-", "_")
    length = getattr(args, f"{dest}sequence_length")
    windows = getattr(args, f"{dest}max_windows")
    if length is not None:
        meaning = "a window predicts each token after its first"
        require_at_least(length, f"--{prefix}sequence-length", 2, meaning)
    require_at_least(windows, f"--{prefix}max-windows", 0, "0 evaluates every window of the text")
    dataset = text_source(getattr(args, f"{dest}dataset"), f"--{prefix}dataset")
    return EvalWindows(dataset, length, windows or None)


def zero_shot_options(args: argparse.Namespace, prefix: str = "") -> dict[str, Any] | None:
    """The flags of :func:`add_zero_shot_flags`, checked before the model is loaded: ``None`` without
    ``--{prefix}tasks``, else the keyword arguments of ``optimum_maiht.zeroshot.evaluate_tasks`` (lm-eval
    installed, every task known, the include path a folder)."""
    dest = prefix.replace("-", "_")
    tasks = getattr(args, f"{dest}tasks")
    others = ("num_fewshot", "limit", "include_path")
    if tasks is None:
        flags = {f"--{prefix}{o.replace('_', '-')}": getattr(args, f"{dest}{o}") for o in others}
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise CLIError(f"{', '.join(given)} given without --{prefix}tasks: name the tasks to evaluate")
        return None
    from optimum_maiht import zeroshot

    options = {o: getattr(args, f"{dest}{o}") for o in others}
    with about_flag(f"--{prefix}tasks"):
        options["tasks"] = zeroshot.parse_tasks(tasks)
    if options["num_fewshot"] is not None:
        require_at_least(options["num_fewshot"], f"--{prefix}num-fewshot", 0, "0 is zero-shot")
    limit = options["limit"]
    if limit is not None and not (limit >= 1 if isinstance(limit, int) else 0 < limit < 1):
        raise CLIError(
            f"--{prefix}limit {limit}: give a number of documents (1 or more) or a fraction between 0 and 1"
        )
    if options["include_path"] is not None and not Path(options["include_path"]).expanduser().is_dir():
        raise CLIError(f"--{prefix}include-path {options['include_path']}: no such folder")
    zeroshot.lm_eval_module()  # a missing extra: one line with the install command
    with about_flag(f"--{prefix}tasks"):
        zeroshot.check_tasks(options["tasks"], zeroshot.task_manager(options["include_path"]))
    return options


def text_source(name: str, flag: str) -> str:
    """The text a data flag names: a bundled name as is, else an existing file's expanded path."""
    from optimum_maiht.data import BUNDLED_NAMES, is_bundled

    if is_bundled(name):
        return name
    path = Path(name).expanduser()
    if not path.is_file():
        raise CLIError(f"{flag} {name}: no such file, and not a bundled text ({', '.join(BUNDLED_NAMES)})")
    return str(path)


def model_source(source: str) -> None:
    """Fail fast, before loading anything, on a local ``--model`` folder that is missing or not a model."""
    from optimum_maiht.model_utils import check_model_source

    with about_flag("--model"):
        check_model_source(source)


def output_folder(output: str, overwrite: bool) -> Path:
    """Refuse a non-empty ``--output`` before any work (saving checks again, atomically)."""
    from optimum_maiht.serialization import check_output_folder

    with about_flag("--output", {"overwrite=True": "--overwrite"}):
        return check_output_folder(output, overwrite)


def device_flag(name: str) -> Any:
    """``--device`` as a ``torch.device`` (``auto``: CUDA when available)."""
    from optimum_maiht.model_utils import resolve_device

    with about_flag("--device", {"device=": "--device "}):
        return resolve_device(name)


def dtype_flag(name: str) -> Any:
    """``--dtype`` as transformers' ``dtype=`` argument."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def context_check(model: Any, sequence_length: int, flag: str) -> None:
    """Refuse evaluation windows longer than the model's context (the API's rule, worded with ``flag``)."""
    from optimum_maiht.evaluation import check_sequence_length

    with about_flag(flag, {"sequence_length=": f"{flag} ", "sequence_length": flag}):
        check_sequence_length(model, sequence_length)
