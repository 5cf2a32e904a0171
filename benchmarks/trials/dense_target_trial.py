"""Trial (not adopted): dense targets in the layer problem, on the demo model, without block reconstruction.

The pipeline's layer problem fits the dense layer on the *pruned* model's inputs,
``min ||X_p W^T - X_p W0^T||^2``. With dense targets it fits the dense model's output instead,
``min ||X_p W^T - X_d W0^T||^2`` (``X_d``: the dense model's inputs of the same tokens), whose unconstrained
solution is ``W* = W0 C^T H^-1`` with ``H = X_p^T X_p`` and the cross Gram ``C = X_p^T X_d``. Up to a
constant this is the pipeline's problem with ``W0`` replaced by ``W*``, so mAIHT runs unchanged on ``W*``.
``W*`` is computed as ``W0 + W0 (C - H)^T (H + damp diag(H))^-1`` so that the damping only touches the
correction (block 0, where ``X_p = X_d``, gets exactly ``W0``).

Each run prunes every ``nn.Linear`` of the 30 blocks at 50% or 2:4 (mAIHT, 5 iterations / 5 CG steps),
carries the dense activations beside the pruned ones, records each block's output error against the dense
block (mean over tokens of the relative squared error) and the perplexity of the quality benchmark, and
appends a record to ``benchmarks/results/dense_target_trial.json``. It runs its own block loop on the
pipeline's public stages (``capture_block_inputs``, ``token_errors``) and the ``maiht`` layer solver, since
its statistics (the cross Gram of paired dense and pruned passes) are not the pipeline's::

    .venv/bin/python benchmarks/trials/dense_target_trial.py --mode plain --setting 50%
    .venv/bin/python benchmarks/trials/dense_target_trial.py --mode dense --setting 50% --damp 1.0

``--token-weights`` weights each token's row in both Gram matrices by ``1 / mean square`` of its residual
entering the block, the per-token normalisation of the block reconstruction's loss (the few tokens with
massive activations then count no more than any other).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_common

from bench_common import (
    EVAL_LENGTH,
    RESULTS_DIR,
    calibration_ids,
    command_line,
    load_demo,
    machine,
    test_windows,
    versions,
)
from torch import nn

from optimum_maiht.evaluation import perplexity
from optimum_maiht.pipeline.capture import Placement, capture_block_inputs
from optimum_maiht.pipeline.reconstruct import token_errors
from optimum_maiht.solvers import LayerSpec, make_solver

RESULTS = RESULTS_DIR / "dense_target_trial.json"
SOLVE = make_solver("maiht", iterations=5, refit_iterations=5)


def dense_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """``W0 C^T H^-1`` as ``W0 + W0 (C - H)^T (H + damp diag H)^-1`` (``gram`` H, ``cross`` C)."""
    damped = gram.clone()
    damped.diagonal().mul_(1.0 + damp)
    return weight + torch.linalg.solve(damped, (cross - gram) @ weight.T).T


class PairedStatistics:
    """Forward pre-hooks on ``layers``: in a dense pass they keep each layer's inputs; in the pruned pass
    of the same windows they add ``X_p^T X_p`` (and, with ``cross``, ``X_p^T X_d``)."""

    def __init__(self, layers: dict[str, nn.Module], cross: bool):
        self.grams: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.with_cross = cross
        self.pruned_pass = True
        self.token_weights: torch.Tensor | None = None
        """Set per batch: each token's weight in both Gram matrices (``None``: all 1)."""
        self._dense_inputs: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if self.token_weights is not None:
                x = x * self.token_weights.sqrt()[:, None]
            if not self.pruned_pass:
                self._dense_inputs[name] = x
                return
            if name not in self.grams:
                self.grams[name] = torch.zeros(x.shape[1], x.shape[1])
                self.cross[name] = torch.zeros(x.shape[1], x.shape[1])
            self.grams[name].addmm_(x.T, x)
            if self.with_cross:
                self.cross[name].addmm_(x.T, self._dense_inputs[name])

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def run(mode: str, setting: str, damp: float, weighted: bool) -> dict:
    model, tokenizer, _ = load_demo()
    blocks = model.model.layers
    dense_blocks = copy.deepcopy(blocks)
    ids = calibration_ids(tokenizer)
    hidden, calls = capture_block_inputs(model, blocks, ids, 8, Placement(torch.device("cpu")))
    dense = list(hidden)
    nm, sparsity = ((2, 4), 0.5) if setting == "2:4" else (None, float(setting.rstrip("%")) / 100)
    errors = []
    start = time.perf_counter()
    for i, block in enumerate(blocks):
        layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = PairedStatistics(layers, cross=mode == "dense")
        for k, call in enumerate(calls[i]):
            if weighted:  # 1 / the mean square of each token's residual entering the (pruned) block
                stats.token_weights = (
                    hidden[k].float().square().mean(-1).clamp_min(1e-12).reciprocal().reshape(-1)
                )
            if mode == "dense":
                stats.pruned_pass = False
                call.run(block, dense[k])  # the block is still dense: the dense model's layer inputs
            stats.pruned_pass = True
            call.run(block, hidden[k])
        stats.remove()
        grams, cross = stats.grams, stats.cross
        for name, layer in layers.items():
            weight = layer.weight.float()
            if mode == "dense":
                weight = dense_target(weight, grams[name], cross[name], damp)
            result = SOLVE(weight, grams[name], LayerSpec(sparsity, nm))
            layer.weight.copy_(result.weight)
        hidden = [call.run(block, h) for call, h in zip(calls[i], hidden, strict=True)]
        dense = [call.run(dense_blocks[i], d) for call, d in zip(calls[i], dense, strict=True)]
        errors.append(
            sum(float(token_errors(h, d).mean()) for h, d in zip(hidden, dense, strict=True)) / len(hidden)
        )
    seconds = time.perf_counter() - start
    ppl = perplexity(model, None, test_windows(tokenizer, 64), EVAL_LENGTH, batch_size=4)
    return {
        "mode": mode,
        "setting": setting,
        "damp": damp if mode == "dense" else None,
        "token_weights": "1 / mean square of the block input" if weighted else None,
        "perplexity": float(ppl),
        "block_errors": [round(e, 5) for e in errors],
        "seconds": round(seconds, 1),
        "machine": machine(),
        "versions": versions(),
        "command": command_line(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["plain", "dense"], required=True)
    parser.add_argument("--setting", default="50%", help="50%%, 60%%, ... or 2:4")
    parser.add_argument("--damp", type=float, default=1.0, help="relative damping of the correction")
    parser.add_argument(
        "--token-weights",
        action="store_true",
        help="weight each token in both Grams by 1 / the mean square of its residual entering the block",
    )
    args = parser.parse_args()
    record = run(args.mode, args.setting, args.damp, args.token_weights)
    records = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*records, record], indent=1) + "\n")
    print(
        json.dumps(
            {k: record[k] for k in ("mode", "setting", "damp", "token_weights", "perplexity", "seconds")}
        )
    )


if __name__ == "__main__":
    main()
