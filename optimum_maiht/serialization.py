"""Writing pruned folders: atomically, transformers-style, annotated so that anyone can load them
(docs/design.md, "On disk").

A saved folder holds the weights (dense safetensors with exact zeros, or the compact format of
:mod:`optimum_maiht.compressed`), ``config.json`` with a ``"maiht"`` summary, the tokenizer,
``maiht_config.json``, ``maiht_report.json`` and the model card ``README.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .compressed import write_compressed
from .configuration import MAIHTConfig
from .constants import CONFIG_ANNOTATION_KEY, CONFIG_NAME, REPORT_NAME, SAVE_FORMATS
from .conversion import saved_state
from .model_card import write_model_card
from .report import PruneReport
from .writer import ModelWeights, WeightSource, segment_of, write_index, write_shards

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class ModelInMemory(ModelWeights):
    """The :class:`~optimum_maiht.writer.WeightSource` of a model held whole in memory: its saved layout
    holds the tensors themselves (views of the model's, nothing copied)."""

    def saved_layout(self) -> dict[str, Tensor]:
        return saved_state(self.model)

    def saved_segment(self, index: int | None) -> dict[str, Tensor]:
        raise RuntimeError("a model in memory has no segment to read: its saved layout holds the tensors")


def check_output_folder(save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved output folder; refuses a file, the current folder or one of its parents (replacing it
    would delete the folder the process works in), and a non-empty folder unless ``overwrite=True``."""
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working folder was deleted
        cwd = None
    if cwd is not None and cwd.is_relative_to(target):
        raise ValueError(
            f"{target} is the current folder or one of its parents; it cannot be the output folder (it would "
            "be replaced whole): choose a new folder, e.g. a subfolder"
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; choose another folder or pass overwrite=True")
    return target


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``save_directory`` and move it into place only on success.

    A non-empty ``save_directory`` is refused unless ``overwrite=True``; then it is replaced whole, only
    once the new folder is complete, by one atomic exchange of the two folders (Linux ``renameat2``), so
    that a kill at any moment leaves the old or the new folder in place, never neither. On any error the
    temporary folder is removed and nothing changes. What killed saves left beside the folder (their
    temporary and old folders, named with their process id) is removed first (:func:`remove_leftovers`).
    """
    target = check_output_folder(save_directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target``; an existing ``target`` is exchanged with it atomically (then removed
    under the temporary name), or, where the system cannot exchange folders, renamed aside first."""
    if not target.exists():
        tmp.rename(target)
    elif exchange_folders(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)  # a kill before this line leaves OLD alone: the next save puts it back
        shutil.rmtree(old, ignore_errors=True)


def exchange_folders(first: Path, second: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``, Linux >= 3.15 on most file systems);
    ``False`` where the system cannot, without touching either."""
    rename = getattr(_libc(), "renameat2", None) if sys.platform.startswith("linux") else None
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def remove_leftovers(target: Path) -> None:
    """Remove the temporary (``.NAME.tmp-PID-*``) and old (``.NAME.old-PID``) folders that saves to
    ``target`` killed in their process ``PID`` left beside it; when ``target`` itself is missing (a kill
    between the two renames where folders cannot be exchanged) its old folder is put back instead."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)(-.*)?")
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*")):
        found = pattern.fullmatch(path.name)
        if found is None or not path.is_dir() or _alive(int(found[2])):
            continue
        if found[1] == "old" and not target.exists():
            path.rename(target)
            logger.warning("put back %s, which an interrupted save had moved to %s", target, path.name)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted save (process %s)", path, found[2])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (our own included; another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        source = source if source is not None else ModelInMemory(model)
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
        "method": report.method,
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "measured_sparsity": round(report.sparsity, 6),
        "format": save_format,
        "config_file": CONFIG_NAME,
    }
