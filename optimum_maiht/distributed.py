"""Several processes under ``torchrun``: the communication the pipeline needs, and one error protocol
(docs/design.md, "Several processes").

Everything ``torch.distributed`` lives here, behind one small interface, :class:`Parallel`:

- ``shard_windows``: each rank takes a contiguous share of the calibration (or evaluation) windows, cut on
  batch boundaries whenever there are at least as many batches as ranks;
- ``reduce_statistics``: Gram matrices and integer counts summed over the ranks (float32 / int64
  ``all_reduce``), keys missing on a rank included, so every rank holds the union;
- ``gather`` / ``union`` / ``sum``: small Python values from every rank;
- ``sum_tensors``: float32 tensors summed in one ``all_reduce`` (block reconstruction's gradients);
- ``broadcast``: one rank's tensors to every rank (solved weights, a streamed run's finished blocks);
- ``on_main``: work done by rank 0 only (reading data, writing files), its result shared;
- ``guard``: the error protocol around a run. Every collective phase begins with an exchange of a status
  (``all_gather_object``) inside :meth:`Distributed._phase`; a rank that fails in its own work passes the
  error into the next phase's exchange (``gather(value, error)``, or ``guard`` on its way out), so every
  rank raises the failing rank's message (:class:`RankFailedError`, also an instance of the original
  built-in class) instead of waiting for it.

:class:`Parallel` itself is the single-process implementation: every method returns at once. :func:`current`
returns it unless the process was launched by ``torchrun`` with ``WORLD_SIZE > 1`` (or a process group of
several ranks is initialized), in which case it initializes the process group (NCCL for CUDA, gloo for
the CPU) on first use and returns a :class:`Distributed`. Nothing here changes the process beyond that:
log records of ``optimum_maiht`` get a ``[rank r/N]`` prefix only inside ``guard()``.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "OPTIMUM_MAIHT_DIST_TIMEOUT"
"""Seconds a collective may wait for the slowest rank (default 1800): only a rank that died without a
word (killed, out of host memory) is noticed this way; errors are shared at once."""
DEFAULT_TIMEOUT_S = 1800


# --------------------------------------------------------------------------------------------------
# launch detection


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (``WORLD_SIZE > 1`` in the env)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_device(device: torch.device) -> torch.device:
    """Under ``torchrun``, a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (one GPU per
    process); anything else is returned as is."""
    if device.type == "cuda" and device.index is None and (launched() or _group_size() > 1):
        index = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())
    return device


def current(device: torch.device | str = "cpu") -> Parallel:
    """The :class:`Parallel` for this process: :data:`SINGLE` unless launched by ``torchrun`` with several
    processes (or inside an initialized process group of several ranks). The first call initializes the
    default process group (``env://``, as ``torchrun`` sets it up), with NCCL when ``device`` is CUDA and
    gloo otherwise; it is destroyed when the process exits."""
    if not launched() and _group_size() <= 1:
        return SINGLE
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
        logger.info("%d processes (%s backend), this one on %s", dist.get_world_size(), backend, device)
    return SINGLE if dist.get_world_size() <= 1 else Distributed(device)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process writes files and prints: rank 0 of an initialized process group, or a single
    process (a script that checks this after ``prune()``, which joins the group under ``torchrun``). Before
    the group is joined, ``torchrun``'s ``RANK`` says (the CLI prints before it prunes)."""
    if _group_size() > 1:
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


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
# the single process


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

    def gather(self, value: T, error: BaseException | None = None) -> list[T]:
        """Every rank's ``value``, in rank order. A rank that failed in its own work passes its
        ``error``: every rank then raises (the failing one its own exception)."""
        if error is not None:
            raise error
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

    def broadcast(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s (same shapes and dtypes everywhere)."""

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around a run of collective work: share a failure with the other ranks."""
        yield


SINGLE = Parallel()
"""The one single-process :class:`Parallel`."""


# --------------------------------------------------------------------------------------------------
# several processes


class Distributed(Parallel):
    """``world_size`` processes in the default ``torch.distributed`` process group."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        nccl = dist.get_backend() == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._in_phase = False
        self._guard_depth = 0

    # ---------------------------------------------------------------------------------------------- status

    @contextlib.contextmanager
    def _phase(self, payload: Any = None, error: BaseException | None = None) -> Iterator[list[Any]]:
        """One collective phase: gather each rank's ``(status, payload)`` first, raising the failing rank's
        error (the lowest such rank) on the others; then the phase's own collectives run in the body. With
        ``error`` (this rank failed), the body gets an empty list and must raise the error itself."""
        self._in_phase = True
        try:
            status = None if error is None else _status(self.rank, error)
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, (status, payload))
            failures = [s for s, _ in gathered if s is not None]
            if failures and error is not None:
                error._maiht_shared = True  # type: ignore[attr-defined]
                yield []
            elif failures:
                rank, kind, message = min(failures)
                raise _rank_failed(rank, self.world_size, kind, message)
            else:
                yield [p for _, p in gathered]
        finally:
            self._in_phase = False

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """A failure on this rank outside a phase is sent in the exchange the others wait in; every log
        record of ``optimum_maiht`` gets a ``[rank r/N]`` prefix meanwhile."""
        if self._guard_depth:
            yield
            return
        self._guard_depth += 1
        try:
            with _rank_prefix(f"[rank {self.rank}/{self.world_size}] "):
                yield
                self.gather(None)  # a failure after the last phase on another rank surfaces here
        except Exception as err:
            shared = isinstance(err, RankFailedError) or getattr(err, "_maiht_shared", False)
            if not shared and not self._in_phase:  # the others wait in their next phase: tell them
                self.gather(None, err)
            raise
        finally:
            self._guard_depth -= 1

    # ---------------------------------------------------------------------------------------------- values

    def gather(self, value: T, error: BaseException | None = None) -> list[T]:
        with self._phase(value, error) as gathered:
            if error is not None:
                raise error
            return gathered

    def union(self, mapping: dict[Any, Any]) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for other in self.gather(dict(mapping)):
            for key, value in other.items():
                if merged.setdefault(key, value) != value:
                    raise RuntimeError(f"{key}: the ranks disagree ({merged[key]!r} and {value!r})")
        mapping.update(merged)
        return mapping

    def sum(self, values: Sequence[float]) -> list[float]:
        totals = [0.0] * len(values)
        for other in self.gather(list(values)):
            totals = [t + v for t, v in zip(totals, other, strict=True)]
        return totals

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        gathered = self.gather(result if share and self.is_main else None, error)
        return gathered[0] if share else result

    # ---------------------------------------------------------------------------------------------- tensors

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
        meta = [(key, tuple(gram.shape), aliases.setdefault(id(gram), key)) for key, gram in grams.items()]
        with self._phase((meta, [list(c) for c in counts])) as gathered:
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
                keys = dict.fromkeys(k for _, rank_counts in gathered for k in rank_counts[index])
                if keys:
                    values = self._all_reduce(
                        torch.tensor([count.get(k, 0) for k in keys], dtype=torch.int64)
                    )
                    count.update(zip(keys, (int(v) for v in values.tolist()), strict=True))

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        moved = tensor.to(self.comm_device) if tensor.device != self.comm_device else tensor
        dist.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def sum_tensors(self, tensors: Sequence[Tensor], error: BaseException | None = None) -> None:
        """One ``all_reduce`` of the tensors flattened into one buffer, plus a failure flag: this runs at
        every step of a refit, so no status exchange unless some rank failed (then the failing rank's error
        is shared as in every phase)."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.comm_device)
        buffer = torch.cat([t.reshape(-1).to(self.comm_device, torch.float32) for t in tensors] + [flag])
        self._in_phase = True
        try:
            dist.all_reduce(buffer)
        finally:
            self._in_phase = False
        if float(buffer[-1]) > 0:  # some rank failed: every rank raises (the failing one its own error)
            self.gather(None, error)
        offset = 0
        for tensor in tensors:
            tensor.copy_(buffer[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()

    def broadcast(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        with self._phase(), torch.no_grad():
            for tensor in tensors:
                moved = tensor.to(self.comm_device) if tensor.device != self.comm_device else tensor
                dist.broadcast(moved, src=src)
                if moved is not tensor:
                    tensor.copy_(moved)


@contextlib.contextmanager
def _rank_prefix(prefix: str) -> Iterator[None]:
    """Prefix the messages of ``optimum_maiht``'s log records with ``prefix`` while inside."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.startswith("optimum_maiht") and isinstance(record.msg, str):
            record.msg = prefix + record.msg
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)
