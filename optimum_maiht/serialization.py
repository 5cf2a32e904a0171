"""Writing pruned folders: atomically, transformers-style, annotated so that anyone can load them
(docs/design.md, "On disk").

A saved folder holds the weights (dense safetensors with exact zeros, or the compact format of
:mod:`optimum_maiht.compressed`), ``config.json`` with a ``"maiht"`` summary, the tokenizer,
``maiht_config.json``, ``maiht_report.json`` and the model card ``README.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .compressed import write_compressed
from .configuration import MAIHTConfig
from .constants import CONFIG_ANNOTATION_KEY, CONFIG_NAME, REPORT_NAME, SAVE_FORMATS, SOLVER_DISPLAY_NAMES
from .model_card import write_model_card
from .report import PruneReport
from .writer import ModelWeights, WeightSource, segment_of, write_index, write_shards

logger = logging.getLogger(__name__)


def check_output_folder(save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved output folder; refuses a file, and a non-empty folder unless ``overwrite=True``."""
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; choose another folder or pass overwrite=True")
    return target


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``save_directory`` and move it into place only on success.

    A non-empty ``save_directory`` is refused unless ``overwrite=True`` (then it is replaced whole, only
    once the new folder is complete). On any error the temporary folder is removed and nothing changes.
    """
    target = check_output_folder(save_directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def annotate_model_config(folder: Path, annotation: dict[str, Any]) -> None:
    """Add the ``maiht`` summary to the saved ``config.json`` (plain transformers still loads it)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_ANNOTATION_KEY] = annotation
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pruned(
    save_directory: str | os.PathLike,
    model: nn.Module,
    config: MAIHTConfig,
    report: PruneReport,
    *,
    tokenizer: Any | None = None,
    save_format: str = "dense",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    model_card: dict[str, Any] | None = None,
    source: WeightSource | None = None,
) -> Path:
    """Write a pruned model's folder atomically and return its resolved path.

    ``save_format="dense"``: transformers safetensors with exact zeros (plain ``AutoModelForCausalLM``
    loads it); ``"compressed"``: kept values plus packed masks for every pruned layer of ``report``.
    ``model_card``: keyword arguments of :func:`optimum_maiht.model_card.render_model_card`.
    ``source``: where the weights come from (default: ``model`` in memory; a streamed run passes its store,
    whose blocks are on disk, docs/design.md "Streaming and resume"). Either way the one shard writer
    writes them (:mod:`optimum_maiht.writer`).
    """
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        source = source if source is not None else ModelWeights(model)
        if save_format == "dense":
            write_dense(tmp, source, max_shard_size)
        else:
            pruned, transposed = compressed_layers(config, report)
            write_compressed(tmp, source, pruned, transposed, max_shard_size, source.spill_folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        write_json(tmp / REPORT_NAME, report.to_dict())
        annotate_model_config(tmp, _annotation(config, report, save_format))
        write_model_card(tmp, report, storage_format=save_format, **(model_card or {}))
    target = Path(save_directory).expanduser().resolve()
    logger.info("saved the pruned model (%s) to %s", save_format, target)
    return target


def write_dense(folder: Path, source: WeightSource, max_shard_size: str | int) -> None:
    """What ``PreTrainedModel.save_pretrained`` writes, through the one shard writer: its config files
    (written by it, with no tensors), then the tensors it would save (tied weights removed, the
    checkpoint's layout restored, in its order) cut into the same shards, and the same index. A streamed
    run's blocks are read (and their layout restored) one at a time."""
    model = source.model
    model.save_pretrained(folder, state_dict={})
    (folder / "model.safetensors").unlink(missing_ok=True)  # none is written for no tensors
    layout = source.saved_layout()
    which = segment_of(model)
    cache: dict[int | None, dict[str, Tensor]] = {}

    def fetch(name: str) -> Tensor:
        if layout[name].device.type != "meta":
            return layout[name]
        index = which(name)
        if index not in cache:
            for block in [k for k in cache if k is not None]:  # one block at a time
                del cache[block]
            cache[index] = source.saved_segment(index)
        return cache[index][name]

    metadata = {"format": "pt"}
    pattern = "model{suffix}.safetensors"
    split = write_shards(
        folder, layout, fetch, pattern=pattern, max_shard_size=max_shard_size, metadata=metadata
    )
    if split.is_sharded:
        index_metadata = {"total_parameters": model.num_parameters(), **split.metadata}
        write_index(folder / "model.safetensors.index.json", index_metadata, split.tensor_to_filename)


def compressed_layers(config: MAIHTConfig, report: PruneReport) -> tuple[dict[str, Any], set[str]]:
    """``save_compressed``'s ``sparse_layers`` (parameter name -> N:M pattern or ``None``) and
    ``transposed`` (fused expert weights stored (in, out)) for the pruned layers of ``report``."""
    pruned = {_parameter_name(layer.name): config.nm for layer in report.pruned}
    transposed = {
        _parameter_name(layer.name) for layer in report.pruned if layer.transposed and "[" in layer.name
    }
    return pruned, transposed


def _parameter_name(layer_name: str) -> str:
    """The state-dict name of a pruned layer's weight: ``"...q_proj"`` -> ``"...q_proj.weight"``; a fused
    expert slice ``"...experts.gate_up_proj[3]"`` is stored with its whole parameter."""
    if layer_name.endswith("]"):
        return layer_name[: layer_name.rindex("[")]
    return f"{layer_name}.weight"


def _annotation(config: MAIHTConfig, report: PruneReport, save_format: str) -> dict[str, Any]:
    """The ``"maiht"`` entry of ``config.json``: a summary; the details are in our own files."""
    return {
        "method": SOLVER_DISPLAY_NAMES.get(report.solver, report.solver),
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "measured_sparsity": round(report.sparsity, 6),
        "format": save_format,
        "config_file": CONFIG_NAME,
    }
