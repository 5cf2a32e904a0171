"""The model card of a pruned model: Hub metadata plus what was done, rendered from a Jinja template
(docs/design.md, "Model card and Hub").

The card (``README.md``) carries the Hub metadata (``base_model``, licence, tags, ``model-index`` with the
measured perplexities and lm-eval task scores) and says what the model is, how it was pruned and how to
load it. It is written by :func:`optimum_maiht.serialization.save_pruned` into every saved folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import CARD_NAME, SAVE_FORMATS, SOLVER_DISPLAY_NAMES
from .model_utils import looks_like_local_path
from .report import PruneReport, ZeroShotResults, layer_type

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

TEMPLATE_NAME = "maiht_model_card.md.j2"

_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")


def template_path() -> Path:
    """The card template: ``optimum_maiht/model_cards/`` once installed, ``model_cards/`` in a source tree
    (the wheel maps the repository's ``model_cards/`` folder into the package)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "model_cards", here.parent / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(
        f"model card template {TEMPLATE_NAME} not found in {here / 'model_cards'} or "
        f"{here.parent / 'model_cards'}; reinstall optimum-maiht"
    )


def _is_hub_id(value: Any) -> bool:
    """True for a plausible Hub model id (``name`` or ``owner/name``) that is not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or looks_like_local_path(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return not Path(value).exists()


def _pattern(config: dict[str, Any]) -> tuple[str, str, str, tuple[int, int] | None]:
    """(human text, Hub tag, kind "2:4" | "nm" | "unstructured", (N, M) or None) of the run's pattern."""
    pattern = str(config.get("pattern", "unstructured"))
    sparsity = float(config.get("sparsity") or 0.5)
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if match is None:
        return f"{sparsity:.0%} unstructured sparsity", "unstructured-sparsity", "unstructured", None
    n, m = int(match[1]), int(match[2])
    kind = "2:4" if (n, m) == (2, 4) else "nm"
    text = f"{n}:{m} semi-structured sparsity" if kind == "2:4" else f"{n}:{m} sparsity ({sparsity:.0%})"
    return text, f"{n}:{m}-sparsity", kind, (n, m)


def _cell(value: Any) -> str:
    """A config value as Markdown table cell text (``|`` escaped, so regexes keep the table intact)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value) if value else "(none)"
    if isinstance(value, float):
        value = f"{value:g}"
    return "`" + str(value).replace("|", "\\|") + "`"


def _eval_results(evaluation: dict[str, Any], pattern_text: str) -> list[Any]:
    from huggingface_hub import EvalResult

    dataset = str(evaluation.get("dataset") or "unknown")
    dataset_type, dataset_config = _WIKITEXT if "wikitext" in dataset.lower() else (dataset, None)
    common = dict(
        task_type="text-generation",
        task_name="Text Generation",
        dataset_type=dataset_type,
        dataset_name=dataset,
        dataset_config=dataset_config,
        dataset_split=evaluation.get("split"),
        metric_type="perplexity",
    )
    return [
        EvalResult(
            **common,
            metric_value=round(float(evaluation["perplexity_before"]), 4),
            metric_name="Perplexity of the dense base model (before pruning)",
        ),
        EvalResult(
            **common,
            metric_value=round(float(evaluation["perplexity_after"]), 4),
            metric_name=f"Perplexity after pruning ({pattern_text})",
        ),
    ]


_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
"""``dataset_path`` values of lm-eval tasks that read local files (no Hub dataset to link)."""


def _zero_shot_results(zero_shot: dict[str, ZeroShotResults] | None, pattern_text: str) -> list[Any]:
    """One model-index entry per (task, metric) of the lm-eval tasks asked for (a group by its aggregate,
    its subtasks stay in ``maiht_report.json``), after pruning and, when measured, before."""
    from huggingface_hub import EvalResult

    results = []
    for when, label in (("before", "of the dense base model (before pruning)"), ("after", "after pruning")):
        run = (zero_shot or {}).get(when)
        if run is None:
            continue
        limit = f", {_limit_text(run.limit)}" if run.limit is not None else ""
        for score in (s for s in run.scores if s.subtask_of is None):
            hub_dataset = score.dataset and score.dataset not in _LOCAL_BUILDERS and _is_hub_id(score.dataset)
            shots = f"{score.num_fewshot}-shot" if score.num_fewshot is not None else "default shots"
            context = f"{pattern_text}; " if when == "after" else ""
            how = f"{context}{shots}{limit}, lm-eval {run.lm_eval_version}"
            args = {"num_few_shot": score.num_fewshot} if score.num_fewshot is not None else None
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=score.dataset if hub_dataset else score.task,
                    dataset_name=score.task,
                    dataset_config=score.dataset_config if hub_dataset else None,
                    dataset_split=score.split,
                    dataset_args=args,
                    metric_type=score.metric,
                    metric_value=round(score.value, 4),
                    metric_name=f"{score.metric} {label} ({how})",
                )
            )
    return results


def _limit_text(limit: int | float) -> str:
    return f"first {limit} documents per task" if isinstance(limit, int) else f"{limit:.0%} of each task"


def _zero_shot_table(zero_shot: dict[str, ZeroShotResults] | None) -> dict[str, Any] | None:
    """The card's zero-shot table: per (task, metric) the dense and the pruned value, and the mean."""
    if not zero_shot or zero_shot.get("after") is None:
        return None
    after, before = zero_shot["after"], zero_shot.get("before")
    rows = []
    for score in (s for s in after.scores if s.subtask_of is None):
        dense = before.score(score.task, score.metric) if before is not None else None
        rows.append({"task": score.task, "metric": score.metric, "before": dense, "after": score})
    mean_before = before.mean(after.mean_metric) if before is not None else None
    return {
        "rows": rows,
        "version": after.lm_eval_version,
        "num_fewshot": after.num_fewshot,
        "shots": sorted({s.num_fewshot for s in after.scores if s.num_fewshot is not None}),
        "limit": _limit_text(after.limit) if after.limit is not None else None,
        "mean": {
            "metric": after.mean_metric,
            "tasks": len(after.mean_tasks()),
            "before": mean_before,
            "after": after.mean(),
        },
    }


def _checked(
    report: PruneReport | dict[str, Any], base_model: str | None, repo_id: str | None, storage_format: str
) -> PruneReport:
    """The report as a :class:`PruneReport`, once it and the card's options are checked."""
    if isinstance(report, dict):
        if not report.get("layers"):
            raise ValueError(
                "the report has no layers: prune first (pruner.prune(...)), then pass pruner.report"
            )
        report = PruneReport.from_dict(report)
    if not report.layers:
        raise ValueError("the report has no layers: prune first (pruner.prune(...)), then pass pruner.report")
    if base_model is not None and not _is_hub_id(base_model):
        raise ValueError(
            f"base_model must be a Hub model id such as 'HuggingFaceTB/SmolLM2-135M', got {base_model!r}"
        )
    if repo_id is not None:
        check_repo_id(repo_id)
    if storage_format not in SAVE_FORMATS:
        raise ValueError(f"storage_format must be one of {SAVE_FORMATS}, got {storage_format!r}")
    return report


def render_model_card(
    report: PruneReport | dict[str, Any],
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    notes: str | None = None,
    storage_format: str = "dense",
) -> ModelCard:
    """Render the model card of a pruned model from its report.

    Args:
        report: ``pruner.report`` or the saved ``maiht_report.json`` (as a dict); an ``evaluation`` with
            ``perplexity_before`` / ``perplexity_after`` adds the results, and ``zero_shot`` (lm-eval tasks
            before / after) adds a table with the mean and one model-index entry per task and metric.
        base_model: Hub id of the model that was pruned; default: the report's ``base_model`` when it is a
            Hub id (a local path is not, and is left out of the metadata).
        license: licence of the base model (e.g. ``"apache-2.0"``), carried over; left out when unknown,
            never guessed.
        repo_id: the Hub repository the card is for (used in the loading examples and as the title).
        notes: extra Markdown placed under the description (e.g. where the base weights came from).
        storage_format: ``"dense"`` (safetensors with zeros, plain transformers loads it) or
            ``"compressed"`` (the compact format; the card says to load it with ``MAIHTModelForCausalLM``).
    """
    from huggingface_hub import ModelCard

    report = _checked(report, base_model, repo_id, storage_format)
    base_model = base_model or (report.base_model if _is_hub_id(report.base_model) else None)
    pattern = _pattern(report.config)
    title = _title(repo_id, base_model, report.config, pattern[3])
    evaluation = _complete_evaluation(report.evaluation)
    return ModelCard.from_template(
        _card_data(report, base_model, license, title, pattern, evaluation),
        template_path=str(template_path()),
        title=title,
        notes=notes,
        pattern_text=pattern[0],
        pattern_kind=pattern[2],
        solver=report.solver,
        solver_name=SOLVER_DISPLAY_NAMES.get(report.solver, report.solver),
        method=report.method,
        config_rows=[(key, _cell(value)) for key, value in report.config.items()],
        sparsity_rows=report.sparsity_by_type(),
        overall={"layers": len(report.pruned), "sparsity": report.sparsity},
        skipped=[{"name": layer.name, "reason": layer.skipped} for layer in report.skipped],
        kept_dense=_kept_dense_rows(report),
        experts=_expert_statistics(report),
        reconstruction=report.reconstruction_mean(),
        reconstruction_rows=report.reconstruction or [],
        refit_precision=_refit_precision(report),
        pass_dtypes=", ".join(sorted({d for d in report.block_dtypes if d})),
        calibration=report.calibration,
        device=report.device,
        seconds=report.seconds,
        evaluation=evaluation,
        zero_shot=_zero_shot_table(report.zero_shot),
        versions=report.versions,
        model_ref=repo_id or "path/to/this/model",
        storage_format=storage_format,
    )


def _refit_precision(report: PruneReport) -> str:
    """The dtypes the blocks' refits ran in (one, unless a block fell back to float32)."""
    return ", ".join(sorted({b.precision for b in report.reconstruction or [] if b.skipped is None}))


def _title(repo_id: str | None, base_model: str | None, config: dict[str, Any], nm: tuple | None) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    if base_model:
        percent = round(100 * float(config.get("sparsity") or 0.5))
        slug = f"{nm[0]}of{nm[1]}" if nm else f"unstructured{percent}"
        return f"{base_model.split('/')[-1]}-maiht-{slug}"
    return "mAIHT-pruned model"


def _complete_evaluation(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation, if it holds both perplexities (else the card shows none)."""
    keys = ("perplexity_before", "perplexity_after")
    if evaluation and all(isinstance(evaluation.get(k), (int, float)) for k in keys):
        return evaluation
    return None


def _card_data(
    report: PruneReport,
    base_model: str | None,
    license: str | None,
    title: str,
    pattern: tuple,
    evaluation: dict[str, Any] | None,
) -> Any:
    """The card's YAML metadata (what the Hub indexes)."""
    from huggingface_hub import ModelCardData

    source = str(report.calibration.get("source", "")).lower()
    return ModelCardData(
        base_model=base_model,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[
            "pruned",
            "sparse",
            SOLVER_DISPLAY_NAMES.get(report.solver, report.solver),
            "optimum",
            pattern[1],
        ],
        datasets=[_WIKITEXT[0]] if "wikitext" in source else None,
        model_name=title,
        eval_results=(
            (_eval_results(evaluation, pattern[0]) if evaluation else [])
            + _zero_shot_results(report.zero_shot, pattern[0])
        )
        or None,
    )


def _kept_dense_rows(report: PruneReport) -> list[dict[str, Any]]:
    """Matrices kept dense, grouped by layer type and reason (an MoE model has thousands of them)."""
    groups: dict[tuple[str, str], int] = {}
    for weight in report.kept_dense:
        key = (layer_type(weight.name), weight.reason)
        groups[key] = groups.get(key, 0) + 1
    return [
        {"type": kind, "count": count, "reason": reason.replace("|", "\\|")}  # keep the Markdown table intact
        for (kind, reason), count in groups.items()
    ]


def _expert_statistics(report: PruneReport) -> dict[str, Any] | None:
    """For MoE models: how many expert matrices were pruned, and how many on all tokens (starved)."""
    experts = [layer for layer in report.pruned if layer.statistics is not None]
    if not experts:
        return None
    starved = [layer for layer in experts if layer.statistics != "routed"]
    tokens = [layer.tokens or 0 for layer in experts]
    return {
        "matrices": len(experts),
        "starved": len(starved),
        "min_tokens": min(tokens),
        "max_tokens": max(tokens),
    }


def write_model_card(folder: str | os.PathLike, report: PruneReport | dict[str, Any], **kwargs: Any) -> Path:
    """Render the card (``kwargs`` as in :func:`render_model_card`) and write it as ``folder/README.md``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write the model card: {folder} is not a folder")
    path = folder / CARD_NAME
    path.write_text(str(render_model_card(report, **kwargs)), encoding="utf-8")
    return path


def check_repo_id(repo_id: Any) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = "use 'namespace/name', e.g. 'my-user/SmolLM2-135M-maiht-2of4'"
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string; {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repository id ({err}); {hint}") from None
