"""Calibration and evaluation text: load it from whatever the user has, cut it into token windows.

Windows follow the tokenizer's own conventions: if it puts special tokens (BOS) at the start of an encoded
text, every window starts with them too (Gemma-family models score far worse without BOS).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from .constants import BUNDLED_ALIASES, BUNDLED_TEXTS
from .files import parse_json, read_json

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


MAX_LINE_CHARS = 4_000_000
"""Longest line (.txt), record (.jsonl / .json) or cell (.parquet) of a text file: about a million tokens,
whose tokenization takes a few hundred MB. A longer one is refused before it is tokenized (tokenizing a
200 MB line took 10.7 GB)."""
CHARS_PER_WINDOW_TOKEN = 64
"""Calibration reads at most this many characters per token of its windows (``num_samples x
sequence_length``), at least :data:`MIN_CALIBRATION_CHARS`: about 16 times the text the windows take for
English (~4 characters a token), among which the seeded choice picks them. A smaller file is read whole,
and its windows are the ones chosen before this limit existed."""
MIN_CALIBRATION_CHARS = 16 * 2**20


def read_text_file(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """Text of a .txt, .jsonl / .json (field ``text``) or .parquet (column ``text``) file.

    Read one line / record / cell at a time: one longer than :data:`MAX_LINE_CHARS` is refused before it is
    read whole, and reading stops once ``max_chars`` characters are collected (a warning says where).
    Errors name the file and the line (or row); bytes that are not UTF-8 are reported, not decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    readers = {".txt": (_txt_lines, ""), ".jsonl": (_jsonl_records, "\n\n"), ".json": (_json_records, "\n\n")}
    readers[".parquet"] = (_parquet_cells, "\n\n")
    if suffix not in readers:
        raise ValueError(
            f"unsupported calibration file type {suffix!r} for {path}; use .txt, .jsonl or .parquet"
        )
    reader, separator = readers[suffix]
    parts, total = [], 0
    records = reader(path)
    for where, text in records:
        parts.append(text)
        total += len(text) + len(separator)
        if max_chars is not None and total >= max_chars:
            if next(records, None) is not None:
                logger.warning(
                    "%s: read up to %s (%d characters, enough for the calibration windows); the rest is "
                    "not used",
                    path,
                    where,
                    total,
                )
            break
    return separator.join(parts)


def _txt_lines(path: Path) -> Iterator[tuple[str, str]]:
    """``("line N", line with its newline)``, each line checked for length and decoded as UTF-8 on its own
    (so that an error names its line); newlines as ``Path.read_text`` gives them (``\\r\\n`` -> ``\\n``)."""
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(4 * MAX_LINE_CHARS + 2):  # UTF-8: at most 4 bytes a character
            number += 1
            body = raw.rstrip(b"\r\n")
            if (
                len(body) > 4 * MAX_LINE_CHARS
                or len(body) > MAX_LINE_CHARS
                and len(_decode(path, number, body)) > MAX_LINE_CHARS
            ):
                raise ValueError(
                    f"{path}, line {number}: longer than {MAX_LINE_CHARS:,} characters; split it into "
                    "lines (calibration needs windows of a few thousand tokens)"
                )
            yield f"line {number}", _decode(path, number, raw).replace("\r\n", "\n").replace("\r", "\n")


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}, line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the file as UTF-8"
        ) from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, str]]:
    for where, line in _txt_lines(path):
        if line.strip():
            yield (
                where,
                _record_text(parse_json(line, f"{path}, {where}", expect=None, one_line=True), path, where),
            )


def _json_records(path: Path) -> Iterator[tuple[str, str]]:
    data = read_json(path, what="calibration file", expect=None)
    for i, row in enumerate(data if isinstance(data, list) else [data]):
        yield f"record {i}", _record_text(row, path, f"record {i}")


def _record_text(row: Any, path: Path, where: str) -> str:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f"{path}, {where}: no string field 'text'")
    if len(row["text"]) > MAX_LINE_CHARS:
        raise ValueError(f"{path}, {where}: a text longer than {MAX_LINE_CHARS:,} characters; split it")
    return row["text"]


def _parquet_cells(path: Path) -> Iterator[tuple[str, str]]:
    """The ``text`` column, a batch of rows at a time, read with pyarrow (no copy left in a cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} cannot be read as parquet ({err})") from None
    schema = file.schema_arrow
    if "text" not in schema.names:
        raise ValueError(f"{path}: no 'text' column (columns: {schema.names})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: the 'text' column holds {kind}, not strings")
    row = 0
    for batch in file.iter_batches(batch_size=256, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"{path}, row {row}: the 'text' cell is empty (null); drop or fill that row")
            if len(text) > MAX_LINE_CHARS:
                raise ValueError(
                    f"{path}, row {row}: a text longer than {MAX_LINE_CHARS:,} characters; split it"
                )
            yield f"row {row}", text
            row += 1


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


def calibration_text(data: CalibrationData, max_chars: int | None = None) -> str | Tensor:
    """Normalise calibration input to one text, or to a ready ``LongTensor[n, seq]`` of token ids; a file
    is read up to ``max_chars`` characters (:func:`read_text_file`)."""
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
        return read_text_file(data, max_chars)
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
            texts = [t for t in data["text"] if t is not None]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("the calibration dataset's 'text' column holds values that are not strings")
            return "\n\n".join(texts)
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
    """Calibration windows ``LongTensor[num_samples, sequence_length]`` (a given 2-D tensor is used as is).

    A file is read only as far as the windows need (:data:`CHARS_PER_WINDOW_TOKEN`)."""
    budget = max(MIN_CALIBRATION_CHARS, CHARS_PER_WINDOW_TOKEN * num_samples * sequence_length)
    normal = calibration_text(data, max_chars=budget)
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
