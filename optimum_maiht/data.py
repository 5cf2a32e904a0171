"""Calibration and evaluation text: load it from whatever the user has, cut it into token windows.

Windows follow the tokenizer's own conventions: if it puts special tokens (BOS) at the start of an encoded
text, every window starts with them too (Gemma-family models score far worse without BOS).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from .constants import BUNDLED_ALIASES, BUNDLED_TEXTS

logger = logging.getLogger(__name__)

CalibrationData = Union[str, os.PathLike, Sequence[str], Tensor, Any]  # noqa: UP007 (Any: datasets.Dataset)

BUNDLED_NAMES = sorted([*BUNDLED_TEXTS, *BUNDLED_ALIASES])
"""Every name of a bundled text (``wikitext2`` is short for ``wikitext2-validation``)."""


def is_bundled(name: Any) -> bool:
    return isinstance(name, str) and name in BUNDLED_NAMES


def bundled_text(name: str) -> str:
    """The bundled text ``name`` (one of :data:`BUNDLED_NAMES`)."""
    if not is_bundled(name):
        raise ValueError(f"unknown bundled text {name!r}; choose one of {BUNDLED_NAMES}")
    file = BUNDLED_TEXTS[BUNDLED_ALIASES.get(name, name)]
    with resources.files("optimum_maiht").joinpath("texts", file).open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def describe_data(data: Any) -> str:
    """A short, JSON-friendly name for calibration / evaluation data, for the report and the card."""
    if is_bundled(data):
        split = split_of(data)
        return f"wikitext-2-raw-v1 ({split} excerpt bundled with optimum-maiht)"
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, Tensor):
        return f"token ids {list(data.shape)}"
    return type(data).__name__


def split_of(data: Any) -> str | None:
    """The dataset split the data comes from, when its name says (``...test...``), else ``None``."""
    if is_bundled(data):
        return BUNDLED_ALIASES.get(data, data).removeprefix("wikitext2-")
    name = str(data) if isinstance(data, (str, os.PathLike)) else ""
    return next((s for s in ("test", "validation", "train") if s in name), None)


def read_text_file(path: str | os.PathLike) -> str:
    """Text of a .txt, .jsonl / .json (field ``text``) or .parquet (column ``text``) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix in (".jsonl", ".json"):
        texts = []
        with path.open(encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()] if suffix == ".jsonl" else json.load(f)
        for i, row in enumerate(lines if isinstance(lines, list) else [lines]):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}: record {i} has no string field 'text'")
            texts.append(row["text"])
        return "\n\n".join(texts)
    if suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {ds.column_names})")
        return "\n\n".join(ds["text"])
    raise ValueError(f"unsupported calibration file type {suffix!r} for {path}; use .txt, .jsonl or .parquet")


def special_prefix(tokenizer: Any) -> list[int]:
    """The token ids the tokenizer puts before any text (e.g. ``[bos_token_id]``), possibly empty."""
    probe = "Hello world"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """All token ids of ``text`` as one LongTensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    tokens: Tensor,
    num_windows: int | None,
    sequence_length: int,
    prefix: Sequence[int] = (),
    seed: int | None = None,
) -> Tensor:
    """Cut ``tokens`` into non-overlapping windows of ``sequence_length``, each starting with ``prefix``.

    With a ``seed`` the windows are a seeded random choice among all the chunks (calibration); without,
    the first ``num_windows`` in order (evaluation; ``None`` takes all).
    """
    body = sequence_length - len(prefix)
    if body < 1:
        raise ValueError(f"sequence_length={sequence_length} is too short for {len(prefix)} prefix tokens")
    available = tokens.numel() // body
    wanted = available if num_windows is None else num_windows
    if available < max(wanted, 1):
        raise ValueError(
            f"the text has {tokens.numel()} tokens, enough for {available} windows of {sequence_length}, but "
            f"{wanted} were asked for: give more text or lower num_samples / sequence_length"
        )
    if seed is None:
        starts = torch.arange(wanted)
    else:
        starts = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:wanted]
    chunks = tokens[: available * body].view(available, body)[starts]
    head = torch.tensor(list(prefix), dtype=torch.long).expand(chunks.shape[0], len(prefix))
    return torch.cat([head, chunks], dim=1)


def calibration_text(data: CalibrationData) -> str | Tensor:
    """Normalise calibration input to one text, or to a ready ``LongTensor[n, seq]`` of token ids."""
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"a calibration tensor must be an integer LongTensor[n, seq], got {data.dtype} "
                f"of shape {tuple(data.shape)}"
            )
        if data.numel() == 0:
            raise ValueError("the calibration tensor is empty")
        return data.long()
    if isinstance(data, (str, os.PathLike)):
        if is_bundled(data):
            return bundled_text(data)
        try:
            exists = Path(data).exists()
        except OSError:  # e.g. a whole text given where a path was expected: "File name too long"
            exists = False
        if not exists:
            shown = str(data) if len(str(data)) <= 60 else str(data)[:57] + "..."
            raise FileNotFoundError(
                f"calibration data {shown!r} is neither a file nor a bundled text ({BUNDLED_NAMES}); "
                "to use a text itself, pass it in a list: [text]"
            )
        return read_text_file(data)
    if hasattr(data, "column_names"):  # datasets.Dataset
        columns = data.column_names
        if "input_ids" in columns:
            rows = [list(r) for r in data["input_ids"]]
            if not rows:
                raise ValueError("the calibration dataset is empty")
            if len({len(r) for r in rows}) == 1:
                return calibration_text(torch.tensor(rows, dtype=torch.long))
            return torch.tensor([t for r in rows for t in r], dtype=torch.long)  # 1-D: to be windowed
        if "text" in columns:
            return "\n\n".join(t for t in data["text"] if t is not None)
        raise ValueError(f"the calibration dataset needs a 'text' or 'input_ids' column, got {columns}")
    if isinstance(data, Sequence) and all(isinstance(t, str) for t in data):
        return "\n\n".join(data)
    raise TypeError(
        "calibration data must be a list of strings, a datasets.Dataset, a LongTensor[n, seq], a bundled "
        f"text name or a path to a .txt / .jsonl / .parquet file; got {type(data).__name__}"
    )


def prepare_calibration(
    data: CalibrationData, tokenizer: Any | None, num_samples: int, sequence_length: int, seed: int
) -> Tensor:
    """Calibration windows ``LongTensor[num_samples, sequence_length]`` (a given 2-D tensor is used as is)."""
    normal = calibration_text(data)
    if isinstance(normal, Tensor) and normal.dim() == 2:
        return normal
    if isinstance(normal, str):
        if not normal.strip():
            raise ValueError("the calibration text is empty")
        if tokenizer is None:
            raise ValueError("text calibration data needs a tokenizer: pass tokenizer= or give token ids")
        prefix = special_prefix(tokenizer)
        normal = tokenize(tokenizer, normal)
    else:
        prefix = []
    return token_windows(normal, num_samples, sequence_length, prefix, seed=seed)
