"""Writing pruned checkpoints: atomically, transformers-style, annotated so that anyone can load them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPORT_NAME = "maiht_report.json"
CONFIG_ANNOTATION_KEY = "maiht"
"""Key added to ``config.json``: transformers keeps unknown keys as config attributes and ignores them."""


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``save_directory`` and move it into place only on success.

    A non-empty ``save_directory`` is refused unless ``overwrite=True`` (then it is replaced whole, only
    once the new folder is complete). On any error the temporary folder is removed and nothing changes.
    """
    target = Path(save_directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; choose another folder or pass overwrite=True")
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


def looks_like_local_path(source: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def annotate_model_config(folder: Path, annotation: dict[str, Any]) -> None:
    """Add the ``maiht`` summary to the saved ``config.json`` (plain transformers still loads it)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_ANNOTATION_KEY] = annotation
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
