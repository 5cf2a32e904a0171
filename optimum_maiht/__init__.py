"""optimum-maiht: one-shot pruning of causal LMs with mAIHT, an Optimum plugin.

Exports are imported lazily, so that ``optimum-cli`` (which imports our command module at start-up for
every command) does not pay for torch unless a mAIHT command actually runs.

The compact format is registered with transformers (:mod:`optimum_maiht.quantizer`) when transformers
loads ``transformers.modeling_utils`` (every ``from_pretrained`` of a model does), or now if it already
has: after ``import optimum_maiht``, ``AutoModelForCausalLM.from_pretrained`` loads compact folders, and
the import itself stays cheap (an import hook, no transformers).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType
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


_TRIGGER = "transformers.modeling_utils"


class _RegisterWithTransformers:
    """Imports :mod:`optimum_maiht.quantizer` (which registers the compact format) right after
    ``transformers.modeling_utils`` has been executed, once (a meta path finder; not derived from
    ``importlib.abc.MetaPathFinder``, whose import alone costs ~70 ms)."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register() -> None:
    """Import the quantizer module; a failure there must not break transformers for everyone else."""
    try:
        importlib.import_module(".quantizer", __name__)
    except Exception as err:  # reported, never raised into transformers' import
        logging.getLogger(__name__).warning(
            "optimum_maiht could not register its compact format with transformers (%s: %s); compact folders "
            "will not load with AutoModelForCausalLM",
            type(err).__name__,
            err,
        )


if _TRIGGER in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
