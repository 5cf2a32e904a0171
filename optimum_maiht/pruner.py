"""`MAIHTPruner`: the facade users call. It loads a causal LM, runs the pruning pipeline on it (in memory,
or streamed block by block from its checkpoint), and hands the result to the serialization layer (saving)
and the Hub layer (publishing)."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .configuration import MAIHTConfig
from .data import CalibrationData
from .distributed import SINGLE, Parallel, current, local_device
from .evaluation import PerplexityWindows, default_sequence_length, perplexity_on
from .hub import push_to_hub
from .model_utils import check_model_source, load_tokenizer, resolve_device
from .pipeline import IN_MEMORY, BlockStore, prune_model
from .report import LayerReport, PruneReport
from .serialization import save_pruned
from .solvers import LayerSolver
from .streaming import StreamingStore
from .zeroshot import evaluate_tasks, task_options

logger = logging.getLogger(__name__)


class MAIHTPruner:
    """Prunes a causal LM one decoder block at a time, with mAIHT or another layer solver.

    >>> pruner = MAIHTPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", MAIHTConfig(pattern="2:4"))
    >>> model = pruner.prune(["some calibration text", ...])
    >>> pruner.save_pretrained("smollm2-maiht-2of4")

    A model larger than host memory is streamed block by block into the output folder:
    :meth:`prune_to_folder`, the same pipeline. ``solver``: an experiment's own layer solver
    (:mod:`optimum_maiht.solvers`) instead of ``config.solver``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MAIHTConfig | None = None,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool | None = None,
        solver: LayerSolver | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch / transformers model, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else MAIHTConfig()
        if not isinstance(self.config, MAIHTConfig):
            raise TypeError(f"config must be a MAIHTConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.device = local_device(resolve_device(device))  # under torchrun "cuda" is cuda:LOCAL_RANK
        self.offload_activations = offload_activations  # activations on the CPU beside a GPU (None: auto)
        self.solver = solver
        self.report: PruneReport | None = None  # the last prune()'s
        self._parallel: Parallel = SINGLE

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | nn.Module,
        config: MAIHTConfig | None = None,
        *,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool | None = None,
        solver: LayerSolver | None = None,
        **model_kwargs: Any,
    ) -> MAIHTPruner:
        """Load from a Hub id or a local folder (``model_kwargs`` go to ``AutoModelForCausalLM``), or wrap
        an already loaded model. The tokenizer is loaded from the same place when there is one. The whole
        model is held in memory; for a model larger than host memory see :meth:`prune_to_folder`."""
        if isinstance(model_or_path, nn.Module):
            source = getattr(getattr(model_or_path, "config", None), "name_or_path", None)
            if tokenizer is None and source and Path(source).is_dir():
                tokenizer = load_tokenizer(source)
            return cls(model_or_path, config, tokenizer, device, offload_activations, solver)
        folder = check_model_source(model_or_path)
        source = str(folder) if folder is not None else str(model_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
        return cls(model, config, tokenizer, device, offload_activations, solver)

    @classmethod
    def prune_to_folder(
        cls,
        model: str | os.PathLike,
        save_directory: str | os.PathLike,
        config: MAIHTConfig | None = None,
        calibration_dataset: CalibrationData | None = None,
        *,
        resume: bool = False,
        dtype: str | torch.dtype = "auto",
        base_model: str | None = None,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool | None = None,
        progress: bool = True,
        **save_options: Any,
    ) -> PruneReport:
        """Prune a model larger than host memory, streamed block by block from its safetensors checkpoint
        (a folder or a Hub id) into ``save_directory``; return the report (docs/design.md, "Streaming and
        resume"). :meth:`prune`'s pipeline; the folder is the one :meth:`save_pretrained` would write
        (``save_options``: ``save_format``, ``overwrite``, ``max_shard_size``, ``model_card``). The state
        after every block is kept in ``<save_directory>.maiht-partial``: ``resume=True`` continues a killed
        run, bit-identical, or says what differs. ``dtype``: as transformers' (``"auto"``: the
        checkpoint's); ``base_model``: the Hub id the report names for a local copy. No perplexity here:
        it runs the whole model on every window, which a streamed run never holds (evaluate the folder
        afterwards). Under ``torchrun`` every process calls it alike; rank 0 alone writes.
        """
        parallel = current(local_device(resolve_device(device)))
        with parallel.guard():
            overwrite = save_options.get("overwrite", False)
            opened = {"resume": resume, "overwrite": overwrite, "dtype": dtype, "base_model": base_model}
            store = StreamingStore.open(model, save_directory, parallel=parallel, **opened)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(store.checkpoint.folder)
            pruner = cls(store.model, config, tokenizer, device, offload_activations)
            pruner._parallel = parallel
            pruner._run(calibration_dataset, progress, store)
            parallel.on_main(lambda: pruner._save(save_directory, source=store, **save_options))
            parallel.on_main(store.close)
        return pruner.report

    @property
    def layer_reports(self) -> list[LayerReport]:
        """Per target layer results of the last :meth:`prune` (empty before it)."""
        return self.report.layers if self.report is not None else []

    def prune(
        self,
        calibration_dataset: CalibrationData | None = None,
        *,
        eval_dataset: CalibrationData | None = None,
        eval_sequence_length: int | None = None,
        eval_max_windows: int | None = None,
        eval_tasks: str | Sequence[str] | None = None,
        eval_task_options: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> nn.Module:
        """Prune the model in place and return it; the results are in :attr:`report`.

        ``calibration_dataset``: a list of strings, a ``datasets.Dataset`` (``text`` or ``input_ids``), a
        ``LongTensor[n, seq]``, a .txt / .jsonl / .parquet file or a bundled text's name (``None``: the
        bundled WikiText-2 validation excerpt). ``eval_dataset`` (same kinds): perplexity before and after
        on ``eval_max_windows`` windows (``None``: all) of ``eval_sequence_length`` tokens (``None``: the
        training length capped at 2048). ``eval_tasks``: lm-eval tasks scored before and after
        (:func:`optimum_maiht.zeroshot.evaluate_tasks` with ``eval_task_options``), checked before pruning.
        Under ``torchrun`` every process calls this alike and returns the same model and report
        (docs/design.md, "Several processes"); a failure on one rank is raised on all.
        """
        tasks = task_options(eval_tasks, eval_task_options, self.config.batch_size)
        self._parallel = parallel = current(self.device)
        with parallel.guard():
            scores = self._zero_shot(tasks) if tasks else None
            if eval_dataset is not None:
                length = eval_sequence_length or default_sequence_length(self.model)
                windows = PerplexityWindows(eval_dataset, length, eval_max_windows)
                before = self._perplexity(windows, progress)
            self._run(calibration_dataset, progress)
            if eval_dataset is not None:
                self.report.evaluation = windows.record(before, self._perplexity(windows, progress))
                logger.info("perplexity %.3f -> %.3f", before, self.report.evaluation["perplexity_after"])
            if tasks:
                self.report.zero_shot = {"before": scores, "after": self._zero_shot(tasks)}
        return self.model

    def _run(
        self, calibration_dataset: CalibrationData | None, progress: bool, store: BlockStore = IN_MEMORY
    ) -> None:
        """The pipeline on this rank's share of the calibration windows, into :attr:`report`."""
        self.report = prune_model(
            self.model,
            calibration_dataset,
            self.config,
            tokenizer=self.tokenizer,
            device=self.device,
            parallel=self._parallel,
            store=store,
            offload_activations=self.offload_activations,
            solver=self.solver,
            progress=progress,
        )

    def _perplexity(self, windows: PerplexityWindows, progress: bool) -> float:
        """Perplexity of the model as it is now, on the compute device (shared out over the ranks)."""
        options = {"batch_size": self.config.batch_size, "device": self.device, "parallel": self._parallel}
        progress = progress and self._parallel.is_main
        return perplexity_on(self.model, self.tokenizer, windows, progress=progress, **options)

    def _zero_shot(self, options: dict[str, Any]) -> Any:
        """lm-eval scores of the model as it is now; with several ranks, rank 0 scores and shares them."""
        score = lambda: evaluate_tasks(self.model, self.tokenizer, device=self.device, **options)  # noqa: E731
        return self._parallel.on_main(score, share=True)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: str | int = "5GB",
        save_format: str = "dense",
        model_card: dict[str, Any] | None = None,
    ) -> Path:
        """Write the pruned model, tokenizer, ``maiht_config.json``, ``maiht_report.json`` and the card
        (:func:`optimum_maiht.serialization.save_pruned`), atomically; a non-empty folder needs
        ``overwrite=True``. ``save_format``: ``"dense"`` (exact zeros, plain transformers loads it) or
        ``"compressed"`` (kept values plus packed masks). ``model_card``: keyword arguments of
        :func:`optimum_maiht.model_card.render_model_card`. Under ``torchrun`` only rank 0 writes.
        """
        if self.report is None:
            raise RuntimeError("nothing to save yet: call prune() first")
        if not self._parallel.is_main:
            return Path(save_directory).expanduser().resolve()
        options = {"overwrite": overwrite, "max_shard_size": max_shard_size, "model_card": model_card}
        return self._save(save_directory, save_format=save_format, **options)

    def _save(self, save_directory: str | os.PathLike, **options: Any) -> Path:
        return save_pruned(
            save_directory, self.model, self.config, self.report, tokenizer=self.tokenizer, **options
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        save_format: str = "dense",
        model_card: dict[str, Any] | None = None,
        **hub_options: Any,
    ) -> str | None:
        """Save into a temporary folder (the card naming ``repo_id``) and upload it with
        :func:`optimum_maiht.hub.push_to_hub` (``hub_options``: ``private``, ``token``, ``create_pr``,
        ``commit_message``, ``revision``, ``endpoint``); the commit or PR URL. The token is never written.
        Under ``torchrun`` only rank 0 uploads; the other ranks return ``None``."""
        if not self._parallel.is_main:
            return None
        with tempfile.TemporaryDirectory(prefix="maiht-push-") as tmp:
            card = {"repo_id": repo_id, **(model_card or {})}
            folder = self.save_pretrained(Path(tmp) / "model", save_format=save_format, model_card=card)
            return push_to_hub(folder, repo_id, **hub_options)
