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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .configuration import MAIHTConfig
from .constants import CONFIG_ANNOTATION_KEY, CONFIG_NAME, REPORT_NAME, SAVE_FORMATS
from .files import UnsafeFileError, read_json
from .report import PruneReport

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

WeightsWriter = Callable[[Path, nn.Module, MAIHTConfig, PruneReport, str, "str | int"], None]
"""``(folder, model, config, report, save_format, max_shard_size)``: writes the weights and the model's
``config.json`` / ``generation_config.json`` into ``folder``."""


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


def saved_format(folder: str | os.PathLike) -> str:
    """The storage format a saved folder declares in ``config.json`` (``"maiht": {"format": ...}``);
    ``"dense"`` when it says nothing."""
    try:
        annotation = read_json(Path(folder) / "config.json", what="config.json").get(CONFIG_ANNOTATION_KEY)
    except (OSError, UnsafeFileError):
        return "dense"
    found = annotation.get("format") if isinstance(annotation, dict) else None
    return found if found in SAVE_FORMATS else "dense"


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
    write_weights: WeightsWriter | None = None,
) -> Path:
    """Write a pruned model's folder atomically and return its resolved path.

    ``save_format="dense"``: transformers safetensors with exact zeros (plain ``AutoModelForCausalLM``
    loads it); ``"compressed"``: kept values plus packed masks for every pruned layer of ``report``.
    ``model_card``: keyword arguments of :func:`optimum_maiht.model_card.render_model_card`.
    ``write_weights``: what writes the weights, ``config.json`` and ``generation_config.json`` into the
    temporary folder (default: from the model in memory; streaming passes its own, which copies the pruned
    blocks from disk, docs/design.md "Streaming and resume").
    """
    from .model_card import write_model_card

    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {SAVE_FORMATS}, got {save_format!r}")
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        (write_weights or _write_weights)(tmp, model, config, report, save_format, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        write_json(tmp / REPORT_NAME, report.to_dict())
        annotate_model_config(tmp, _annotation(config, report, save_format))
        write_model_card(tmp, report, storage_format=save_format, **(model_card or {}))
    target = Path(save_directory).expanduser().resolve()
    logger.info("saved the pruned model (%s) to %s", save_format, target)
    return target


def _write_weights(
    folder: Path,
    model: nn.Module,
    config: MAIHTConfig,
    report: PruneReport,
    save_format: str,
    max_shard_size: str | int,
) -> None:
    if save_format == "dense":
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return
    from .compressed import save_compressed

    pruned, transposed = compressed_layers(config, report)
    save_compressed(model, folder, pruned, max_shard_size=max_shard_size, transposed=transposed)


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
        "method": "mAIHT",
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "measured_sparsity": round(report.sparsity, 6),
        "format": save_format,
        "config_file": CONFIG_NAME,
    }
