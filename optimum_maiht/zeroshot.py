"""Zero-shot (and few-shot) accuracy with lm-evaluation-harness on a model in memory (docs/design.md,
"Evaluation").

:func:`evaluate_tasks` wraps ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)`` and
``lm_eval.simple_evaluate``: the very model object is scored, never a copy reloaded from disk, so a pruned
model is measured as it is. lm-eval is an optional extra (``pip install "optimum-maiht[eval]"``), imported
only when called. The results come back typed (:class:`~optimum_maiht.report.ZeroShotResults`), with the
metrics named as lm-eval names them.

Errors say what to do: a missing extra names the install command; an unknown task lists close matches; a
task whose data cannot be downloaded (offline) says so and points to ``include_path`` with local data.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .report import TaskScore, ZeroShotResults

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "optimum-maiht[eval]"'
STANDARD_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
"""The zero-shot tasks of the pruning papers (SparseGPT, Wanda, mAIHT), as lm-eval names them."""
WIKITEXT_NOTE = (
    "lm-eval's 'wikitext' task reports word- and byte-level rolling perplexity over whole documents, a "
    "different number from the token-level perplexity over fixed windows that optimum-maiht measures "
    "(optimum_maiht.evaluation.perplexity, `maiht eval`); do not compare or mix the two"
)


class LMEvalMissingError(ImportError):
    """lm-evaluation-harness is not installed (the ``eval`` extra)."""


class UnknownTaskError(ValueError):
    """A task name that lm-eval does not know (the message lists close matches)."""


class TaskDataUnavailableError(ConnectionError):
    """A task's dataset could not be downloaded (offline, or the Hub unreachable)."""


def lm_eval_module() -> Any:
    """``lm_eval``, or one line saying what to install."""
    try:
        import lm_eval
    except ImportError as err:
        raise LMEvalMissingError(
            f"zero-shot evaluation needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from err
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return str(getattr(lm_eval_module(), "__version__", "unknown"))


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"boolq, rte"`` or ``["boolq", "rte"]`` -> ``["boolq", "rte"]`` (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    if not all(isinstance(t, str) for t in items):
        raise TypeError(f"tasks must be task names (strings), got {tasks!r}")
    names = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise ValueError("no task given: name at least one lm-eval task, e.g. tasks=['arc_easy']")
    return names


def check_options(num_fewshot: Any = None, limit: Any = None, batch_size: Any = 4) -> None:
    """The ranges of :func:`evaluate_tasks`' options, checked before any work."""
    if num_fewshot is not None and (
        isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0
    ):
        raise ValueError(
            f"num_fewshot must be None (each task's default) or an integer >= 0, got {num_fewshot!r}"
        )
    if limit is not None:
        ok = not isinstance(limit, bool) and (
            (isinstance(limit, int) and limit >= 1) or (isinstance(limit, float) and 0 < limit < 1)
        )
        if not ok:
            raise ValueError(
                f"limit must be None (every document), an integer >= 1 (documents per task) or a fraction "
                f"in (0, 1), got {limit!r}"
            )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


_MANAGERS: dict[tuple, Any] = {}


def task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Any:
    """lm-eval's ``TaskManager`` over its own tasks plus the YAML task files under ``include_path``.

    Indexing lm-eval's ~15,000 task files takes seconds, so a manager is reused while the YAML files under
    ``include_path`` stay the same (names and modification times); the tasks themselves are read afresh
    at every load."""
    paths = _include_paths(include_path)
    lm_eval_module()
    from lm_eval.tasks import TaskManager

    key = (lm_eval_version(), *((str(p.resolve()), _yaml_files(p)) for p in paths))
    if key not in _MANAGERS:
        _MANAGERS.clear()
        _MANAGERS[key] = TaskManager(include_path=[str(p) for p in paths] or None)
    return _MANAGERS[key]


def _yaml_files(path: Path) -> tuple[tuple[str, int], ...]:
    files = [path] if path.is_file() else sorted(path.rglob("*.yaml"))
    return tuple((str(f), f.stat().st_mtime_ns) for f in files)


def _include_paths(include_path: Any) -> list[Path]:
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths = [Path(p).expanduser() for p in items]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"include_path {str(path)!r} does not exist: give a folder of task YAMLs")
    return paths


def check_tasks(names: Sequence[str], manager: Any) -> None:
    """Every name is an lm-eval task, group or tag (or a task YAML file); else the close matches."""
    known = manager.all_tasks
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        raise UnknownTaskError(_unknown_task_message(name, known, manager.include_path))


def close_matches(name: str, known: Sequence[str], n: int = 5) -> list[str]:
    """Known names closest to ``name`` (case-insensitive), best first."""
    lowered: dict[str, str] = {}
    for task in known:
        lowered.setdefault(task.lower(), task)
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[m] for m in matches]


def _unknown_task_message(name: str, known: Sequence[str], include_path: Any) -> str:
    matches = close_matches(name, known)
    hint = f"close matches: {', '.join(matches)}" if matches else "no close match"
    where = f" (with include_path {include_path})" if include_path else ""
    return (
        f"unknown lm-eval task {name!r}: {hint}. lm-eval {lm_eval_version()} knows {len(known)} tasks, "
        f"groups and tags{where}; list them with `lm-eval ls tasks`, or give a task YAML of your own with "
        "include_path (--include-path DIR)"
    )


def _download_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the data could not be fetched" (offline, Hub unreachable)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.ConnectionError)
    return tuple(errors)


def load_tasks(names: Sequence[str], manager: Any) -> list[Any]:
    """lm-eval's task objects (tasks, groups, a tag's tasks), one name at a time, so that a failure to get
    a task's data names that task. Loading a task reads (downloads) its dataset."""
    loaded: list[Any] = []
    offline = _download_errors()
    for name in names:
        try:
            result = manager.load([name])
        except offline as err:
            raise TaskDataUnavailableError(_offline_message(name, manager, err)) from err
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"task {name!r}: {' '.join(str(err).split())} (relative data_files in a task YAML are read "
                "from the working directory, as lm-eval does, not from the YAML's folder)"
            ) from err
        loaded += _top_level(result)
    return loaded


def _top_level(result: dict[str, Any]) -> list[Any]:
    """The objects of a ``TaskManager.load`` result that are no group's children."""
    groups = result.get("groups") or {}
    children = {c for members in (result.get("group_map") or {}).values() for c in members}
    tops = [group for name, group in groups.items() if name not in children]
    return tops + [task for name, task in result["tasks"].items() if name not in children]


def _offline_message(name: str, manager: Any, err: BaseException) -> str:
    entry = getattr(manager, "task_index", {}).get(name)
    dataset = ((getattr(entry, "cfg", None) or {}).get("dataset_path")) if entry is not None else None
    source = f" (dataset {dataset})" if dataset else ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on")
    mode = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if offline else "offline?"
    return (
        f"the data of task {name!r}{source} could not be downloaded from the Hugging Face Hub ({mode}: "
        f"{' '.join(str(err).split())}); run once with network access to fill the datasets cache, or "
        "evaluate a task of your own on local data: a task YAML with dataset_path: json and data_files, "
        "given with include_path (--include-path DIR)"
    )


def _scores(output: dict[str, Any]) -> list[TaskScore]:
    """lm-eval's ``results`` as typed scores (one per task and metric); stderr ``"N/A"`` becomes ``None``."""
    parent = {c: g for g, members in (output.get("group_subtasks") or {}).items() for c in members}
    configs = output.get("configs") or {}
    scores = []
    for task, metrics in (output.get("results") or {}).items():
        config = configs.get(task) or {}
        samples = (output.get("n-samples") or {}).get(task) or {}
        better = (output.get("higher_is_better") or {}).get(task) or {}
        shots = (output.get("n-shot") or {}).get(task)
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if "_stderr" in metric or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if metric in ("sample_len", "sample_count"):
                continue
            name = metric if kind in ("", "none") else key
            stderr = metrics.get(f"{metric}_stderr,{kind}" if kind else f"{metric}_stderr")
            scores.append(
                TaskScore(
                    task=task,
                    metric=name,
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                    num_fewshot=int(shots) if isinstance(shots, int) else None,
                    samples=samples.get("effective"),
                    dataset=_text(config.get("dataset_path")),
                    dataset_config=_text(config.get("dataset_name")),
                    split=_text(config.get("test_split") or config.get("validation_split")),
                    higher_is_better=better.get(metric),
                    subtask_of=parent.get(task),
                )
            )
    return scores


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """``simple_evaluate`` seeds ``random``, numpy and torch: give the caller its generators back."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning for every in-memory model (expected here): shown only at INFO level."""
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    if not logger.isEnabledFor(logging.INFO):
        lm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(level)


PRUNE_TASK_OPTIONS = ("num_fewshot", "limit", "include_path", "batch_size")
"""The keyword arguments of :func:`evaluate_tasks` that ``MAIHTPruner.prune(eval_task_options=...)`` takes."""


def task_options(
    tasks: str | Sequence[str] | None, options: dict[str, Any] | None, batch_size: int
) -> dict[str, Any] | None:
    """:func:`evaluate_tasks`' keyword arguments for ``prune(eval_tasks=..., eval_task_options=...)``,
    checked before any work (a missing extra fails now, not after pruning); ``None`` without tasks."""
    if tasks is None:
        if options:
            raise ValueError("eval_task_options was given without eval_tasks")
        return None
    unknown = sorted(set(options or {}) - set(PRUNE_TASK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown eval_task_options {unknown}; allowed: {list(PRUNE_TASK_OPTIONS)}")
    kwargs = {"batch_size": batch_size, **(options or {}), "tasks": parse_tasks(tasks)}
    check_options(kwargs.get("num_fewshot"), kwargs.get("limit"), kwargs["batch_size"])
    lm_eval_module()
    return kwargs


def _simple_evaluate(
    lm_eval: Any,
    model: nn.Module,
    tokenizer: Any,
    names: list[str],
    manager: Any,
    num_fewshot: int | None,
    limit: int | float | None,
    batch_size: int,
    device: str | torch.device | None,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the very model object, moved to ``device`` and back, in eval mode,
    the random states and lm-eval's logging as they were."""
    from lm_eval.models.huggingface import HFLM

    home = next(model.parameters()).device
    move = device is not None and torch.device(device) != home  # a dispatched model stays where it is
    was_training = model.training
    if move:
        model.to(device)
    model.eval()
    try:
        with _quiet_lm_eval(), _kept_random_state():
            loaded = load_tasks(names, manager)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            return (
                lm_eval.simple_evaluate(
                    model=lm,
                    tasks=loaded,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    log_samples=False,
                )
                or {}
            )
    finally:
        if move:
            model.to(home)
        model.train(was_training)


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
) -> ZeroShotResults:
    """Score ``model`` (in memory) on lm-evaluation-harness tasks.

    Args:
        model: a transformers causal LM, dense or pruned; evaluated as it is (not copied or reloaded).
        tokenizer: its tokenizer.
        tasks: lm-eval task, group or tag names (``"boolq,rte"`` or a list), e.g. :data:`STANDARD_TASKS`,
            or paths of task YAML files.
        num_fewshot: few-shot examples per prompt; ``None``: each task's default (0 for the standard seven).
        limit: documents per task (an integer), or a fraction of them (< 1); ``None``: all. A limit makes
            the numbers quicker and noisier: it is recorded with them.
        include_path: folder(s) of your own task YAMLs (e.g. ``dataset_path: json`` with local
            ``data_files``; relative paths are read from the working directory, as lm-eval does).
        batch_size: requests per forward pass.
        device: where to run (the model is moved there and back); ``None``: where the model is.

    Returns:
        :class:`~optimum_maiht.report.ZeroShotResults`: per task, every metric lm-eval reports (``acc``,
        ``acc_norm``...) with its standard error, the few-shot count, documents scored, the lm-eval version.

    Raises:
        LMEvalMissingError (ImportError): lm-eval is not installed (``pip install "optimum-maiht[eval]"``).
        UnknownTaskError (ValueError): a task lm-eval does not know; the message lists close matches.
        TaskDataUnavailableError (ConnectionError): a task's data could not be downloaded (offline).
    """
    names = parse_tasks(tasks)
    check_options(num_fewshot, limit, batch_size)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch / transformers model, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("zero-shot evaluation needs the model's tokenizer (tokenizer=None was given)")
    lm_eval = lm_eval_module()
    if any("wikitext" in name.lower() for name in names):
        logger.warning(WIKITEXT_NOTE)
    start = time.perf_counter()
    manager = task_manager(include_path)
    check_tasks(names, manager)
    output = _simple_evaluate(
        lm_eval, model, tokenizer, names, manager, num_fewshot, limit, batch_size, device
    )
    results = ZeroShotResults(
        scores=_scores(output),
        tasks=names,
        lm_eval_version=lm_eval_version(),
        num_fewshot=num_fewshot,
        limit=limit,
        seconds=round(time.perf_counter() - start, 2),
    )
    logger.info("zero-shot: %s", ", ".join(f"{s.task} {s.metric} {s.value:.4f}" for s in results.scores))
    return results
