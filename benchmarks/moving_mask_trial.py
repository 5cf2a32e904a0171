"""Trial: masks that move during the block refit (iterative hard thresholding on the block loss).

The pipeline's refit (:func:`optimum_maiht.reconstruction.refit_block`) keeps the masks the layer solves
chose and refits only the kept weights. Here each pruned weight gets a dense shadow ``D`` (the pruned
weights, zeros included): every Adam step updates all of ``D`` with the gradient of the block loss taken at
the sparse weights (the straight-through estimate), and every ``--every`` steps the mask is chosen again
as the top entries of ``|D_ij| * ||X_j||`` (Wanda's score on the shadow) with each row's count kept (or
the top N of every M for N:M), so the pattern stays exact. The block runs on ``D`` masked. The held-out
batches choose the epoch exactly as in the pipeline (weights and masks of the best epoch are kept).

Runs the demo model (optionally only its first ``--blocks`` blocks, to compare held-out block errors) at
one setting with one epoch (mAIHT 5 iterations / 5 CG steps first; the calibration of the quality
benchmark), checks that every pruned layer still has its sparsity or 2:4 pattern, scores the whole model
on the quality benchmark's test windows and appends a record to ``results/moving_mask_trial.json``::

    .venv/bin/python benchmarks/moving_mask_trial.py --setting 2:4 --mode fixed  --blocks 8
    .venv/bin/python benchmarks/moving_mask_trial.py --setting 2:4 --mode moving --blocks 8
    .venv/bin/python benchmarks/moving_mask_trial.py --setting 2:4 --mode moving

Not adopted: see the benchmarks README, "Solver trials".
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
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
from torch import Tensor

import optimum_maiht.sequential as sequential
from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.distributed import SINGLE
from optimum_maiht.evaluation import perplexity
from optimum_maiht.reconstruction import PATIENCE, RefitResult, _step, output_error

RESULTS = RESULTS_DIR / "moving_mask_trial.json"
SCORES: list[Tensor] = []
"""``||X_j||`` of each refitted weight's input column, set before each block's refit."""
KEPT: list[Tensor] = []
"""The weights the last refit kept (the pipeline re-imposes the zeros the refit started from when it
leaves; :func:`column_norms` puts these back, so the moved masks stay)."""
CHURN: list[float] = []
"""Per block: the share of the kept entries that the moving refit swapped out, in the end."""


def project(shadow: Tensor, score: Tensor, counts: Tensor, nm: tuple[int, int] | None) -> Tensor:
    """The mask of the top ``|shadow| * score`` entries: ``counts[r]`` per row, or N of every M."""
    rank = shadow.abs() * score
    if nm is not None:
        n, m = nm
        groups = rank.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        return keep.reshape(shadow.shape)
    order = rank.argsort(dim=1, descending=True)
    keep = torch.arange(shadow.shape[1])[None, :] < counts[:, None]
    return torch.zeros_like(keep).scatter_(1, order, keep)


def moving_refit(nm: tuple[int, int] | None, every: int, boost: float):
    """A drop-in for ``refit_block`` whose masks move (see the module docstring)."""

    def refit(forward, params, masks, targets, train, holdout, lr, epochs, seed=0, parallel=SINGLE):
        before = output_error(forward, targets, holdout, parallel)
        start_masks = [m.clone() for m in masks]
        masks = [m.clone() for m in masks]
        counts = [m.sum(1) for m in masks]
        shadow = [p.detach().clone().requires_grad_(True) for p in params]
        optimizer = torch.optim.Adam(shadow, lr=lr)
        everything = [torch.ones_like(m) for m in masks]
        best_error, best_epoch = before, 0
        best = [(p.detach().clone(), m.clone()) for p, m in zip(params, masks, strict=True)]
        generator = torch.Generator().manual_seed(seed)
        history = []
        for epoch in range(1, epochs + 1):
            order = [train[k] for k in torch.randperm(len(train), generator=generator).tolist()]
            for step, batch in enumerate(order, 1):
                if not _step(forward, params, everything, targets, batch, parallel):
                    break
                for s, p in zip(shadow, params, strict=True):
                    s.grad = p.grad
                previous = [s.detach().clone() for s in shadow]
                optimizer.step()
                with torch.no_grad():
                    for j, (s, p) in enumerate(zip(shadow, params, strict=True)):
                        if boost != 1.0:  # the pruned entries' step, scaled
                            s.add_((s - previous[j]).masked_fill_(masks[j], 0.0), alpha=boost - 1.0)
                        if step % every == 0 or step == len(order):
                            masks[j] = project(s, SCORES[j], counts[j], nm)
                        p.copy_(s * masks[j])
            error = output_error(forward, targets, holdout, parallel)
            history.append(error)
            if error < best_error:
                best_error, best_epoch = error, epoch
                best = [(p.detach().clone(), m.clone()) for p, m in zip(params, masks, strict=True)]
            if not math.isfinite(error) or epoch - best_epoch >= PATIENCE:
                break
        with torch.no_grad():
            for (saved, _), p in zip(best, params, strict=True):
                p.copy_(saved)
        kept = sum(int(m.sum()) for m in start_masks)
        moved = sum(int((m & ~b[1]).sum()) for m, b in zip(start_masks, best, strict=True))
        CHURN.append(moved / kept)
        KEPT[:] = [p.detach().clone() for p in params]
        return RefitResult(before, best_error, best_epoch, len(history), history)

    return refit


def column_norms(reconstruct_block):
    """Wraps ``reconstruct_block``: first one pass over the block's inputs records ``||X_j||`` per layer;
    afterwards the weights the moving refit kept are put back (see :data:`KEPT`)."""

    def wrapped(index, block, targets, layers, hidden, calls, dense, config, parallel=sequential.SINGLE):
        pruned = {layer.name.partition("[")[0] for layer in layers if layer.skipped is None}
        chosen = {n: m for n, m in targets.linears.items() if n in pruned}
        sums = {n: 0.0 for n in chosen}

        def hook(name):
            def record(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums[name] + x.square().sum(0)

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in chosen.items()]
        try:
            sequential.run_calibration(block, hidden, calls)
        finally:
            for handle in handles:
                handle.remove()
        SCORES[:] = [sums[n].sqrt() for n in chosen]
        KEPT.clear()
        result = reconstruct_block(index, block, targets, layers, hidden, calls, dense, config, parallel)
        with torch.no_grad():
            for module, kept in zip(chosen.values(), KEPT, strict=True):
                module.weight.copy_(kept)
        return result

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", default="50%", choices=["50%", "2:4"])
    parser.add_argument("--mode", default="moving", choices=["fixed", "moving"])
    parser.add_argument("--every", type=int, default=8, help="Adam steps between two choices of the masks")
    parser.add_argument(
        "--boost", type=float, default=1.0, help="the pruned entries' shadow steps are this many Adam steps"
    )
    parser.add_argument("--blocks", type=int, default=0, help="first N blocks only, no perplexity (0: all)")
    parser.add_argument("--eval-windows", type=int, default=64)
    args = parser.parse_args()

    nm = (2, 4) if args.setting == "2:4" else None
    if args.mode == "moving":
        sequential.refit_block = moving_refit(nm, args.every, args.boost)
        sequential.reconstruct_block = column_norms(sequential.reconstruct_block)
    model, tokenizer, _ = load_demo()
    if args.blocks:
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
    ids = calibration_ids(tokenizer)
    config = MAIHTConfig(
        sparsity=None if nm else 0.5,
        pattern="2:4" if nm else "unstructured",
        num_samples=int(ids.shape[0]),
        sequence_length=int(ids.shape[1]),
        batch_size=8,
        iterations=5,
        refit_iterations=5,
        reconstruction_epochs=1,
        reconstruction_lr=1e-3,
    )
    start = time.perf_counter()
    pruner = MAIHTPruner(model, config, tokenizer=tokenizer, device="cpu")
    pruner.prune(ids, progress=False)
    seconds = time.perf_counter() - start
    for name, module in model.named_modules():  # the pattern is exact after the moving refit too
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            w = module.weight
            zeros = (w == 0).reshape(-1, 4).sum(1) if nm else (w == 0).sum(1)
            assert bool((zeros == (2 if nm else w.shape[1] // 2)).all()), name
    rebuilt = pruner.report.reconstruction
    record = {
        "setting": args.setting,
        "mode": args.mode,
        "every": args.every if args.mode == "moving" else None,
        "boost": args.boost if args.mode == "moving" else None,
        "blocks": args.blocks or len(rebuilt),
        "held_out_error_before": sum(b.error_before for b in rebuilt) / len(rebuilt),
        "held_out_error_after": sum(b.error_after for b in rebuilt) / len(rebuilt),
        "epochs_kept": [b.epochs for b in rebuilt],
        "mask_churn": [round(c, 4) for c in CHURN],
        "prune_seconds": round(seconds, 1),
        "ppl": None,
        "command": command_line(),
        "machine": machine(),
        "versions": versions(),
    }
    if not args.blocks:
        windows = test_windows(tokenizer, args.eval_windows)
        record["ppl"] = perplexity(model, None, windows, EVAL_LENGTH, batch_size=4)
        record["eval_windows"] = int(windows.shape[0])
    print(json.dumps({k: record[k] for k in list(record)[:11]}))
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps([*runs, record], indent=1) + "\n")


if __name__ == "__main__":
    main()
