"""Files named by files from elsewhere (docs/design.md, "Files from elsewhere").

A checkpoint, its index, its config and a calibration text come from strangers: every file one of them
names is resolved here (:func:`resolve_inside`: never outside its folder, symlinks included), and every
JSON file is read here (:func:`read_json`: a size cap, no ``RecursionError``, the top-level type checked,
non-UTF-8 bytes named). Errors are :class:`UnsafeFileError` (a ``ValueError``): one line naming the file.

Standard library only, so that any module (the streaming reader included) can call it cheaply.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path, PurePath
from typing import Any

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (an index of a 1000-shard checkpoint with 100k tensors is about 10 MB)."""
MAX_SAFETENSORS_HEADER = 100 * 2**20
"""Largest safetensors header read: the safetensors library's own limit."""
_HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
SAFETENSORS_ITEM_BYTES = {
    **dict.fromkeys(("F64", "I64", "U64"), 8),
    **dict.fromkeys(("F32", "I32", "U32"), 4),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 2),
    **dict.fromkeys(("I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"), 1),
}
"""Bytes per element of each safetensors dtype name."""


class UnsafeFileError(ValueError):
    """A file from elsewhere names something outside its folder, or is too large, malformed or not UTF-8."""


def resolve_inside(folder: str | os.PathLike, name: Any, *, what: str = "file") -> Path:
    """The path of the file ``name`` (as written in an index or config) inside ``folder``.

    Refused with one message, whether or not the target exists (so that an error reveals nothing about
    the machine): a name that is not a non-empty string, an absolute path, a ``..`` part, and anything
    that resolves outside ``folder`` once symlinks are followed. The one exception is a Hugging Face
    cache snapshot (``models--org--name/snapshots/REV``), whose files are symlinks into the repository's
    own ``blobs`` folder. ``what`` names the file's role in the error (``"shard named in X.index.json"``).
    """
    root = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafeFileError(f"{root}: the {what} must be a file name, got {_shown(name)}")
    refusal = UnsafeFileError(
        f"{root}: the {what} {_shown(name)} points outside the folder; refused (a checkpoint may only name "
        "its own files): get the checkpoint again from a source you trust"
    )
    pure = PurePath(name)
    if pure.anchor or ".." in pure.parts:
        raise refusal
    try:
        base = root.resolve()
        resolved = (root / pure).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise refusal from None
    if not any(resolved.is_relative_to(allowed) for allowed in _allowed_roots(base)):
        raise refusal
    return root / pure


def _allowed_roots(base: Path) -> list[Path]:
    """Where the files of ``base`` may live: itself, plus its repository's blobs for a Hub cache snapshot."""
    roots = [base]
    if base.parent.name == "snapshots" and base.parent.parent.name.startswith(_HUB_REPO_PREFIXES):
        roots.append(base.parent.parent / "blobs")
    return roots


def _shown(value: Any) -> str:
    """``value`` for an error message: its repr, cut to 80 characters, with its type when not a string."""
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return text if isinstance(value, str) else f"{text} ({type(value).__name__})"


def read_json(
    path: str | os.PathLike,
    *,
    what: str = "JSON file",
    expect: type | None = dict,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """Parse the JSON file ``path``: at most ``max_bytes``, UTF-8, no nesting deep enough to exhaust the
    interpreter's stack, and (unless ``expect`` is ``None``) a top level of type ``expect``.

    ``what`` says what the file is in the errors (``"config.json"``, ``"the checkpoint index"``).
    """
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise UnsafeFileError(
            f"{path}: {what} of {size:,} bytes is larger than the {max_bytes:,} bytes read from such a file"
        )
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since stat
        raise UnsafeFileError(f"{path}: {what} is larger than the {max_bytes:,} bytes read from such a file")
    return parse_json(data, f"{path}: {what}", expect)


def parse_json(data: bytes | str, where: str, expect: type | None = dict, one_line: bool = False) -> Any:
    """Parse JSON text from a file; ``where`` starts every error (``"calib.jsonl, line 3"``, then
    ``one_line``: positions are columns of that line)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UnsafeFileError(
                f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as "
                "UTF-8"
            ) from None
    try:
        value = json.loads(data)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if one_line else f"line {err.lineno} column {err.colno}"
        raise UnsafeFileError(f"{where} is not valid JSON ({err.msg} at {at})") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise UnsafeFileError(f"{where} is not valid JSON ({err})") from None
    except RecursionError:
        raise UnsafeFileError(
            f"{where} nests JSON too deeply to be read; it is not a file this package writes"
        ) from None
    if expect is not None and not isinstance(value, expect):
        raise UnsafeFileError(
            f"{where} holds a JSON {_json_type(value)} at the top level, expected a JSON "
            f"{_json_type(expect())}"
        )
    return value


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def read_weight_map(folder: str | os.PathLike, index_name: str) -> dict[str, Path]:
    """``{tensor name: file}`` of a sharded checkpoint's index ``folder/index_name`` (transformers'
    ``weight_map``), every file resolved inside ``folder`` (:func:`resolve_inside`).

    The streaming reader and the compact loader both read indexes through this.
    """
    index = read_json(Path(folder) / index_name, what=index_name)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise UnsafeFileError(f"{Path(folder) / index_name}: no 'weight_map' object; the index is damaged")
    files: dict[str, Path] = {}
    resolved: dict[str, Path] = {}
    for tensor, file in weight_map.items():
        if file not in resolved:
            resolved[file] = resolve_inside(folder, file, what=f"shard named in {index_name}")
        files[tensor] = resolved[file]
    return files


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (``{name: {dtype, shape, data_offsets}}`` plus
    ``__metadata__``), read without touching the tensors' bytes; sizes and offsets are checked against
    the file's length."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise UnsafeFileError(
                f"{path} is not a safetensors file (header length {length}, file {size} bytes)"
            )
        header = parse_json(f.read(length), f"{path}: safetensors header")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(v) is int for v in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
            and isinstance(entry.get("shape"), list)
            and all(type(v) is int and v >= 0 for v in entry["shape"])
            and entry.get("dtype") in SAFETENSORS_ITEM_BYTES
            and offsets[1] - offsets[0] == math.prod(entry["shape"]) * SAFETENSORS_ITEM_BYTES[entry["dtype"]]
        )
        if not valid:
            raise UnsafeFileError(
                f"{path}: the header entry of {_shown(name)} is malformed or past the end of the file: the "
                "file is damaged or truncated"
            )
    return header
