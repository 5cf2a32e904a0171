"""Publish pruned checkpoints: a model card rendered from a Jinja template, and an upload to the Hub.

The card (``README.md``) carries the Hub metadata (``base_model``, licence, tags, ``model-index`` with the
measured perplexities) and says what the model is, how it was pruned and how to load it. The upload goes
through ``huggingface_hub.HfApi`` and so honours ``HF_TOKEN``, the cached login and ``HF_ENDPOINT``; the
token never appears in a file, a log line or an exception message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .serialization import CONFIG_ANNOTATION_KEY

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "maiht_model_card.md.j2"
CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload mAIHT-pruned model with optimum-maiht"
STORAGE_FORMATS = ("dense", "compressed")

_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
_BLOCK_PREFIX = re.compile(r"^.*?\.\d+\.")  # "model.layers.3." in "model.layers.3.mlp.up_proj"
_INNER_INDEX = re.compile(r"\.\d+\.")  # expert indices: "mlp.experts.7.up_proj"


class HubPushError(RuntimeError):
    """Pushing to the Hub failed. The message says what failed and how to fix it, and never holds the token;
    the local folder is left as it was."""


def template_path() -> Path:
    """The card template: ``optimum_maiht/model_cards/`` once installed, ``model_cards/`` in a source tree
    (the wheel maps the repository's ``model_cards/`` folder into the package)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "model_cards", here.parent / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME} not found in {here / 'model_cards'} or "
                            f"{here.parent / 'model_cards'}; reinstall optimum-maiht")


def _is_hub_id(value: Any) -> bool:
    """True for a plausible Hub model id (``name`` or ``owner/name``) that is not a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")) or "\\" in value:
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


def _layer_type(name: str) -> str:
    return _INNER_INDEX.sub(".*.", _BLOCK_PREFIX.sub("", name, count=1))


def sparsity_rows(layers: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per layer type (the name without its block index): layer count, measured sparsity (weighted by
    size) and mean relative output errors; plus the overall row. Skipped layers are left out."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for layer in layers:
        if layer.get("skipped") is None:
            groups[_layer_type(layer["name"])].append(layer)
    rows = []
    zeros_total = size_total = 0.0
    for kind, members in groups.items():
        sizes = [layer["shape"][0] * layer["shape"][1] for layer in members]
        zeros = sum(layer["sparsity"] * size for layer, size in zip(members, sizes, strict=True))
        zeros_total += zeros
        size_total += sum(sizes)
        rows.append({
            "type": kind,
            "layers": len(members),
            "sparsity": zeros / sum(sizes),
            "error_before": sum(layer["error_before"] for layer in members) / len(members),
            "error_after": sum(layer["error_after"] for layer in members) / len(members),
        })
    overall = {"layers": sum(row["layers"] for row in rows),
               "sparsity": zeros_total / size_total if size_total else 0.0}
    return rows, overall


def _eval_results(evaluation: dict[str, Any], pattern_text: str) -> list[Any]:
    from huggingface_hub import EvalResult

    dataset = str(evaluation.get("dataset") or "unknown")
    dataset_type, dataset_config = _WIKITEXT if "wikitext" in dataset.lower() else (dataset, None)
    common = dict(task_type="text-generation", task_name="Text Generation", dataset_type=dataset_type,
                  dataset_name=dataset, dataset_config=dataset_config, dataset_split=evaluation.get("split"),
                  metric_type="perplexity")
    return [
        EvalResult(**common, metric_value=round(float(evaluation["perplexity_before"]), 4),
                   metric_name="Perplexity of the dense base model (before pruning)"),
        EvalResult(**common, metric_value=round(float(evaluation["perplexity_after"]), 4),
                   metric_name=f"Perplexity after pruning ({pattern_text})"),
    ]


def render_model_card(
    report: dict[str, Any],
    *,
    base_model: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    notes: str | None = None,
    storage_format: str = "dense",
) -> ModelCard:
    """Render the model card of a pruned model from ``pruner.report``.

    Args:
        report: the pruning report (``MAIHTPruner.report`` or the saved ``maiht_report.json``); an
            ``"evaluation"`` entry with ``perplexity_before`` / ``perplexity_after`` adds the results.
        base_model: Hub id of the model that was pruned; default: ``report["base_model"]`` when it is a Hub
            id (a local path is not, and is left out of the metadata).
        license: licence of the base model (e.g. ``"apache-2.0"``), carried over; default:
            ``report.get("license")``. Left out when unknown, never guessed.
        repo_id: the Hub repository the card is for (used in the loading examples and as the title).
        notes: extra Markdown placed under the description (e.g. where the base weights came from).
        storage_format: ``"dense"`` (safetensors with zeros, plain transformers loads it) or
            ``"compressed"`` (the compact format; the card says to load it with ``MAIHTModelForCausalLM``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if not report or not report.get("layers"):
        raise ValueError("the report has no layers: prune first (pruner.prune(...)), then pass pruner.report")
    if base_model is not None and not _is_hub_id(base_model):
        raise ValueError(f"base_model must be a Hub model id such as 'HuggingFaceTB/SmolLM2-135M', "
                         f"got {base_model!r}")
    if repo_id is not None:
        _check_repo_id(repo_id)
    if storage_format not in STORAGE_FORMATS:
        raise ValueError(f"storage_format must be one of {STORAGE_FORMATS}, got {storage_format!r}")
    base_model = base_model or (report.get("base_model") if _is_hub_id(report.get("base_model")) else None)
    license = license or report.get("license")
    config = report.get("config") or {}
    pattern_text, pattern_tag, pattern_kind, nm = _pattern(config)
    if repo_id:
        title = repo_id.split("/")[-1]
    elif base_model:
        percent = round(100 * float(config.get("sparsity") or 0.5))
        slug = f"{nm[0]}of{nm[1]}" if nm else f"unstructured{percent}"
        title = f"{base_model.split('/')[-1]}-maiht-{slug}"
    else:
        title = "mAIHT-pruned model"
    evaluation = report.get("evaluation")
    if evaluation and not all(isinstance(evaluation.get(k), (int, float))
                              for k in ("perplexity_before", "perplexity_after")):
        evaluation = None
    calibration = report.get("calibration") or {}
    card_data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pruned", "sparse", "mAIHT", "optimum", pattern_tag],
        datasets=[_WIKITEXT[0]] if "wikitext" in str(calibration.get("source", "")).lower() else None,
        model_name=title,
        eval_results=_eval_results(evaluation, pattern_text) if evaluation else None,
    )
    rows, overall = sparsity_rows(report["layers"])
    skipped = [{"name": layer["name"], "reason": layer["skipped"]} for layer in report["layers"]
               if layer.get("skipped") is not None]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=title,
        notes=notes,
        pattern_text=pattern_text,
        pattern_kind=pattern_kind,
        config_rows=[(key, _cell(value)) for key, value in config.items()],
        sparsity_rows=rows,
        overall=overall,
        skipped=skipped,
        calibration=calibration,
        device=report.get("device"),
        seconds=report.get("seconds"),
        evaluation=evaluation,
        versions=report.get("versions") or {},
        model_ref=repo_id or "path/to/this/model",
        storage_format=storage_format,
    )


def saved_format(folder: str | os.PathLike) -> str:
    """The storage format a saved folder declares in ``config.json`` (``"maiht": {"format": ...}``);
    ``"dense"`` when it says nothing."""
    try:
        annotation = json.loads((Path(folder) / "config.json").read_text()).get(CONFIG_ANNOTATION_KEY)
    except (OSError, json.JSONDecodeError):
        return "dense"
    found = annotation.get("format") if isinstance(annotation, dict) else None
    return found if found in STORAGE_FORMATS else "dense"


def write_model_card(folder: str | os.PathLike, report: dict[str, Any], **kwargs: Any) -> Path:
    """Render the card (``kwargs`` as in :func:`render_model_card`; ``storage_format`` defaults to what the
    folder's ``config.json`` declares) and write it as ``folder/README.md``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write the model card: {folder} is not a folder")
    kwargs.setdefault("storage_format", saved_format(folder))
    path = folder / CARD_NAME
    path.write_text(str(render_model_card(report, **kwargs)), encoding="utf-8")
    return path


def _check_repo_id(repo_id: Any) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = "use 'namespace/name', e.g. 'my-user/SmolLM2-135M-maiht-2of4'"
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string; {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repository id ({err}); {hint}") from None


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen and len(seen) < 8:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _failure_message(err: BaseException, stage: str, repo_id: str, endpoint: str, folder: Path) -> str:
    """A user-facing description of a failed push (the caller redacts the token from it)."""
    chain = _chain(err)
    status = next((getattr(getattr(e, "response", None), "status_code", None) for e in chain
                   if getattr(getattr(e, "response", None), "status_code", None) is not None), None)
    network = any(isinstance(e, (ConnectionError, TimeoutError))
                  or type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")
                  for e in chain)
    if status == 401:
        hint = ("the Hub rejected the credentials (HTTP 401): the token is invalid or expired; pass token=, "
                "set HF_TOKEN or run `hf auth login` with a token that has write access")
    elif status == 403:
        hint = (f"the token may not write to {repo_id!r} (HTTP 403): use a token with write access to the "
                f"namespace {repo_id.split('/')[0]!r}")
    elif status == 404:
        hint = "the repository or revision was not found (HTTP 404): check repo_id and revision"
    elif status is not None and status >= 500:
        hint = f"the server failed (HTTP {status}); nothing was committed by this call: retry later"
    elif status is not None:
        hint = f"the server refused the request (HTTP {status})"
    elif network:
        hint = f"could not reach {endpoint}: check the network, proxy settings or HF_ENDPOINT"
    else:
        hint = "unexpected error"
    causes = " <- ".join(f"{type(e).__name__}: {' '.join(str(e).split())}" for e in chain)
    return (f"pushing {folder} to {repo_id!r} at {endpoint} failed while {stage}: {hint}. Details: {causes}. "
            "The local folder was not changed.")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a saved pruned model folder to a Hub model repository and return the commit (or PR) URL.

    The repository is created if needed (``private`` applies then; asking for ``private=True`` on an
    existing public repository is refused rather than publishing). ``token`` / ``endpoint`` default to
    ``HF_TOKEN`` or the cached login, and ``HF_ENDPOINT``. ``revision`` names a branch (created from
    ``main`` if missing); ``create_pr=True`` opens a pull request instead of committing to the branch.
    Unchanged files are not uploaded again, so pushing the same folder twice is a no-op the second time.
    Any failure raises :class:`HubPushError`; the local folder is only read.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder}: no such folder; save the model first with "
                                "pruner.save_pretrained(folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"cannot push {folder}: it has no config.json, so it is not a saved model "
                                "folder; save the model with pruner.save_pretrained(folder)")
    _check_repo_id(repo_id)
    if not (folder / CARD_NAME).is_file():
        logger.warning("%s has no %s: the repository will have no model card (see write_model_card)",
                       folder, CARD_NAME)
    if constants.HF_HUB_OFFLINE:
        raise HubPushError("cannot push while offline mode is on: unset the HF_HUB_OFFLINE variable")
    secret = token if token is not None else get_token()
    if not secret:
        raise HubPushError("no Hugging Face token found: pass token=..., set the HF_TOKEN environment "
                           "variable or run `hf auth login` (the token needs write access)")
    api = HfApi(endpoint=endpoint, token=secret)
    logger.info("pushing %s to %s at %s", folder, repo_id, api.endpoint)
    stage = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if private:
            stage = "checking the repository's visibility"
            if not api.repo_info(repo_id, repo_type="model").private:
                raise HubPushError(
                    f"private=True was asked for but {repo_id!r} already exists and is public; nothing was "
                    "uploaded. Make it private in its settings (or HfApi.update_repo_settings) or choose "
                    "another repo_id"
                )
        branch = revision not in (None, constants.DEFAULT_REVISION) and not revision.startswith("refs/")
        if branch and not create_pr:
            stage = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        stage = "uploading the files"
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 create_pr=create_pr, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
    except HubPushError as err:
        raise HubPushError(_redact(str(err), secret)) from None
    except Exception as err:  # every failure becomes one clear, token-free message
        message = _failure_message(err, stage, repo_id, api.endpoint, folder)
        raise HubPushError(_redact(message, secret)) from None
    url = info.pr_url if create_pr and info.pr_url else info.commit_url
    logger.info("pushed %s to %s", folder, url)
    return str(url)
