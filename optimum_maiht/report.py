"""The pruning report: what happened to every weight matrix of the decoder blocks, as typed objects
(docs/design.md, "The report").

``MAIHTPruner.prune`` fills a :class:`PruneReport`; it is saved as ``maiht_report.json``
(``PruneReport.to_dict`` / ``from_dict`` round-trip) and rendered in the model card and the CLI summary.
Every matrix inside the decoder blocks appears exactly once: pruned (a :class:`LayerReport` with
``skipped=None``), a target that could not be pruned (``skipped`` says why), or not a target at all
(:class:`KeptDense`, with the reason).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from .constants import SOLVER_DISPLAY_NAMES, START_DISPLAY_NAMES

REPORT_VERSION = 4
"""Version 1 (optimum-maiht 0.1.0) had no ``report_version`` and no ``kept_dense``. Version 2's block
reconstruction errors were measured on every calibration window, with the held-out ones beside them as
``holdout_before`` / ``holdout_after``; version 3 kept only the held-out ones, as ``error_before`` /
``error_after``. Version 4 names what each error is (a layer's ``error_wanda`` / ``error``, a block's
``error_solved`` / ``error_refit``, where versions 1-3 said ``error_before`` / ``error_after`` for both)
and the layer solver (``solver``, where ``method`` was always mAIHT). All are read."""

_OLD_LAYER_NAMES = {"error_before": "error_wanda", "error_after": "error"}
_OLD_BLOCK_NAMES = {"error_before": "error_solved", "error_after": "error_refit"}


def _renamed(data: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """``data`` with the field names of reports before version 4 changed to today's."""
    return {names.get(key, key): value for key, value in data.items()}


_BLOCK_PREFIX = re.compile(r"^.*?\.\d+\.")  # "model.layers.3." in "model.layers.3.mlp.up_proj"
_INNER_INDEX = re.compile(r"\.\d+\.")  # per-expert modules: "mlp.experts.7.up_proj"
_EXPERT_INDEX = re.compile(r"\[\d+\]$")  # fused expert slices: "mlp.experts.gate_up_proj[7]"


def layer_type(name: str) -> str:
    """The name of a layer without its block and expert indices: ``"model.layers.3.mlp.experts.7.up_proj"``
    -> ``"mlp.experts.*.up_proj"``, ``"model.layers.0.mlp.experts.down_proj[5]"`` -> ``"...down_proj[*]"``."""
    kind = _INNER_INDEX.sub(".*.", _BLOCK_PREFIX.sub("", name, count=1))
    return _EXPERT_INDEX.sub("[*]", kind)


@dataclass
class LayerReport:
    """What happened to one target weight matrix (a linear layer, or one expert's slice of a fused one)."""

    name: str
    shape: list[int]
    """(out, in) of the linear map."""
    sparsity: float
    error_wanda: float
    """Relative output error ``tr(E H E^T) / tr(W0 H W0^T)`` of Wanda's mask without any weight update:
    a yardstick every solver is compared with."""
    error: float
    """Relative output error of the solved weight."""
    iterations: int
    seconds: float
    history: list[float] = field(default_factory=list)
    skipped: str | None = None
    """Why this target was kept dense (``None``: it was pruned)."""
    tokens: int | None = None
    """Calibration tokens whose inputs built this layer's Gram matrix (for an expert: those routed to it)."""
    statistics: str | None = None
    """For an expert: ``"routed"`` (its own tokens), ``"all tokens"`` (too few were routed to it) or
    ``"none (magnitude)"`` (no token reached it and its routing could not be forced)."""
    transposed: bool = False
    """The weight is stored (in, out) (GPT-OSS experts); ``shape`` is still (out, in)."""

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("tokens", "statistics", "transposed"):  # omitted when unset
            if data[key] in (None, False):
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        data = _renamed(data, _OLD_LAYER_NAMES)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class BlockReconstruction:
    """Block reconstruction of one decoder block (docs/design.md, "Block reconstruction"): the error of the
    pruned block's output against the dense block's as the next norm ``R`` reads them, the mean over tokens
    of ``||R(Y)_t - R(Y_dense)_t||^2 / ||R(Y_dense)_t||^2`` on the held-out calibration batches (no step of
    the refit has seen them; they choose the epoch kept), before and after the refit of its kept weights."""

    block: int
    error_solved: float
    """With the weights of the layer solves."""
    error_refit: float
    """With the weights kept (the solves' when no epoch lowered it)."""
    epochs: int
    """Epochs whose weights were kept (0: the refit never lowered the held-out error)."""
    epochs_run: int
    seconds: float
    skipped: str | None = None
    """Why this block was not refitted (``None``: it was)."""
    solved_again: bool = False
    """The refit did not help and the block was solved again on the pruned model's inputs, exactly as with
    the refit off (its first solves used the dense model's inputs): ``error_refit`` is then that solve's."""
    precision: str = "float32"
    """The dtype of the refit's forward and backward passes (``compute_dtype`` resolved)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["skipped"] is None:
            del data["skipped"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockReconstruction:
        if "holdout_before" in data:  # report version 2: the held-out errors under other names
            data = {**data, "error_before": data["holdout_before"], "error_after": data["holdout_after"]}
        data = _renamed(data, _OLD_BLOCK_NAMES)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class KeptDense:
    """A weight matrix inside the decoder blocks that was not a target, and why (router, ignored...)."""

    name: str
    shape: list[int]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TypeSparsity:
    """Sparsity of one layer type (see :func:`layer_type`) over the pruned layers of that type."""

    type: str
    layers: int
    sparsity: float
    error_wanda: float
    error: float


_SCORE_INFO = (
    "num_fewshot",
    "samples",
    "dataset",
    "dataset_config",
    "split",
    "higher_is_better",
    "subtask_of",
)
"""Keys of a task's entry in :meth:`ZeroShotResults.to_dict` that are not metrics."""


@dataclass
class TaskScore:
    """One metric of one lm-evaluation-harness task (docs/design.md, "Evaluation")."""

    task: str
    metric: str
    """As lm-eval names it (``acc``, ``acc_norm``, ...); ``metric,filter`` when its filter is not ``none``."""
    value: float
    stderr: float | None = None
    num_fewshot: int | None = None
    samples: int | None = None
    """Documents scored (after ``limit``)."""
    dataset: str | None = None
    """The task's ``dataset_path`` (a Hub dataset id, or ``json`` / ``csv``... for local files)."""
    dataset_config: str | None = None
    split: str | None = None
    """The split scored: the task's test split, else its validation split."""
    higher_is_better: bool | None = None
    subtask_of: str | None = None
    """The lm-eval group this task's result is part of (``None``: a task asked for, or a group itself)."""

    @property
    def stderr_key(self) -> str:
        """lm-eval's name of the standard error: ``acc_stderr``, ``exact_match_stderr,strict-match``."""
        metric, comma, kind = self.metric.partition(",")
        return f"{metric}_stderr{comma}{kind}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScore:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class ZeroShotResults:
    """One lm-evaluation-harness run: every metric of every task, and how it was run."""

    scores: list[TaskScore]
    tasks: list[str]
    """The task names (or YAML files) asked for."""
    lm_eval_version: str
    num_fewshot: int | None = None
    """Few-shot examples asked for (``None``: each task's own default, 0 for the standard tasks)."""
    limit: int | float | None = None
    """Documents per task (a fraction when < 1); ``None``: every document."""
    seconds: float | None = None
    mean_metric: str = "acc"
    """The metric averaged over the tasks by :meth:`mean`."""

    def mean(self, metric: str | None = None) -> float | None:
        """Unweighted mean of ``metric`` (default :attr:`mean_metric`) over the tasks that report it, groups'
        subtasks left out (a group counts once, by its own aggregate); ``None`` when no task reports it."""
        metric = metric or self.mean_metric
        values = [s.value for s in self.scores if s.metric == metric and s.subtask_of is None]
        return sum(values) / len(values) if values else None

    def mean_tasks(self, metric: str | None = None) -> list[str]:
        """The tasks :meth:`mean` averages over."""
        metric = metric or self.mean_metric
        return [s.task for s in self.scores if s.metric == metric and s.subtask_of is None]

    def score(self, task: str, metric: str) -> TaskScore | None:
        return next((s for s in self.scores if s.task == task and s.metric == metric), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``results`` holds, per task, its metrics as lm-eval names them (``acc``, ``acc_stderr``,
        ``acc_norm``...) beside ``num_fewshot``, ``samples``, ``dataset``, ``split``..."""
        results: dict[str, dict[str, Any]] = {}
        for s in self.scores:  # metrics first, then what describes the task
            results.setdefault(s.task, {}).update({s.metric: s.value, s.stderr_key: s.stderr})
        for s in self.scores:
            entry = results[s.task]
            entry.update({key: getattr(s, key) for key in _SCORE_INFO if key != "higher_is_better"})
            entry.setdefault("higher_is_better", {})[s.metric] = s.higher_is_better
        return {
            "lm_eval_version": self.lm_eval_version,
            "tasks": list(self.tasks),
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "seconds": self.seconds,
            "mean": {"metric": self.mean_metric, "value": self.mean(), "tasks": self.mean_tasks()},
            "results": results,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotResults:
        scores = []
        for task, entry in (data.get("results") or {}).items():
            info = {key: entry.get(key) for key in _SCORE_INFO if key != "higher_is_better"}
            better = entry.get("higher_is_better") or {}
            for key, value in entry.items():
                if key in _SCORE_INFO or "_stderr" in key:
                    continue
                score = TaskScore(task=task, metric=key, value=value, **info)
                score.stderr = entry.get(score.stderr_key)
                score.higher_is_better = better.get(key)
                scores.append(score)
        return cls(
            scores=scores,
            tasks=list(data.get("tasks") or []),
            lm_eval_version=str(data.get("lm_eval_version") or "unknown"),
            num_fewshot=data.get("num_fewshot"),
            limit=data.get("limit"),
            seconds=data.get("seconds"),
            mean_metric=(data.get("mean") or {}).get("metric") or "acc",
        )


@dataclass
class PruneReport:
    """Summary and per-layer results of one pruning run."""

    config: dict[str, Any]
    layers: list[LayerReport]
    kept_dense: list[KeptDense] = field(default_factory=list)
    base_model: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    """``source``, ``num_samples``, ``sequence_length``, ``tokens``, ``seed``."""
    device: str | None = None
    seconds: float | None = None
    evaluation: dict[str, Any] | None = None
    """``dataset``, ``split``, ``sequence_length``, ``windows``, ``perplexity_before`` / ``_after``."""
    versions: dict[str, str] = field(default_factory=dict)
    solver: str = "maiht"
    """The layer solver (``MAIHTConfig.solver``, or an experiment's own function's name)."""
    block_seconds: list[float] = field(default_factory=list)
    """Wall time of each decoder block (calibration passes, solves, propagation)."""
    block_dtypes: list[str | None] = field(default_factory=list)
    """The dtype of the matrix products of each decoder block's passes (``compute_dtype`` resolved, or the
    block's own half-precision dtype); ``None`` for a block finished by a run that did not record it."""
    world_size: int = 1
    """Processes that pruned together (``torchrun``; docs/design.md, "Several processes")."""
    zero_shot: dict[str, ZeroShotResults] | None = None
    """lm-evaluation-harness results ``{"before": ..., "after": ...}`` (``prune(eval_tasks=...)``)."""
    reconstruction: list[BlockReconstruction] | None = None
    """Per decoder block, when block reconstruction was on (``reconstruction_epochs > 0``)."""

    @property
    def method(self) -> str:
        """The layer solver as the card and the summary name it, mAIHT with its start: "mAIHT from
        SparseGPT's solution". Reports from before ``MAIHTConfig.start`` existed started from Wanda's mask."""
        name = SOLVER_DISPLAY_NAMES.get(self.solver, self.solver)
        if self.solver != "maiht":
            return name
        start = self.config.get("start", "wanda")
        return f"{name} from {START_DISPLAY_NAMES.get(start, start)}"

    def reconstruction_mean(self) -> dict[str, float] | None:
        """Mean over the refitted blocks of the output errors before and after, and their count."""
        done = [b for b in self.reconstruction or [] if b.skipped is None]
        if not done:
            return None
        return {
            "blocks": len(done),
            "error_solved": sum(b.error_solved for b in done) / len(done),
            "error_refit": sum(b.error_refit for b in done) / len(done),
        }

    @property
    def pruned(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.skipped is not None]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers (weighted by size)."""
        size = sum(layer.size for layer in self.pruned)
        return sum(layer.sparsity * layer.size for layer in self.pruned) / size if size else 0.0

    def sparsity_by_type(self) -> list[TypeSparsity]:
        """One row per layer type (block and expert indices removed), in first-seen order."""
        groups: dict[str, list[LayerReport]] = defaultdict(list)
        for layer in self.pruned:
            groups[layer_type(layer.name)].append(layer)
        rows = []
        for kind, members in groups.items():
            size = sum(layer.size for layer in members)
            rows.append(
                TypeSparsity(
                    type=kind,
                    layers=len(members),
                    sparsity=sum(layer.sparsity * layer.size for layer in members) / size,
                    error_wanda=sum(layer.error_wanda for layer in members) / len(members),
                    error=sum(layer.error for layer in members) / len(members),
                )
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``maiht_report.json``)."""
        data: dict[str, Any] = {
            "report_version": REPORT_VERSION,
            "solver": self.solver,
            "base_model": self.base_model,
            "config": self.config,
            "calibration": self.calibration,
            "device": self.device,
            "seconds": self.seconds,
            "block_seconds": self.block_seconds,
            "block_dtypes": self.block_dtypes,
            "world_size": self.world_size,
        }
        if self.evaluation is not None:
            data["evaluation"] = self.evaluation
        if self.zero_shot is not None:
            data["zero_shot"] = {when: results.to_dict() for when, results in self.zero_shot.items()}
        if self.reconstruction is not None:
            data["reconstruction"] = [block.to_dict() for block in self.reconstruction]
        data.update(
            {
                "sparsity": self.sparsity,
                "layers_pruned": len(self.pruned),
                "layers_skipped": len(self.skipped),
                "versions": self.versions,
                "layers": [layer.to_dict() for layer in self.layers],
                "kept_dense": [weight.to_dict() for weight in self.kept_dense],
            }
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneReport:
        """Read a saved report (versions 1 to 4); the derived fields (sparsity, counts) are recomputed."""
        version = data.get("report_version", 1)
        if not isinstance(version, int) or version > REPORT_VERSION:
            raise ValueError(
                f"report_version={version!r} is newer than this optimum-maiht reads ({REPORT_VERSION}): "
                "pip install -U optimum-maiht"
            )
        if not isinstance(data.get("layers"), list) or not isinstance(data.get("config"), dict):
            raise ValueError("not a mAIHT report: 'layers' (a list) and 'config' (an object) are required")
        return cls(
            config=data["config"],
            layers=[LayerReport.from_dict(layer) for layer in data["layers"]],
            kept_dense=[KeptDense(**weight) for weight in data.get("kept_dense", [])],
            base_model=data.get("base_model"),
            calibration=data.get("calibration") or {},
            device=data.get("device"),
            seconds=data.get("seconds"),
            evaluation=data.get("evaluation"),
            versions=data.get("versions") or {},
            solver=data.get("solver", "maiht"),  # before version 4: "method": "mAIHT"
            block_seconds=data.get("block_seconds") or [],
            block_dtypes=data.get("block_dtypes") or [],
            world_size=data.get("world_size", 1),
            zero_shot=_zero_shot(data.get("zero_shot")),
            reconstruction=_reconstruction(data.get("reconstruction")),
        )


def _zero_shot(data: Any) -> dict[str, ZeroShotResults] | None:
    if not isinstance(data, dict):
        return None
    return {when: ZeroShotResults.from_dict(results) for when, results in data.items()}


def _reconstruction(data: Any) -> list[BlockReconstruction] | None:
    if not isinstance(data, list):
        return None
    return [BlockReconstruction.from_dict(block) for block in data]


def library_versions() -> dict[str, str]:
    """The versions that produced a run (recorded in the report for reproducibility)."""
    import platform

    import torch
    import transformers

    return {
        "optimum_maiht": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
