"""`MAIHTPruner`: the facade users call. It loads a causal LM, prunes it with the sequential pipeline,
and hands the result to the serialization layer (saving) and the Hub layer (publishing)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration import MAIHTConfig
from .constants import DEFAULT_CALIBRATION_TEXT
from .data import CalibrationData, describe_data, prepare_calibration, split_of
from .distributed import Parallel, current, is_main_process, local_device
from .model_utils import check_model_source, resolve_device
from .report import LayerReport, PruneReport, library_versions
from .sequential import IN_MEMORY, BlockStore, prune_sequential

logger = logging.getLogger(__name__)


class MAIHTPruner:
    """Prunes a causal LM with mAIHT, one decoder block at a time.

    >>> pruner = MAIHTPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", MAIHTConfig(pattern="2:4"))
    >>> model = pruner.prune(["some calibration text", ...])
    >>> pruner.save_pretrained("smollm2-maiht-2of4")

    A model larger than host memory is streamed from its checkpoint, block by block, straight into the
    output folder (and a killed run resumed): :meth:`prune_to_folder`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MAIHTConfig | None = None,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch / transformers model, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else MAIHTConfig()
        if not isinstance(self.config, MAIHTConfig):
            raise TypeError(f"config must be a MAIHTConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.device = local_device(resolve_device(device))
        """The compute device; under ``torchrun`` a bare ``"cuda"`` means ``cuda:LOCAL_RANK``."""
        self.offload_activations = offload_activations
        """Keep the calibration activations on the CPU while the blocks run on the GPU: ``True``, ``False``,
        or ``None`` (when they would take more than half of the GPU's free memory); no-op on a CPU."""
        self.report: PruneReport | None = None
        """The report of the last :meth:`prune` (``None`` before it)."""

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | nn.Module,
        config: MAIHTConfig | None = None,
        *,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        offload_activations: bool | None = None,
        **model_kwargs: Any,
    ) -> MAIHTPruner:
        """Load from a Hub id or a local folder (``model_kwargs`` go to ``AutoModelForCausalLM``), or wrap
        an already loaded model. The tokenizer is loaded from the same place when there is one. The whole
        model is held in memory; for a model larger than host memory see :meth:`prune_to_folder`."""
        if isinstance(model_or_path, nn.Module):
            source = getattr(getattr(model_or_path, "config", None), "name_or_path", None)
            if tokenizer is None and source and Path(source).is_dir():
                tokenizer = _try_tokenizer(source)
            return cls(model_or_path, config, tokenizer, device, offload_activations)
        from transformers import AutoModelForCausalLM

        folder = check_model_source(model_or_path)
        source = str(folder) if folder is not None else str(model_or_path)
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
        tokenizer = tokenizer if tokenizer is not None else _try_tokenizer(source)
        return cls(model, config, tokenizer, device, offload_activations)

    @classmethod
    def prune_to_folder(
        cls,
        model: str | os.PathLike,
        save_directory: str | os.PathLike,
        config: MAIHTConfig | None = None,
        calibration_dataset: CalibrationData | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        save_format: str = "dense",
        max_shard_size: str | int = "5GB",
        model_card: dict[str, Any] | None = None,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        offload_activations: bool | None = None,
        base_model: str | None = None,
        progress: bool = True,
    ) -> PruneReport:
        """Prune a model larger than host memory, streaming it block by block from its safetensors
        checkpoint (a local folder or a Hub id) into ``save_directory``; return the report.

        Only the weights outside the decoder blocks, a block or two and the calibration activations are
        held in memory (docs/design.md, "Streaming and resume"). The folder written is the one
        :meth:`prune` then :meth:`save_pretrained` would write (same tensors, shards, card), atomically.
        After every block the state is kept in ``<save_directory>.maiht-partial``; ``resume=True``
        continues a killed run from there (refused, saying what differs, when the model, dtype, data,
        configuration or library versions changed) and ends bit-identical to an uninterrupted run. An
        existing partial folder without ``resume=True`` is an error. ``dtype``: as transformers'
        (``"auto"``: the checkpoint's). ``base_model``: the Hub id to name in the report and card when
        ``model`` is a local copy. Other arguments as in :meth:`prune` and :meth:`save_pretrained`.
        Not for fused mixture-of-experts models: load those in memory.

        Under ``torchrun`` every process calls this with the same arguments: each streams the blocks
        from the checkpoint and calibrates its share of the windows as :meth:`prune` does, rank 0 alone
        keeps the partial folder and writes ``save_directory``; every rank returns the report.
        """
        from .serialization import save_pruned
        from .streaming import StreamingStore

        parallel = current(local_device(resolve_device(device)))
        with parallel.guard():
            store = StreamingStore.open(
                model, save_directory, resume=resume, overwrite=overwrite, dtype=dtype, parallel=parallel
            )
            if base_model is not None:
                store.model.config.name_or_path = base_model
            if tokenizer is None:
                tokenizer = _try_tokenizer(str(store.checkpoint.folder))
            pruner = cls(store.model, config, tokenizer, device, offload_activations)
            if calibration_dataset is None:
                logger.info("no calibration data given: using the bundled WikiText-2 validation excerpt")
                calibration_dataset = DEFAULT_CALIBRATION_TEXT
            pruner._prune(parallel, calibration_dataset, None, None, None, progress, store)

            def write() -> None:
                save_pruned(
                    save_directory,
                    store.model,
                    pruner.config,
                    pruner.report,
                    tokenizer=tokenizer,
                    save_format=save_format,
                    overwrite=overwrite,
                    max_shard_size=max_shard_size,
                    model_card=model_card,
                    write_weights=store.write_weights,
                )
                store.close()

            parallel.on_main(write)
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
        ``LongTensor[n, seq]`` (used as given), a path to a .txt / .jsonl / .parquet file, or the name of a
        bundled text; ``None`` uses the bundled WikiText-2 validation excerpt.
        ``eval_dataset`` (same kinds, e.g. ``"wikitext2-test"``): measure perplexity before and after over
        ``eval_max_windows`` windows (``None``: the whole text) of ``eval_sequence_length`` tokens (``None``:
        the model's training length capped at 2048, as the papers do), into the report.
        ``eval_tasks`` (e.g. ``optimum_maiht.zeroshot.STANDARD_TASKS``): lm-evaluation-harness tasks scored
        before and after (:func:`optimum_maiht.zeroshot.evaluate_tasks`, needs the ``eval`` extra), into
        ``report.zero_shot``; ``eval_task_options``: its ``num_fewshot``, ``limit``, ``include_path``,
        ``batch_size`` (default: the config's). A bad task fails before any pruning.

        Under ``torchrun`` with several processes (docs/design.md, "Several processes"), every process calls
        this with the same arguments: rank 0 reads the data and shares the windows, each rank calibrates
        and evaluates its share of them, the statistics are summed and the solves spread over the ranks;
        every rank returns the same pruned model and report. A failure on one rank is raised on all.
        """
        tasks = self._task_options(eval_tasks, eval_task_options)
        parallel = current(self.device)
        with parallel.guard():
            before = self._zero_shot(tasks, parallel) if tasks else None
            model = self._prune(
                parallel, calibration_dataset, eval_dataset, eval_sequence_length, eval_max_windows, progress
            )
            if tasks:
                self.report.zero_shot = {"before": before, "after": self._zero_shot(tasks, parallel)}
            return model

    def _task_options(self, tasks: str | Sequence[str] | None, options: dict[str, Any] | None) -> dict | None:
        """``evaluate_tasks`` keyword arguments for ``prune(eval_tasks=...)``, checked before any work."""
        if tasks is None:
            if options:
                raise ValueError("eval_task_options was given without eval_tasks")
            return None
        from .zeroshot import check_options, lm_eval_module, parse_tasks

        allowed = ("num_fewshot", "limit", "include_path", "batch_size")
        unknown = sorted(set(options or {}) - set(allowed))
        if unknown:
            raise ValueError(f"unknown eval_task_options {unknown}; allowed: {list(allowed)}")
        kwargs = {"batch_size": self.config.batch_size, **(options or {}), "tasks": parse_tasks(tasks)}
        check_options(kwargs.get("num_fewshot"), kwargs.get("limit"), kwargs["batch_size"])
        lm_eval_module()  # a missing extra fails now, not after pruning
        return kwargs

    def _zero_shot(self, options: dict[str, Any], parallel: Parallel) -> Any:
        """lm-eval scores of the model as it is now; with several ranks, rank 0 scores and shares them."""
        from .zeroshot import evaluate_tasks

        return parallel.on_main(
            lambda: evaluate_tasks(self.model, self.tokenizer, device=self.device, **options), share=True
        )

    def _prune(
        self,
        parallel: Parallel,
        calibration_dataset: CalibrationData | None,
        eval_dataset: CalibrationData | None,
        eval_sequence_length: int | None,
        eval_max_windows: int | None,
        progress: bool,
        store: BlockStore = IN_MEMORY,
    ) -> nn.Module:
        progress = progress and parallel.is_main
        evaluate = eval_dataset is not None
        if evaluate and eval_sequence_length is None:
            from .evaluation import default_sequence_length

            eval_sequence_length = default_sequence_length(self.model)
        windows = (eval_dataset, eval_sequence_length, eval_max_windows)
        if evaluate:
            before = self._perplexity(*windows, progress, parallel)
        if calibration_dataset is None:
            logger.info("no calibration data given: using the bundled WikiText-2 validation excerpt")
            calibration_dataset = DEFAULT_CALIBRATION_TEXT
        input_ids = parallel.on_main(
            lambda: prepare_calibration(
                calibration_dataset,
                self.tokenizer,
                self.config.num_samples,
                self._sequence_length(),
                self.config.seed,
            ),
            share=True,
        )
        logger.info("calibrating on %d windows of %d tokens on %s", *input_ids.shape, self.device)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            result = prune_sequential(
                self.model,
                input_ids,
                self.config,
                self.device,
                progress,
                parallel,
                store,
                self.offload_activations,
            )
        finally:
            self.model.train(was_training)
        self.report = PruneReport(
            config=self.config.to_dict(),
            layers=result.layers,
            kept_dense=result.kept_dense,
            block_seconds=result.block_seconds,
            reconstruction=result.reconstruction if self.config.reconstruction_epochs > 0 else None,
            base_model=getattr(getattr(self.model, "config", None), "name_or_path", None),
            calibration={
                "source": describe_data(calibration_dataset),
                "num_samples": int(input_ids.shape[0]),
                "sequence_length": int(input_ids.shape[1]),
                "tokens": int(input_ids.numel()),
                "seed": self.config.seed,
            },
            device=str(self.device),
            seconds=round(time.perf_counter() - start, 2),
            versions=library_versions(),
            world_size=parallel.world_size,
        )
        if evaluate:
            after = self._perplexity(*windows, progress, parallel)
            self.report.evaluation = {
                "dataset": describe_data(eval_dataset),
                "split": split_of(eval_dataset),
                "sequence_length": eval_sequence_length,
                "windows": eval_max_windows,
                "perplexity_before": before,
                "perplexity_after": after,
            }
            logger.info("perplexity %.3f -> %.3f", before, after)
        return self.model

    def _sequence_length(self) -> int:
        """The calibration window length: the config's, capped at the model's context."""
        seq_len = self.config.sequence_length
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            logger.warning(
                "sequence_length=%d exceeds the model's context of %d tokens; using %d", seq_len, limit, limit
            )
            return limit
        return seq_len

    def _perplexity(
        self,
        data: CalibrationData,
        sequence_length: int,
        max_windows: int | None,
        progress: bool,
        parallel: Parallel,
    ) -> float:
        """Perplexity of the model as it is now, on the compute device (shared out over the ranks)."""
        from .evaluation import perplexity

        home = next(self.model.parameters()).device
        self.model.to(self.device)
        try:
            batch_size = self.config.batch_size
            return perplexity(
                self.model,
                self.tokenizer,
                data,
                sequence_length,
                max_windows=max_windows,
                batch_size=batch_size,
                progress=progress,
                parallel=parallel,
            )
        finally:
            self.model.to(home)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: str | int = "5GB",
        save_format: str = "dense",
        model_card: dict[str, Any] | None = None,
    ) -> Path:
        """Write the pruned model, tokenizer, ``maiht_config.json``, ``maiht_report.json`` and the model card
        ``README.md`` with :func:`optimum_maiht.serialization.save_pruned`; atomic, and a non-empty folder is
        refused unless ``overwrite=True``.

        ``save_format="dense"``: transformers safetensors with exact zeros (plain ``AutoModelForCausalLM``
        loads it); ``"compressed"``: kept values plus packed masks, about half the bytes at 50%, loaded with
        :class:`optimum_maiht.MAIHTModelForCausalLM`. ``model_card``: keyword arguments of
        :func:`optimum_maiht.model_card.render_model_card`, e.g. ``{"license": "apache-2.0"}``.

        Under ``torchrun`` only rank 0 writes; the other ranks return the same path at once, without
        waiting (they need not call this at all).
        """
        from .serialization import save_pruned

        if self.report is None:
            raise RuntimeError("nothing to save yet: call prune() first")
        if not is_main_process():
            return Path(save_directory).expanduser().resolve()
        return save_pruned(
            save_directory,
            self.model,
            self.config,
            self.report,
            tokenizer=self.tokenizer,
            save_format=save_format,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            model_card=model_card,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        save_format: str = "dense",
        model_card: dict[str, Any] | None = None,
        **hub_options: Any,
    ) -> str | None:
        """Save into a temporary folder (as :meth:`save_pretrained`, the card naming ``repo_id``) and upload
        it with :func:`optimum_maiht.hub.push_to_hub`, which takes ``hub_options`` (``private``, ``token``,
        ``create_pr``, ``commit_message``, ``revision``, ``endpoint``); returns the commit or PR URL. The
        token comes from ``token``, ``HF_TOKEN`` or the cached login, and is never written anywhere.
        Under ``torchrun`` only rank 0 uploads; the other ranks return ``None``."""
        from .hub import push_to_hub

        if not is_main_process():
            return None
        with tempfile.TemporaryDirectory(prefix="maiht-push-") as tmp:
            card = {"repo_id": repo_id, **(model_card or {})}
            folder = self.save_pretrained(Path(tmp) / "model", save_format=save_format, model_card=card)
            return push_to_hub(folder, repo_id, **hub_options)


def _try_tokenizer(source: str | None) -> Any | None:
    if not source:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        logger.info("no tokenizer loaded from %s (%s); calibrate with token ids", source, err)
        return None
