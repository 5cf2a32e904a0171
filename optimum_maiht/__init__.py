"""optimum-maiht: one-shot pruning of causal LMs with mAIHT, an Optimum plugin.

Exports are imported lazily, so that ``optimum-cli`` (which imports our command module at start-up for
every command) does not pay for torch unless a mAIHT command actually runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "MAIHTConfig": ".configuration",
    "MAIHTPruner": ".pruner",
    "MAIHTModelForCausalLM": ".modeling",
    "LayerSpec": ".solvers",
    "SolverResult": ".solvers",
    "make_solver": ".solvers",
    "push_to_hub": ".hub",
    "enable_2of4_kernels": ".kernels",
}
__all__ = [
    "LayerSpec",
    "MAIHTConfig",
    "MAIHTModelForCausalLM",
    "MAIHTPruner",
    "SolverResult",
    "enable_2of4_kernels",
    "make_solver",
    "push_to_hub",
    "__version__",
]

if TYPE_CHECKING:
    from .configuration import MAIHTConfig
    from .hub import push_to_hub
    from .kernels import enable_2of4_kernels
    from .modeling import MAIHTModelForCausalLM
    from .pruner import MAIHTPruner
    from .solvers import LayerSpec, SolverResult, make_solver


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
