"""One pruning run: the calibration windows prepared, the pipeline run on the model, the report written.
``MAIHTPruner.prune`` (the model in memory) and ``MAIHTPruner.prune_to_folder`` (streamed) both call
:func:`prune_model`; only their store differs."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..configuration import MAIHTConfig
from ..constants import DEFAULT_CALIBRATION_TEXT
from ..data import CalibrationData, describe_data, prepare_calibration
from ..distributed import SINGLE, Parallel
from ..evaluation import capped_sequence_length
from ..report import PruneReport, library_versions
from ..solvers import LayerSolver
from .sequential import prune_sequential
from .store import IN_MEMORY, BlockStore

logger = logging.getLogger(__name__)


def prune_model(
    model: nn.Module,
    calibration_dataset: CalibrationData | None,
    config: MAIHTConfig,
    *,
    tokenizer: Any | None,
    device: torch.device,
    parallel: Parallel = SINGLE,
    store: BlockStore = IN_MEMORY,
    offload_activations: bool | None = None,
    solver: LayerSolver | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place on ``calibration_dataset`` (``None``: the bundled WikiText-2 validation
    excerpt; rank 0 reads it and shares the windows) and return the run's report. The other arguments are
    :func:`~optimum_maiht.pipeline.sequential.prune_sequential`'s."""
    if calibration_dataset is None:
        logger.info("no calibration data given: using the bundled WikiText-2 validation excerpt")
        calibration_dataset = DEFAULT_CALIBRATION_TEXT
    length = lambda: capped_sequence_length(model, config.sequence_length)  # noqa: E731
    windows = lambda: prepare_calibration(  # noqa: E731
        calibration_dataset, tokenizer, config.num_samples, length(), config.seed
    )
    input_ids = parallel.on_main(windows, share=True)
    logger.info("calibrating on %d windows of %d tokens on %s", *input_ids.shape, device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        result = prune_sequential(
            model,
            input_ids,
            config,
            device=device,
            progress=progress and parallel.is_main,
            parallel=parallel,
            store=store,
            offload_activations=offload_activations,
            solver=solver,
        )
    finally:
        model.train(was_training)
    calibration = {
        "source": describe_data(calibration_dataset),
        "num_samples": int(input_ids.shape[0]),
        "sequence_length": int(input_ids.shape[1]),
        "tokens": int(input_ids.numel()),
        "seed": config.seed,
    }
    return PruneReport(
        config=config.to_dict(),
        layers=result.layers,
        kept_dense=result.kept_dense,
        block_seconds=result.block_seconds,
        block_dtypes=result.block_dtypes,
        reconstruction=result.reconstruction if config.reconstruction_epochs > 0 else None,
        base_model=getattr(getattr(model, "config", None), "name_or_path", None),
        calibration=calibration,
        device=str(device),
        seconds=round(time.perf_counter() - start, 2),
        versions=library_versions(),
        world_size=parallel.world_size,
        solver=config.solver if solver is None else solver_name(solver),
    )


def solver_name(solver: LayerSolver) -> str:
    """What the report calls an experiment's own solver: its function's name (through
    ``functools.partial``, e.g. ``make_solver``'s), else ``"custom"``."""
    function = getattr(solver, "func", solver)
    return getattr(function, "__name__", None) or "custom"
