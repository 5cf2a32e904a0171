"""The partial folder of a streamed run: what it was started with and every finished block, so that a
killed run resumes (docs/design.md, "Streaming and resume")."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from ..files import UnsafeFileError, read_json
from ..pipeline.store import FinishedBlock
from ..report import BlockReconstruction, LayerReport
from ..serialization import check_output_folder

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".maiht-partial"
"""The partial folder of output ``out`` is ``out.maiht-partial``, beside it."""
STATE_NAME = "state.json"
STATE_VERSION = 1


class ResumeError(ValueError):
    """A partial run exists and was not asked to be resumed, or does not match the run resuming it."""


def partial_folder(output: str | os.PathLike) -> Path:
    """Where the resume state of a streaming run writing ``output`` lives: ``<output>.maiht-partial``."""
    target = Path(output).expanduser().resolve()
    return target.with_name(target.name + PARTIAL_SUFFIX)


class PartialRun:
    """The resume state: ``state.json`` (the fingerprint), and per finished block
    ``blocks/block-NNNNN.safetensors`` (its pruned tensors) then ``blocks/block-NNNNN.json`` (its reports
    and time, written last: a block counts as finished once its JSON exists). Files are written under a
    temporary name and renamed, so a kill never leaves a half-written file under a final name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.blocks = folder / "blocks"

    def finished(self) -> dict[int, FinishedBlock]:
        done = {}
        for path in sorted(self.blocks.glob("block-*.json")):
            data = read_json(path, what="a finished block's record")
            layers = [LayerReport.from_dict(layer) for layer in data["layers"]]
            rebuilt = data.get("reconstruction")
            rebuilt = None if rebuilt is None else BlockReconstruction.from_dict(rebuilt)
            dtype = data.get("dtype")
            dtype = dtype if isinstance(dtype, str) else None  # a record from before it was kept: None
            done[int(path.stem.split("-")[1])] = FinishedBlock(layers, data["seconds"], rebuilt, dtype)
        return done

    def block_file(self, index: int) -> Path:
        return self.blocks / f"block-{index:05d}.safetensors"

    def start(self, fingerprint: dict[str, Any]) -> None:
        self.blocks.mkdir(parents=True, exist_ok=True)
        _write_atomic(
            self.folder / STATE_NAME, json.dumps({"version": STATE_VERSION, **fingerprint}, indent=2)
        )

    def state(self) -> dict[str, Any]:
        try:
            return read_json(self.folder / STATE_NAME, what=STATE_NAME)
        except (OSError, UnsafeFileError) as err:
            raise ResumeError(
                f"{self.folder} is not a readable partial run ({err}); delete the folder to start again"
            ) from None

    def save_block(self, index: int, tensors: dict[str, Tensor], record: FinishedBlock) -> None:
        path = self.block_file(index)
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        data: dict[str, Any] = {
            "layers": [r.to_dict() for r in record.layers],
            "seconds": record.seconds,
            "dtype": record.dtype,
        }
        if record.reconstruction is not None:
            data["reconstruction"] = record.reconstruction.to_dict()
        _write_atomic(path.with_suffix(".json"), json.dumps(data))

    def check_resumable(
        self, fingerprint: dict[str, Any], blocks: int, world_size: int
    ) -> dict[int, FinishedBlock]:
        """The finished blocks of the run to resume, once its fingerprint matches this run's; a
        :class:`ResumeError` naming what differs otherwise."""
        state = self.state()
        differences = _differences(state, fingerprint)
        if differences:
            raise ResumeError(
                f"cannot resume {self.folder}: it was started with a different {'; '.join(differences)}. "
                "Resume with the same model, dtype, calibration data, configuration and library versions, or "
                "delete that folder to start again"
            )
        done = self.finished()
        if sorted(done) != list(range(len(done))):
            raise ResumeError(f"{self.folder} is damaged (blocks {sorted(done)}); delete it")
        logger.info("resuming %s: %d of %d blocks already pruned", self.folder, len(done), blocks)
        started = state.get("world_size", 1)
        if started != world_size:
            logger.warning(
                "the interrupted run had %d processes and this one has %d: the blocks still to prune will "
                "match an uninterrupted run up to floating-point summation order, not bit for bit",
                started,
                world_size,
            )
        return done


def check_folders(output: str | os.PathLike, partial: PartialRun, resume: bool, overwrite: bool) -> bool:
    """Check the output folder and the partial folder beside it; whether there is a run to resume."""
    check_output_folder(output, overwrite)
    if partial.folder.exists() and not resume:
        done = len(partial.finished()) if partial.blocks.is_dir() else 0
        raise ResumeError(
            f"{partial.folder} holds an interrupted run ({done} blocks pruned): pass resume=True "
            "(optimum-cli: --resume) to continue it, or delete that folder to start again"
        )
    if resume and not partial.folder.exists():
        logger.info("nothing to resume in %s: starting from the first block", partial.folder)
    return resume and partial.folder.exists()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words."""
    found = []
    for part in ("model", "dtype", "calibration", "config", "versions"):
        before, now = old.get(part), new.get(part)
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):
            if part == "model":
                before = {"config.json": before.get("config_sha256"), **before.get("shards", {})}
                now = {"config.json": now.get("config_sha256"), **now.get("shards", {})}
            keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:4])
            found.append(f"{part} ({details})")
        else:
            found.append(f"{part} ({before!r} -> {now!r})")
    return found
