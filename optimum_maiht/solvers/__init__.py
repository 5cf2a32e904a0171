"""Layer solvers: the seam between the pipeline and the maths (docs/design.md, "Layer solvers").

A solver takes one layer problem, the weight ``(out, in)``, the Gram matrix ``H = X^T X`` ``(in, in)`` of
the layer's calibration inputs and a :class:`LayerSpec`, and returns a :class:`SolverResult`: a pruned
copy with exactly the spec's pattern, its relative output error and Wanda's on the same ``H``. Solvers are
pure tensor functions (no model, file or Hub). :func:`make_solver` builds one by name with its options::

    solve = make_solver("sparsegpt", block_size=64)
    result = solve(weight, gram, LayerSpec(0.5, nm=(2, 4)))
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..constants import SOLVER_NAMES
from .common import LayerSpec, SolverResult, check_options, project, relative_output_error
from .maiht import maiht
from .sparsegpt import sparsegpt
from .wanda import magnitude, magnitude_prune, wanda

__all__ = [
    "SOLVER_NAMES",
    "LayerSolver",
    "LayerSpec",
    "SolverResult",
    "magnitude",
    "magnitude_prune",
    "maiht",
    "make_solver",
    "project",
    "relative_output_error",
    "solver_options",
    "sparsegpt",
    "wanda",
]

LayerSolver = Callable[[Tensor, Tensor, LayerSpec], SolverResult]
"""``(weight (out, in), gram (in, in), spec) -> SolverResult``."""

_SOLVERS: dict[str, Callable[..., SolverResult]] = dict(
    zip(SOLVER_NAMES, (maiht, sparsegpt, wanda, magnitude), strict=True)
)
"""By the names ``MAIHTConfig.solver`` takes (:data:`optimum_maiht.constants.SOLVER_NAMES`)."""


def solver_options(name: str) -> dict[str, Any]:
    """The options of solver ``name`` with their defaults (raises ValueError for an unknown name)."""
    if name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVER_NAMES)}")
    parameters = inspect.signature(_SOLVERS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


def make_solver(name: str, **options: Any) -> LayerSolver:
    """Solver ``name`` (one of :data:`SOLVER_NAMES`) with ``options`` (its own keywords) fixed.

    Unknown names, unknown options and option values out of range raise ValueError here, not at the first
    layer. mAIHT's ``start`` is a name here (``"wanda"``, ``"sparsegpt"``); a start weight of one layer
    problem is passed when calling the solver.
    """
    known = solver_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        choices = ", ".join(known) or "none"
        raise ValueError(f"solver {name!r} has no option {unknown[0]!r}; its options: {choices}")
    check_options(**options)
    return functools.partial(_SOLVERS[name], **options)
