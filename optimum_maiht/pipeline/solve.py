"""The solve stage: every target of a block pruned by the layer solver, the problems spread over the ranks
(docs/design.md, "The pipeline", "Layer solvers", "Several processes").

The solver is a pure tensor function ``(weight, gram, spec) -> SolverResult`` (:mod:`optimum_maiht.solvers`);
this stage builds each layer's :class:`~optimum_maiht.solvers.LayerSpec` from the configuration (the
sparsity plan), collects the statistics in the right order (fused experts in groups of
``experts_per_pass``, one calibration pass each, the linear layers last), plans which rank solves what,
and turns results into :class:`~optimum_maiht.report.LayerReport` objects.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..configuration import MAIHTConfig
from ..distributed import Parallel
from ..experts import expert_groups
from ..report import LayerReport
from ..solvers import LayerSolver, LayerSpec, make_solver
from ..targets import BlockTargets, matching
from .statistics import GramCollector, LayerProblem, expert_problems

logger = logging.getLogger(__name__)

SPLIT_SHARE = 2
"""A layer whose cost exceeds ``1 / (SPLIT_SHARE * world_size)`` of its block is cut into row ranges."""

Status = Callable[[str], None]
"""Told what runs now (a layer's name before its solve): the progress bar's postfix."""


def _no_status(step: str) -> None:
    pass


@dataclass
class Solving:
    """What the solve stage needs besides the block: the configuration, the layer solver, the ranks."""

    config: MAIHTConfig
    solver: LayerSolver
    parallel: Parallel
    status: Status = _no_status
    named: bool = True
    """The solver is the configuration's (``False``: an experiment's own function)."""

    @classmethod
    def from_config(
        cls, config: MAIHTConfig, parallel: Parallel, solver: LayerSolver | None = None
    ) -> Solving:
        """``solver`` (an experiment's own function), else the configuration's named solver."""
        if solver is not None:
            return cls(config, solver, parallel, named=False)
        return cls(config, configured_solver(config), parallel)


def configured_solver(config: MAIHTConfig) -> LayerSolver:
    """The solver ``config.solver`` names, with the configuration's options for it."""
    if config.solver == "maiht":
        options = dict(
            iterations=config.iterations,
            refit_iterations=config.refit_iterations,
            ridge=config.ridge,
            formulation=config.formulation,
            seed=config.seed,
            start=config.start,
        )
        return make_solver("maiht", **options)
    return make_solver(config.solver)


def layer_spec(name: str, config: MAIHTConfig) -> LayerSpec:
    """The sparsity the layer ``name`` is pruned to: the first ``layer_sparsity`` pattern that matches its
    name, else the configuration's ``sparsity`` (uniform), with the configuration's pattern and scope."""
    pattern = matching(list(config.layer_sparsity), name, "layer_sparsity")
    sparsity = config.layer_sparsity[pattern] if pattern is not None else config.sparsity
    return LayerSpec(sparsity=sparsity, nm=config.nm, scope=config.scope)


def solve_block(targets: BlockTargets, run_block: Callable[..., Any], solving: Solving) -> list[LayerReport]:
    """Collect the Gram matrices of one block's targets from the dense block and prune them.

    Fused experts are handled in groups of ``experts_per_pass`` (one calibration pass each, so that only
    that many experts' Grams are held at once) and solved right after their pass: an expert's inputs
    depend only on the layers before the router and on its own first projection, so pruning one group
    does not change the next group's statistics. The linear layers' Grams come from the first pass and
    they are solved last, so every pass sees the same dense block.
    """
    if not targets:
        return []
    config = solving.config
    collector = GramCollector(targets.linears) if targets.linears else None
    reports: list[LayerReport] = []
    try:
        groups = expert_groups(targets.experts, config.experts_per_pass) if targets.experts else [[]]
        for number, group in enumerate(groups):
            first = number == 0
            if not group:
                run_block(after_batch=collector.end_batch if collector else None)
            else:
                pass_collector = collector if first else None
                problems = expert_problems(
                    targets.experts, group, run_block, config, pass_collector, solving.parallel
                )
                reports += solve_problems(problems, solving)
            if first and collector is not None:
                collector.remove()
    finally:
        if collector is not None:
            collector.remove()
    if collector is not None:
        reports = solve_problems(collector.problems(targets.linears, solving.parallel), solving) + reports
    return reports


# --------------------------------------------------------------------------------------------------
# solving a list of problems, shared out over the ranks


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of problem ``job``, solved by rank ``owner``."""

    job: int
    start: int
    stop: int
    owner: int
    cost: float


def plan_solves(shapes: Sequence[Sequence[int]], world_size: int, split_rows: bool) -> list[Piece]:
    """Assign the layer problems of ``shapes`` (out, in) to ``world_size`` ranks, deterministically.

    Cost ``out * in^2`` (an iteration's ``(out x in) @ (in x in)`` products). With ``split_rows`` (a
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


def row_separable(solving: Solving) -> bool:
    """Whether a layer's rows are independent problems given its Gram matrix: N:M or a per-row count, and
    for mAIHT only in the constraint form (the penalty form adapts one threshold for the whole matrix).
    An experiment's own solver is never cut into rows: nothing says it treats rows independently."""
    config = solving.config
    if not solving.named or (config.nm is None and config.scope != "row"):
        return False
    return not (config.solver == "maiht" and config.formulation == "penalty")


def solve_problems(problems: list[LayerProblem], solving: Solving) -> list[LayerReport]:
    """Solve every problem in place and return their reports, in order. With several ranks each rank
    solves the pieces it owns (:func:`plan_solves`); the solved rows are broadcast and the reports
    gathered, so that every rank returns every report and holds every solved weight."""
    parallel = solving.parallel
    if parallel.world_size == 1:
        reports = [_solve(p.name, p.weight, p.gram, solving) for p in problems]
    else:
        reports = _solve_shared(problems, solving)
    for report, problem in zip(reports, problems, strict=True):
        for key, value in problem.extra.items():
            setattr(report, key, value)
    return reports


def _solve_shared(problems: list[LayerProblem], solving: Solving) -> list[LayerReport]:
    parallel = solving.parallel
    split = row_separable(solving)
    pieces = plan_solves([tuple(p.weight.shape) for p in problems], parallel.world_size, split)
    local: dict[int, tuple[dict, float, int]] = {}
    error: Exception | None = None
    try:
        for index, piece in enumerate(pieces):
            if piece.owner == parallel.rank:
                local[index] = _solve_piece(problems[piece.job], piece, solving)
    except Exception as err:
        error = err
    gathered = parallel.gather(local if error is None else None, error)
    _share_solved_rows(problems, pieces, parallel)
    parts: dict[int, dict[int, tuple[dict, float, int]]] = {}
    for rank_reports in gathered:
        for index, part in rank_reports.items():
            parts.setdefault(pieces[index].job, {})[index] = part
    return [
        merge_reports(p.name, list(p.weight.shape), [parts[j][i] for i in sorted(parts[j])])
        for j, p in enumerate(problems)
    ]


def _solve_piece(problem: LayerProblem, piece: Piece, solving: Solving) -> tuple[dict, float, int]:
    """One piece's report, the output energy ``tr(W0 H W0^T)`` of its rows (0 for a whole layer) and its
    row count."""
    rows = piece.stop - piece.start
    if rows == problem.weight.shape[0]:
        return _solve(problem.name, problem.weight, problem.gram, solving).to_dict(), 0.0, rows
    weight = problem.weight[piece.start : piece.stop]
    w0 = weight.detach().float().to(problem.gram.device)
    energy = float((w0 @ problem.gram.float() * w0).sum())
    report = _solve(f"{problem.name} rows {piece.start}:{piece.stop}", weight, problem.gram, solving)
    return report.to_dict(), energy, rows


def _share_solved_rows(problems: list[LayerProblem], pieces: list[Piece], parallel: Parallel) -> None:
    """One broadcast per (owner, dtype): the owner's solved row ranges, flattened."""
    groups: dict[tuple[int, torch.dtype], list[Piece]] = {}
    for piece in pieces:
        groups.setdefault((piece.owner, problems[piece.job].weight.dtype), []).append(piece)
    with torch.no_grad():
        for (owner, dtype), owned in groups.items():
            views = [problems[p.job].weight[p.start : p.stop] for p in owned]
            if owner == parallel.rank:
                buffer = torch.cat([v.reshape(-1) for v in views])
            else:
                buffer = torch.empty(sum(v.numel() for v in views), dtype=dtype, device=views[0].device)
            parallel.broadcast([buffer], src=owner)
            if owner != parallel.rank:
                offset = 0
                for view in views:
                    view.copy_(buffer[offset : offset + view.numel()].view(view.shape))
                    offset += view.numel()


def merge_reports(name: str, shape: list[int], parts: list[tuple[dict, float, int]]) -> LayerReport:
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
        weighted([r.error_wanda for r in reports]),
        weighted([r.error for r in reports]),
        first.iterations,
        max(r.seconds for r in reports),
        history,
    )


def _solve(name: str, weight: Tensor, gram: Tensor, solving: Solving) -> LayerReport:
    """Prune the (out, in) view ``weight`` in place with the layer solver on the Gram matrix ``gram``."""
    solving.status(name)
    shape = list(weight.shape)
    spec = layer_spec(name, solving.config)
    if spec.nm is not None and shape[1] % spec.nm[1]:
        pattern = solving.config.pattern
        reason = f"input size {shape[1]} is not a multiple of M={spec.nm[1]} for pattern {pattern}"
        logger.warning("skipping %s: %s", name, reason)
        return LayerReport(name, shape, 0.0, 0.0, 0.0, 0, 0.0, skipped=reason)
    start = time.perf_counter()
    result = solving.solver(weight.detach(), gram, spec)
    with torch.no_grad():
        weight.copy_(result.weight)
    seconds = time.perf_counter() - start
    sparsity = float((result.weight == 0).float().mean())
    logger.info(
        "%s: sparsity %.3f, relative error %.4g (Wanda's mask: %.4g) (%.2fs)",
        name,
        sparsity,
        result.error,
        result.error_wanda,
        seconds,
    )
    return LayerReport(
        name, shape, sparsity, result.error_wanda, result.error, result.iterations, seconds, result.history
    )
