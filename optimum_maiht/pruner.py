"""`MAIHTPruner`: load a causal LM, prune it with mAIHT, save it so that plain transformers loads it."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compressed import save_compressed
from .configuration import MAIHTConfig
from .data import CalibrationData, prepare_calibration
from .hub import push_to_hub, write_model_card
from .sequential import LayerReport, prune_sequential
from .serialization import (
    REPORT_NAME,
    annotate_model_config,
    atomic_directory,
    looks_like_local_path,
    write_json,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; use device='cpu'")
    return device


class MAIHTPruner:
    """Prunes a causal LM with mAIHT, one decoder block at a time.

    >>> pruner = MAIHTPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", MAIHTConfig(pattern="2:4"))
    >>> model = pruner.prune(["some calibration text", ...])
    >>> pruner.save_pretrained("smollm2-maiht-2of4")
    """

    def __init__(
        self,
        model: nn.Module,
        config: MAIHTConfig | None = None,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch / transformers model, got {type(model).__name__}")
        self.model = model
        self.config = config if config is not None else MAIHTConfig()
        if not isinstance(self.config, MAIHTConfig):
            raise TypeError(f"config must be a MAIHTConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self.device = resolve_device(device)
        self.layer_reports: list[LayerReport] = []
        self._run_info: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | nn.Module,
        config: MAIHTConfig | None = None,
        *,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ) -> MAIHTPruner:
        """Load from a Hub id or a local folder (``model_kwargs`` go to ``AutoModelForCausalLM``), or wrap
        an already loaded model. The tokenizer is loaded from the same place when there is one."""
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
            if tokenizer is None:
                source = getattr(getattr(model, "config", None), "name_or_path", None)
                tokenizer = _try_tokenizer(source) if source and Path(source).is_dir() else None
            return cls(model, config, tokenizer, device)
        from transformers import AutoModelForCausalLM

        source = str(model_or_path)
        path = Path(source).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; give the model's folder (with config.json) or a Hub id")
        if not path.exists() and looks_like_local_path(source):
            raise FileNotFoundError(f"model folder not found: {path}")
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: is it a transformers model folder?")
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.is_dir() else source, **model_kwargs)
        if tokenizer is None:
            tokenizer = _try_tokenizer(str(path) if path.is_dir() else source)
        return cls(model, config, tokenizer, device)

    def prune(
        self,
        calibration_dataset: CalibrationData | None = None,
        *,
        eval_dataset: CalibrationData | None = None,
        eval_sequence_length: int = 512,
        eval_max_windows: int | None = 40,
        progress: bool = True,
    ) -> nn.Module:
        """Prune the model in place and return it.

        ``calibration_dataset``: a list of strings, a ``datasets.Dataset`` (``text`` or ``input_ids``), a
        ``LongTensor[n, seq]`` (used as given), a path to a .txt / .jsonl / .parquet file, or the name of a
        bundled text; ``None`` uses the bundled WikiText-2 validation excerpt.
        ``eval_dataset`` (same kinds, e.g. ``"wikitext2-test"``): measure perplexity before and after over
        ``eval_max_windows`` windows of ``eval_sequence_length`` tokens (``None``: all), into the report.
        """
        config = self.config
        evaluation = None
        if eval_dataset is not None:
            before = self._perplexity(eval_dataset, eval_sequence_length, eval_max_windows, progress)
            evaluation = {
                "dataset": _describe(eval_dataset),
                "split": _split_of(eval_dataset),
                "sequence_length": eval_sequence_length,
                "windows": eval_max_windows,
                "perplexity_before": before,
            }
        if calibration_dataset is None:
            logger.info("no calibration data given: using the bundled WikiText-2 validation excerpt")
            calibration_dataset = "wikitext2"
        seq_len = config.sequence_length
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            logger.warning(
                "sequence_length=%d exceeds the model's context of %d tokens; using %d", seq_len, limit, limit
            )
            seq_len = limit
        input_ids = prepare_calibration(
            calibration_dataset, self.tokenizer, config.num_samples, seq_len, config.seed
        )
        logger.info("calibrating on %d windows of %d tokens on %s", *input_ids.shape, self.device)
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            self.layer_reports = prune_sequential(self.model, input_ids, config, self.device, progress)
        finally:
            self.model.train(was_training)
        self._run_info = {
            "calibration": {
                "source": _describe(calibration_dataset),
                "num_samples": int(input_ids.shape[0]),
                "sequence_length": int(input_ids.shape[1]),
                "tokens": int(input_ids.numel()),
                "seed": config.seed,
            },
            "device": str(self.device),
            "seconds": round(time.perf_counter() - start, 2),
        }
        if evaluation is not None:
            evaluation["perplexity_after"] = self._perplexity(
                eval_dataset, eval_sequence_length, eval_max_windows, progress
            )
            self._run_info["evaluation"] = evaluation
            logger.info(
                "perplexity %.3f -> %.3f", evaluation["perplexity_before"], evaluation["perplexity_after"]
            )
        return self.model

    def _perplexity(
        self, data: CalibrationData, sequence_length: int, max_windows: int | None, progress: bool
    ) -> float:
        from .evaluation import perplexity

        home = next(self.model.parameters()).device
        self.model.to(self.device)
        try:
            return perplexity(
                self.model,
                self.tokenizer,
                data,
                sequence_length,
                max_windows,
                batch_size=self.config.batch_size,
                progress=progress,
            )
        finally:
            self.model.to(home)

    @property
    def report(self) -> dict[str, Any]:
        """Summary and per-layer results of the last :meth:`prune` (empty before it)."""
        if not self.layer_reports:
            return {}
        pruned = [r for r in self.layer_reports if r.skipped is None]
        weights = sum(r.shape[0] * r.shape[1] for r in pruned)
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in pruned)
        return {
            "method": "mAIHT",
            "base_model": getattr(getattr(self.model, "config", None), "name_or_path", None),
            "config": self.config.to_dict(),
            **self._run_info,
            "sparsity": zeros / weights if weights else 0.0,
            "layers_pruned": len(pruned),
            "layers_skipped": len(self.layer_reports) - len(pruned),
            "versions": _versions(),
            "layers": [r.to_dict() for r in self.layer_reports],
        }

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
        ``README.md``; atomic, and a non-empty folder is refused unless ``overwrite=True``.

        ``save_format="dense"``: transformers safetensors with exact zeros (plain ``AutoModelForCausalLM``
        loads it); ``"compressed"``: kept values plus packed masks, about half the bytes at 50%, loaded with
        :class:`optimum_maiht.MAIHTModelForCausalLM`. ``model_card``: keyword arguments of
        :func:`optimum_maiht.hub.render_model_card`, e.g. ``{"license": "apache-2.0"}``.
        """
        if save_format not in ("dense", "compressed"):
            raise ValueError(f"save_format must be 'dense' or 'compressed', got {save_format!r}")
        if not self.layer_reports:
            raise RuntimeError("nothing to save yet: call prune() first")
        report = self.report
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            if save_format == "dense":
                self.model.save_pretrained(tmp, max_shard_size=max_shard_size)
            else:
                nm = self.config.nm
                pruned = {f"{r.name}.weight": nm for r in self.layer_reports if r.skipped is None}
                save_compressed(self.model, tmp, pruned, max_shard_size=max_shard_size)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self.config.save_pretrained(tmp)
            write_json(tmp / REPORT_NAME, report)
            annotate_model_config(
                tmp,
                {
                    "method": "mAIHT",
                    "sparsity": self.config.sparsity,
                    "pattern": self.config.pattern,
                    "measured_sparsity": round(report["sparsity"], 6),
                    "format": save_format,
                    "config_file": "maiht_config.json",
                },
            )
            write_model_card(tmp, report, **(model_card or {}))  # after config.json: it reads the format
        target = Path(save_directory).expanduser().resolve()
        logger.info("saved the pruned model (%s) to %s", save_format, target)
        return target

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        revision: str | None = None,
        endpoint: str | None = None,
        save_format: str = "dense",
        model_card: dict[str, Any] | None = None,
    ) -> str:
        """Save into a temporary folder (as :meth:`save_pretrained`, the card naming ``repo_id``) and upload
        it with :func:`optimum_maiht.hub.push_to_hub`; returns the commit or PR URL. A folder saved earlier
        is pushed with ``optimum_maiht.push_to_hub(folder, repo_id, ...)``. The token comes from ``token``,
        ``HF_TOKEN`` or the cached login, and is never written anywhere."""
        with tempfile.TemporaryDirectory(prefix="maiht-push-") as tmp:
            card = {"repo_id": repo_id, **(model_card or {})}
            folder = self.save_pretrained(Path(tmp) / "model", save_format=save_format, model_card=card)
            return push_to_hub(
                folder,
                repo_id,
                private=private,
                token=token,
                create_pr=create_pr,
                commit_message=commit_message,
                revision=revision,
                endpoint=endpoint,
            )


_BUNDLED_SPLITS = {"wikitext2": "validation", "wikitext2-test": "test"}


def _describe(data: Any) -> str:
    """A short, JSON-friendly name for calibration / evaluation data, for the report and the card."""
    if isinstance(data, (str, os.PathLike)):
        split = _BUNDLED_SPLITS.get(str(data))
        return f"wikitext-2-raw-v1 ({split} excerpt bundled with optimum-maiht)" if split else str(data)
    if isinstance(data, torch.Tensor):
        return f"token ids {list(data.shape)}"
    return type(data).__name__


def _split_of(data: Any) -> str | None:
    name = str(data) if isinstance(data, (str, os.PathLike)) else ""
    return _BUNDLED_SPLITS.get(name) or next((s for s in ("test", "validation", "train") if s in name), None)


def _try_tokenizer(source: str | None) -> Any | None:
    if not source:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        logger.info("no tokenizer loaded from %s (%s); calibrate with token ids", source, err)
        return None


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "optimum_maiht": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
