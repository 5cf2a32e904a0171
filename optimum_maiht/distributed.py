"""Several processes under ``torchrun``: data-parallel calibration and parallel solves (docs/design.md,
"Several processes").

Everything ``torch.distributed`` lives here, behind one small interface, :class:`Parallel`, that the
pipeline and the pruner call at fixed points:

- ``shard_windows``: each rank takes a contiguous share of the calibration (or evaluation) windows, cut on
  batch boundaries whenever there are at least as many batches as ranks;
- ``reduce_statistics``: Gram matrices and integer counts (tokens, routed rows, dropped rows) are summed
  over the ranks (float32 / int64 ``all_reduce``), keys missing on a rank included; afterwards every rank
  holds the union, so every decision taken on them (starved experts, unreached layers) is the same on all;
- ``solve``: the target layers of a block are split into pieces assigned to owner ranks by cost
  (``out * in^2``, greedy longest-first bin packing; a layer costing more than ``1 / (2 * world_size)``
  of the block is cut into row ranges when its sparsity set is row-separable), each owner solves its
  pieces, the solved weights are broadcast (one buffer per owner) and the reports gathered, so every rank
  holds the pruned block before the next one;
- ``on_main``: work done by rank 0 only (reading the calibration data, writing files), its result shared;
- ``broadcast``: rank 0's tensors to every rank (a streamed run's finished blocks, read back on resume);
- ``guard``: failure handling. Every collective phase starts with an ``all_gather_object`` of a status;
  a rank that fails outside a phase sends its error as the status of the phase the others are entering
  (and on leaving the guarded region everyone exchanges a last status), so every rank raises the failing
  rank's message (:class:`RankFailedError`, also an instance of the original built-in exception class)
  instead of waiting for it.

:class:`Parallel` itself is the single-process implementation: every method returns at once and the
pipeline takes exactly the code path it takes without this module. :func:`current` returns it unless the
process was launched by ``torchrun`` with ``WORLD_SIZE > 1`` (or a process group of several ranks is
already initialized), in which case it initializes the process group (NCCL for CUDA, gloo for the CPU;
device ``cuda:LOCAL_RANK``) once and returns a :class:`Distributed`.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .report import LayerReport

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "OPTIMUM_MAIHT_DIST_TIMEOUT"
"""Seconds a collective may wait for the slowest rank (default 1800): only a rank that died without a
word (killed, out of host memory) is noticed this way; errors are shared at once."""
DEFAULT_TIMEOUT_S = 1800

SPLIT_SHARE = 2
"""A layer whose cost exceeds ``1 / (SPLIT_SHARE * world_size)`` of its block is cut into row ranges."""


# --------------------------------------------------------------------------------------------------
# launch detection


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1`` in the env)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def local_device(device: torch.device) -> torch.device:
    """Under ``torchrun``, a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per
    process); anything else is returned as is."""
    if device.type == "cuda" and device.index is None and (launched() or _group_size() > 1):
        index = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())
    return device


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_ACTIVE: Distributed | None = None


def current(device: torch.device | str = "cpu") -> Parallel:
    """The :class:`Parallel` for this process: :data:`SINGLE` unless launched by ``torchrun`` with several
    processes (or inside an initialized process group of several ranks). The first call initializes the
    process group (``init_process_group`` with the ``env://`` rendezvous that ``torchrun`` sets up), with
    NCCL when ``device`` is CUDA and gloo otherwise; it is destroyed when the process exits."""
    global _ACTIVE
    if not launched() and _group_size() <= 1:
        return SINGLE
    import torch.distributed as dist

    if _ACTIVE is not None and dist.is_initialized() and _ACTIVE.group_id == id(dist.group.WORLD):
        return _ACTIVE
    device = local_device(torch.device(device))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        atexit.register(_destroy)
    _ACTIVE = Distributed(device)
    if _ACTIVE.world_size <= 1:
        _ACTIVE = None
        return SINGLE
    logger.info("%d processes (%s backend), this one on %s", _ACTIVE.world_size, dist.get_backend(), device)
    return _ACTIVE


def _destroy() -> None:
    import torch.distributed as dist

    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.close()
        _ACTIVE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process writes files and prints (rank 0, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0 if _ACTIVE is None else _ACTIVE.is_main


# --------------------------------------------------------------------------------------------------
# errors


class RankFailedError(RuntimeError):
    """Raised on every other rank when one rank failed: carries that rank and its exception's message.

    When the original exception is a built-in class (``ValueError``, ``FileNotFoundError``...), the raised
    object is also an instance of it, so callers that sort errors by class see the same kind everywhere.
    """

    def __init__(self, rank: int, world_size: int, kind: str, message: str):
        self.rank, self.world_size, self.kind, self.message = rank, world_size, kind, message
        super().__init__(f"rank {rank}/{world_size} failed: {kind}: {message}")

    def __reduce__(self):
        return _rank_failed, (self.rank, self.world_size, self.kind, self.message)


_ERROR_CLASSES: dict[str, type] = {}


def _rank_failed(rank: int, world_size: int, kind: str, message: str) -> RankFailedError:
    """A :class:`RankFailedError` that is also the built-in ``kind`` when there is one, and else carries
    the class's name (the CLI recognises some error classes by name)."""
    cls = _ERROR_CLASSES.get(kind)
    if cls is None:
        base = getattr(builtins, kind, None)
        cls = RankFailedError
        if isinstance(base, type) and issubclass(base, Exception) and not issubclass(base, RankFailedError):
            with contextlib.suppress(TypeError):
                cls = type(kind, (RankFailedError, base), {"__module__": __name__})
        elif kind.isidentifier():
            cls = type(kind, (RankFailedError,), {"__module__": __name__})
        _ERROR_CLASSES[kind] = cls
    err = cls.__new__(cls)
    RankFailedError.__init__(err, rank, world_size, kind, message)
    return err


def _status(rank: int, err: BaseException) -> tuple[int, str, str]:
    if isinstance(err, RankFailedError):
        return err.rank, err.kind, err.message
    return rank, type(err).__name__, str(err) or repr(err)


# --------------------------------------------------------------------------------------------------
# the solves of a block


@dataclass
class SolveJob:
    """One layer problem: the (out, in) weight view (solved in place) and its Gram matrix."""

    name: str
    weight: Tensor
    gram: Tensor


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of job ``job``, solved by rank ``owner``."""

    job: int
    start: int
    stop: int
    owner: int
    cost: float


def plan_solves(shapes: Sequence[Sequence[int]], world_size: int, split_rows: bool) -> list[Piece]:
    """Assign the layer problems of ``shapes`` (out, in) to ``world_size`` ranks, deterministically.

    Cost ``out * in^2`` (the iteration's ``(out x in) @ (in x in)`` products). With ``split_rows`` (a
    row-separable sparsity set), a layer costing more than ``total / (SPLIT_SHARE * world_size)`` is cut
    into at most ``world_size`` equal row ranges. The pieces then go, largest first, to the least loaded
    rank (the lowest rank on ties). Returned in job order, then row order.
    """
    costs = [float(out) * float(din) ** 2 for out, din in shapes]
    total = sum(costs)
    pieces: list[tuple[int, int, int, float]] = []
    for job, ((out, _), cost) in enumerate(zip(shapes, costs, strict=True)):
        parts = 1
        if split_rows and world_size > 1 and total > 0:
            parts = min(world_size, out, math.ceil(cost / (total / (SPLIT_SHARE * world_size))))
        for k in range(max(parts, 1)):
            start, stop = out * k // parts, out * (k + 1) // parts
            pieces.append((job, start, stop, cost * (stop - start) / out if out else 0.0))
    loads = [0.0] * world_size
    owners: dict[tuple[int, int], int] = {}
    for job, start, _, cost in sorted(pieces, key=lambda p: (-p[3], p[0], p[1])):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owner] += cost
        owners[(job, start)] = owner
    return [Piece(job, start, stop, owners[(job, start)], cost) for job, start, stop, cost in pieces]


def _merge(name: str, shape: list[int], parts: list[tuple[dict, float, int]]) -> LayerReport:
    """One layer's report from the reports of its row ranges: errors weighted by each range's output
    energy ``tr(W0 H W0^T)``, sparsity by rows, objective histories summed, the longest time."""
    reports = [LayerReport.from_dict(d) for d, _, _ in parts]
    if len(reports) == 1:
        reports[0].name = name
        return reports[0]
    first = reports[0]
    if first.skipped is not None:
        return LayerReport(name, shape, 0.0, 0.0, 0.0, 0, 0.0, skipped=first.skipped)
    energy = sum(den for _, den, _ in parts)

    def weighted(values: list[float]) -> float:
        if energy <= 0:
            return 0.0
        return sum(v * den for v, (_, den, _) in zip(values, parts, strict=True)) / energy

    rows = sum(r for _, _, r in parts)
    history = [sum(h) for h in zip(*(r.history for r in reports), strict=False)]
    return LayerReport(
        name,
        shape,
        sum(r.sparsity * n for r, (_, _, n) in zip(reports, parts, strict=True)) / rows,
        weighted([r.error_before for r in reports]),
        weighted([r.error_after for r in reports]),
        first.iterations,
        max(r.seconds for r in reports),
        history,
    )


# --------------------------------------------------------------------------------------------------
# the single process


Solver = Callable[[str, Tensor, Tensor], LayerReport]
"""``solve(name, weight, gram)``: prune the (out, in) view ``weight`` in place; its report."""


class Parallel:
    """The single-process implementation: nothing is shared, every method returns at once."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_windows(self, windows: Tensor, batch_size: int) -> Tensor:
        """This rank's share of ``windows`` (rows): all of them here."""
        return windows

    def reduce_statistics(self, grams: dict[Any, Tensor], *counts: dict[Any, int]) -> None:
        """Sum Gram matrices and counts over the ranks, in place: nothing to do here."""

    def union(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        """The union of every rank's ``mapping``: ``mapping`` itself here."""
        return mapping

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        return [value]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over the ranks (added in rank order)."""
        return list(values)

    def sum_tensors(self, tensors: Sequence[Tensor], error: BaseException | None = None) -> None:
        """Sum float32 ``tensors`` over the ranks, in place (block reconstruction's gradients). A rank that
        failed before passes its ``error`` (and tensors of the right shapes): every rank then raises."""
        if error is not None:
            raise error

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        """``fn()`` on rank 0; with ``share`` every rank gets its result (else ``None`` elsewhere)."""
        return fn()

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with rank 0's (same shapes and dtypes everywhere)."""

    def solve(self, jobs: Sequence[SolveJob], solve: Solver, split_rows: bool = False) -> list[LayerReport]:
        """Solve every job (in order) and return their reports."""
        return [solve(job.name, job.weight, job.gram) for job in jobs]

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a region of collective work: share a failure with the other ranks."""
        yield

    def close(self) -> None:
        pass


SINGLE = Parallel()
"""The one single-process :class:`Parallel`."""


# --------------------------------------------------------------------------------------------------
# several processes


class Distributed(Parallel):
    """``world_size`` processes in the default ``torch.distributed`` process group."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self._dist = dist
        self.group_id = id(dist.group.WORLD)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        self._in_phase = False
        self._guard_depth = 0
        self._factory = logging.getLogRecordFactory()
        prefix = f"[rank {self.rank}/{self.world_size}] "
        previous = self._factory

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if isinstance(record.msg, str) and not record.msg.startswith("[rank "):
                record.msg = prefix + record.msg
            return record

        logging.setLogRecordFactory(factory)

    def close(self) -> None:
        logging.setLogRecordFactory(self._factory)

    # ---------------------------------------------------------------------------------------------- status

    def _exchange(self, payload: Any, error: BaseException | None = None) -> list[Any]:
        """The first collective of every phase: gather each rank's ``(status, payload)``; raise the failing
        rank's error (the lowest such rank) on the others. With ``error`` (this rank failed), return so
        that the caller raises its own exception."""
        status = None if error is None else _status(self.rank, error)
        gathered: list[Any] = [None] * self.world_size
        self._in_phase = True
        self._dist.all_gather_object(gathered, (status, payload))
        failures = [s for s, _ in gathered if s is not None]
        if failures:
            self._in_phase = False
            if error is not None:
                error._maiht_shared = True  # type: ignore[attr-defined]
                return []
            rank, kind, message = min(failures)
            raise _rank_failed(rank, self.world_size, kind, message)
        return [p for _, p in gathered]

    def _end_phase(self) -> None:
        self._in_phase = False

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self._guard_depth:
            yield
            return
        self._guard_depth += 1
        try:
            yield
        except Exception as err:
            shared = isinstance(err, RankFailedError) or getattr(err, "_maiht_shared", False)
            if not shared and not self._in_phase:  # the others wait in their next phase: tell them
                self._exchange(None, err)
            raise
        else:
            self._exchange(None)  # a failure after the last phase on another rank surfaces here
            self._end_phase()
        finally:
            self._guard_depth -= 1
            self._in_phase = False

    # ---------------------------------------------------------------------------------------------- data

    def shard_windows(self, windows: Tensor, batch_size: int) -> Tensor:
        """A contiguous share: whole batches of ``batch_size`` when there are at least as many batches as
        ranks (each batch is then the one a single process would run), else single windows."""
        n, ranks, r = windows.shape[0], self.world_size, self.rank
        batches = -(-n // batch_size)
        if batches >= ranks:
            first, last = r * batches // ranks, (r + 1) * batches // ranks
            return windows[first * batch_size : min(last * batch_size, n)]
        return windows[r * n // ranks : (r + 1) * n // ranks]

    def reduce_statistics(self, grams: dict[Any, Tensor], *counts: dict[Any, int]) -> None:
        """Sum in place. Keys may be missing on some ranks (an expert no token of this rank reached, a rank
        without windows): every rank ends with the union. Several keys holding one tensor (layers reading
        the same input) are reduced once and keep sharing it."""
        aliases: dict[int, Any] = {}
        meta = []
        for key, gram in grams.items():
            first = aliases.setdefault(id(gram), key)
            meta.append((key, tuple(gram.shape), first))
        gathered = self._exchange((meta, [list(c) for c in counts]))
        order: dict[Any, tuple[tuple[int, ...], Any]] = {}
        for rank_meta, _ in gathered:
            for key, shape, first in rank_meta:
                order.setdefault(key, (shape, first))
        reduced: dict[Any, Tensor] = {}
        for key, (shape, first) in order.items():
            if first in reduced:
                grams[key] = reduced[first]
                continue
            local = grams.get(key)
            if local is None:
                local = torch.zeros(shape, dtype=torch.float32, device=self.device)
            reduced[first] = grams[key] = self._all_reduce(local)
        for index, count in enumerate(counts):
            keys: dict[Any, None] = {}
            for _, rank_counts in gathered:
                keys.update(dict.fromkeys(rank_counts[index]))
            if not keys:
                continue
            values = torch.tensor([count.get(k, 0) for k in keys], dtype=torch.int64)
            values = self._all_reduce(values)
            count.update(zip(keys, (int(v) for v in values.tolist()), strict=True))
        self._end_phase()

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        moved = tensor.to(self.comm_device) if tensor.device != self.comm_device else tensor
        self._dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def union(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for other in self._exchange(dict(mapping)):
            for key, value in other.items():
                if merged.setdefault(key, value) != value:
                    self._end_phase()
                    raise RuntimeError(f"{key}: the ranks disagree ({merged[key]!r} and {value!r})")
        self._end_phase()
        mapping.update(merged)
        return mapping

    def gather(self, value: T) -> list[T]:
        gathered = self._exchange(value)
        self._end_phase()
        return gathered

    def sum(self, values: Sequence[float]) -> list[float]:
        totals = [0.0] * len(values)
        for other in self.gather(list(values)):
            totals = [t + v for t, v in zip(totals, other, strict=True)]
        return totals

    def sum_tensors(self, tensors: Sequence[Tensor], error: BaseException | None = None) -> None:
        """One ``all_reduce`` of the tensors flattened into one buffer, plus a failure flag: this runs at
        every step of a refit, so no status exchange unless some rank failed (then the failing rank's error
        is shared as in every phase)."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.comm_device)
        buffer = torch.cat([t.reshape(-1).to(self.comm_device, torch.float32) for t in tensors] + [flag])
        self._dist.all_reduce(buffer)
        if float(buffer[-1]) > 0:
            self._exchange(None, error)  # raises the failing rank's error on the others
            raise error  # type: ignore[misc]  # only the failing rank gets here
        offset = 0
        for tensor in tensors:
            tensor.copy_(buffer[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        gathered = self._exchange(result if share and self.is_main else None, error)
        self._end_phase()
        if error is not None:
            raise error
        return gathered[0] if share else result

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        self._exchange(None)
        with torch.no_grad():
            for tensor in tensors:
                moved = tensor.to(self.comm_device) if tensor.device != self.comm_device else tensor
                self._dist.broadcast(moved, src=0)
                if moved is not tensor:
                    tensor.copy_(moved)
        self._end_phase()

    # ---------------------------------------------------------------------------------------------- solves

    def solve(self, jobs: Sequence[SolveJob], solve: Solver, split_rows: bool = False) -> list[LayerReport]:
        """Each rank solves the pieces it owns (:func:`plan_solves`); the owners' weights are broadcast and
        the reports gathered, so that every rank returns every report and holds every solved weight."""
        pieces = plan_solves([tuple(job.weight.shape) for job in jobs], self.world_size, split_rows)
        local: dict[int, tuple[dict, float, int]] = {}
        error: Exception | None = None
        try:
            for index, piece in enumerate(pieces):
                if piece.owner == self.rank:
                    local[index] = self._solve_piece(jobs[piece.job], piece, solve)
        except Exception as err:
            error = err
        gathered = self._exchange(local if error is None else None, error)
        if error is not None:
            raise error
        self._broadcast_weights(jobs, pieces)
        parts: dict[int, dict[int, tuple[dict, float, int]]] = {}
        for rank_reports in gathered:
            for index, part in rank_reports.items():
                parts.setdefault(pieces[index].job, {})[index] = part
        self._end_phase()
        return [
            _merge(job.name, list(job.weight.shape), [parts[j][i] for i in sorted(parts[j])])
            for j, job in enumerate(jobs)
        ]

    def _solve_piece(self, job: SolveJob, piece: Piece, solve: Solver) -> tuple[dict, float, int]:
        rows = piece.stop - piece.start
        if rows == job.weight.shape[0]:
            return solve(job.name, job.weight, job.gram).to_dict(), 0.0, rows
        weight = job.weight[piece.start : piece.stop]
        w0 = weight.detach().float().to(job.gram.device)
        energy = float((w0 @ job.gram.float() * w0).sum())
        report = solve(f"{job.name} rows {piece.start}:{piece.stop}", weight, job.gram)
        return report.to_dict(), energy, rows

    def _broadcast_weights(self, jobs: Sequence[SolveJob], pieces: Sequence[Piece]) -> None:
        """One broadcast per (owner, dtype): the owner's solved row ranges, flattened."""
        groups: dict[tuple[int, torch.dtype], list[Piece]] = {}
        for piece in pieces:
            groups.setdefault((piece.owner, jobs[piece.job].weight.dtype), []).append(piece)
        with torch.no_grad():
            for (owner, dtype), owned in groups.items():
                views = [jobs[p.job].weight[p.start : p.stop] for p in owned]
                if owner == self.rank:
                    buffer = torch.cat([v.reshape(-1).to(self.comm_device) for v in views])
                else:
                    buffer = torch.empty(sum(v.numel() for v in views), dtype=dtype, device=self.comm_device)
                self._dist.broadcast(buffer, src=owner)
                if owner != self.rank:
                    offset = 0
                    for view in views:
                        view.copy_(buffer[offset : offset + view.numel()].view(view.shape))
                        offset += view.numel()
