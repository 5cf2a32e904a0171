"""Several processes: measured on this CPU for the demo model, and on paper for Llama-3 on H100s.

    python benchmarks/distributed.py                 # all measured runs + the model on paper
    python benchmarks/distributed.py --paper-only    # only the model on paper (seconds)
    -> results/distributed.{json,md}

Measured: the offline demo model (SmolLM2-135M-Instruct, fp32, 30 blocks) pruned whole at the defaults
(50% unstructured; 2:4 too) on 16 x 256 tokens of WikiText-2 validation (`bench_common.calibration_ids`),
evaluated on the first 16 windows of 512 tokens of WikiText-2 test through ``prune(eval_dataset=...)``
(split over the ranks when there are several). Each run is a subprocess: ``python`` for one process, and
``torchrun --standalone --nproc_per_node 2`` for two (gloo; torchrun gives each process 1 thread). The
times are ``report.seconds`` (calibration forwards, Gram matrices, solves, communication; not the
evaluation) and ``report.block_seconds``. Rank 0 also saves the masks, so that the runs' masks and
per-layer errors are compared.

On paper: per decoder block, the forward flops (2 passes: the Gram pass and the propagation pass,
``2 * tokens * params`` each plus attention), the Gram accumulation (``2 * tokens * in^2`` per distinct
input, fp32), the solves (``SOLVE_PRODUCTS`` products ``(out x in) @ (in x in)`` per matrix, fp32,
spread over the ranks by ``optimum_maiht.pipeline.solve.plan_solves``: the time is the most loaded rank's),
the Gram all-reduce (ring: ``2 (W-1)/W`` times the Gram bytes through each GPU) and the weight broadcasts
(each GPU receives the ``(W-1)/W`` of the block's bf16 weights it did not solve).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    BEFORE_29,
    RESULTS_DIR,
    calibration_ids,
    command_line,
    load_demo,
    machine,
    test_windows,
    versions,
)

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.distributed import is_main_process
from optimum_maiht.pipeline.solve import plan_solves

CALIB_SAMPLES, CALIB_LENGTH, EVAL_WINDOWS = 16, 256, 16

SOLVE_PRODUCTS = 75
"""(out x in) @ (in x in) products per matrix at the defaults: 1 to start, 2 per iteration x 20, 1 per CG
step x 30 (the 71 of benchmarks/moe_block_time.py), plus 4 for the two relative errors of the report."""
GPU_FP32_FLOPS = 50e12  # H100 SXM, fp32 matmul (TF32 off, as torch's default), sustained (peak 67)
GPU_BF16_FLOPS = 400e12  # H100 SXM, bf16 forward matmuls, sustained (peak 989 dense)
NVLINK_BYTES = 450e9  # per GPU, NVLink 4 (900 GB/s bidirectional), what an NCCL ring reaches
CALIBRATION_TOKENS = 128 * 2048  # MAIHTConfig defaults: num_samples x sequence_length

PAPER_MODELS = {
    # hidden, MLP intermediate, blocks, q / kv projection outputs, window for attention flops
    "Llama-3-8B": dict(hidden=4096, inter=14336, blocks=32, q=4096, kv=1024),
    "Llama-3-70B": dict(hidden=8192, inter=28672, blocks=80, q=8192, kv=1024),
}
GPUS = (1, 4, 8)


# --------------------------------------------------------------------------------------------------
# on paper


def on_paper(name: str, m: dict, world: int) -> dict:
    """Seconds of the whole model on ``world`` H100s (one node, NVLink), from flop and byte counts."""
    h, i, q, kv = m["hidden"], m["inter"], m["q"], m["kv"]
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]  # q k v o gate up down (out, in)
    params = sum(o * d for o, d in shapes)
    distinct_inputs = [h, q, h, i]  # q/k/v share the input, o, gate/up share it, down
    tokens = CALIBRATION_TOKENS / world
    attention = 2 * 2 * tokens * 2048 * q / 2  # QK^T and AV, causal half
    forward = 2 * (2 * tokens * params + attention)
    gram = 2 * tokens * sum(d * d for d in distinct_inputs)
    pieces = plan_solves(shapes, world, split_rows=True)
    energy = sum(p.cost for p in pieces if p.stop - p.start != shapes[p.job][0])  # split pieces: +1 product
    loads = [0.0] * world
    for p in pieces:
        products = SOLVE_PRODUCTS + (1 if p.stop - p.start != shapes[p.job][0] else 0)
        loads[p.owner] += 2 * products * p.cost
    solve_total = sum(loads)
    gram_bytes = 4 * sum(d * d for d in distinct_inputs)
    allreduce_bytes = 2 * (world - 1) / world * gram_bytes
    broadcast_bytes = (world - 1) / world * 2 * params  # bf16 weights each GPU receives
    seconds = {
        "forward": forward / GPU_BF16_FLOPS,
        "gram": gram / GPU_FP32_FLOPS,
        "solve": max(loads) / GPU_FP32_FLOPS,
        "allreduce": allreduce_bytes / NVLINK_BYTES,
        "broadcast": broadcast_bytes / NVLINK_BYTES,
    }
    block = sum(seconds.values())
    return {
        "model": name,
        "gpus": world,
        "block_params_m": round(params / 1e6, 1),
        "forward_tflop_per_gpu": round(forward / 1e12, 1),
        "gram_tflop_per_gpu": round(gram / 1e12, 1),
        "solve_tflop_total": round(solve_total / 1e12, 1),
        "solve_tflop_busiest_gpu": round(max(loads) / 1e12, 1),
        "solve_balance": round(max(loads) / (solve_total / world), 3),
        "split_products_tflop": round(2 * energy / 1e12, 2),
        "allreduce_gb_per_gpu": round(allreduce_bytes / 1e9, 2),
        "broadcast_gb_per_gpu": round(broadcast_bytes / 1e9, 2),
        "seconds_per_block": {k: round(v, 3) for k, v in seconds.items()},
        "block_seconds": round(block, 2),
        "minutes": round(block * m["blocks"] / 60, 1),
    }


def paper() -> list[dict]:
    rows = [on_paper(name, m, w) for name, m in PAPER_MODELS.items() for w in GPUS]
    for row in rows:
        one = next(r for r in rows if r["model"] == row["model"] and r["gpus"] == 1)
        row["speedup"] = round(one["block_seconds"] / row["block_seconds"], 2)
    return rows


# --------------------------------------------------------------------------------------------------
# measured


def run(out: Path, pattern: str, threads: int) -> None:
    """One pruning run (this process is one rank, or the only process); rank 0 writes ``out``."""
    torch.set_num_threads(threads)
    model, tokenizer, _ = load_demo()
    calib = calibration_ids(tokenizer, CALIB_SAMPLES, CALIB_LENGTH)
    windows = test_windows(tokenizer, EVAL_WINDOWS)
    pruner = MAIHTPruner(model, MAIHTConfig(pattern=pattern, **BEFORE_29), tokenizer, device="cpu")
    start = time.perf_counter()
    pruner.prune(calib, eval_dataset=windows, eval_max_windows=None, progress=False)
    wall = time.perf_counter() - start
    if not is_main_process():
        return
    report = pruner.report
    modules = dict(model.named_modules())
    masks = {layer.name: modules[layer.name].weight == 0 for layer in report.pruned}
    torch.save(masks, out.with_suffix(".masks.pt"))
    record = {
        "pattern": pattern,
        "world_size": report.world_size,
        "threads_per_process": torch.get_num_threads(),
        "seconds": report.seconds,
        "wall_seconds_with_evaluation": round(wall, 1),
        "block_seconds": report.block_seconds,
        "perplexity_before": report.evaluation["perplexity_before"],
        "perplexity_after": report.evaluation["perplexity_after"],
        "sparsity": report.sparsity,
        "errors": {layer.name: layer.error for layer in report.pruned},
    }
    out.write_text(json.dumps(record))


def launch(pattern: str, processes: int, threads: int, folder: Path) -> dict:
    out = folder / f"{pattern.replace(':', 'of')}-{processes}p{threads}t.json"
    me = [str(Path(__file__).resolve()), "--record", str(out), "--pattern", pattern]
    me += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, *me]
    else:
        torchrun = shutil.which("torchrun") or "torchrun"
        command = [torchrun, "--standalone", f"--nproc_per_node={processes}", *me]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)
    record = json.loads(out.read_text())
    record["masks"] = str(out.with_suffix(".masks.pt"))
    record["command"] = " ".join(command).replace(str(Path(__file__).resolve()), "benchmarks/distributed.py")
    return record


def compare(a: dict, b: dict) -> dict:
    """Mask agreement and per-layer error differences between two runs of the same pattern."""
    ma, mb = torch.load(a["masks"]), torch.load(b["masks"])
    same = sum(int((ma[n] == mb[n]).sum()) for n in ma)
    total = sum(ma[n].numel() for n in ma)
    rel = [abs(a["errors"][n] - b["errors"][n]) / max(a["errors"][n], 1e-30) for n in a["errors"]]
    worst = min(float((ma[n] == mb[n]).float().mean()) for n in ma)
    return {
        "mask_agreement": same / total,
        "worst_layer_mask_agreement": worst,
        "max_relative_error_difference": max(rel),
        "median_relative_error_difference": sorted(rel)[len(rel) // 2],
        "perplexity_relative_difference": b["perplexity_after"] / a["perplexity_after"] - 1,
    }


# --------------------------------------------------------------------------------------------------
# report


def markdown(result: dict) -> str:
    lines = ["# Several processes", ""]
    if result.get("measured"):
        info = result["machine"]
        lines += [
            f"Measured on {info['cpu']} ({info['cores']} cores, shared with other work), torch "
            f"{result['versions'].get('torch')}: the demo model (SmolLM2-135M-Instruct, fp32, 30 blocks) "
            f"pruned whole at the defaults on {CALIB_SAMPLES} x {CALIB_LENGTH} tokens of WikiText-2 "
            "validation; "
            f"perplexity on the first {EVAL_WINDOWS} windows of 512 tokens of WikiText-2 test. `seconds` is "
            "the pruning (calibration, Grams, solves, communication), without the evaluation.",
            "",
            "| pattern | processes x threads | seconds | mean block (s) | perplexity dense "
            "| perplexity pruned |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in result["measured"]:
            mean = sum(r["block_seconds"]) / len(r["block_seconds"])
            lines.append(
                f"| {r['pattern']} | {r['world_size']} x {r['threads_per_process']} | {r['seconds']:.1f} | "
                f"{mean:.2f} | {r['perplexity_before']:.3f} | {r['perplexity_after']:.3f} |"
            )
        lines += [
            "",
            "What this measures: the machine has 2 cores, so `2 x 1` (two processes of one thread, gloo) "
            "against `1 x 2` (one process using both cores through torch's threads) compares two ways of "
            "using the same cores, not more hardware; `1 x 1` is the one-core baseline that the two "
            "processes should halve. On GPUs each process brings its own GPU.",
            "",
            "Two processes against one (same pattern, `1 x 1` run as the reference):",
            "",
            "| pattern | masks equal | worst layer | max rel. error diff. | perplexity diff. |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in result["comparisons"]:
            lines.append(
                f"| {c['pattern']} | {100 * c['mask_agreement']:.4f}% | "
                f"{100 * c['worst_layer_mask_agreement']:.3f}% | {c['max_relative_error_difference']:.2e} | "
                f"{100 * c['perplexity_relative_difference']:+.4f}% |"
            )
        lines.append("")
    lines += [
        "## On paper: Llama-3 on H100s (one node, NVLink)",
        "",
        f"Assumptions: fp32 matmul {GPU_FP32_FLOPS / 1e12:.0f} TFLOP/s (solves, Gram matrices), bf16 "
        f"{GPU_BF16_FLOPS / 1e12:.0f} TFLOP/s (forwards), NVLink {NVLINK_BYTES / 1e9:.0f} GB/s per GPU, "
        f"{CALIBRATION_TOKENS // 2048} x 2048 calibration tokens (the defaults), {SOLVE_PRODUCTS} "
        "`(out x in) @ (in x in)` products per matrix (+1 per row range of a split layer), 2 forward passes "
        "per block, blocks one after the other; loading the weights and the embedding forward are left out.",
        "",
        "| model | GPUs | forward (s) | Gram (s) | solves (s) | all-reduce GB/GPU (s) | broadcast GB/GPU (s) "
        "| block (s) | total (min) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["paper"]:
        s = r["seconds_per_block"]
        lines.append(
            f"| {r['model']} | {r['gpus']} | {s['forward']:.2f} | {s['gram']:.2f} | {s['solve']:.2f} "
            f"(balance {r['solve_balance']:.2f}) | {r['allreduce_gb_per_gpu']:.2f} ({s['allreduce']:.3f}) | "
            f"{r['broadcast_gb_per_gpu']:.2f} ({s['broadcast']:.3f}) | {r['block_seconds']:.2f} | "
            f"{r['minutes']:.1f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "`balance`: the busiest GPU's solve flops over the mean (row ranges of the large layers make it "
        "close to 1; without them `down_proj` alone, 56% of a Llama block's solve cost, would cap the "
        "speed-up of the solves at 1.8x). Communication is well under 1% of a block: the Grams of a "
        "Llama-3-8B block are 1 GB (fp32), a few ms of NVLink against seconds of solves. Several nodes: "
        "the all-reduce and the "
        "broadcasts cross the network (e.g. 50 GB/s per GPU with 400 Gb/s InfiniBand): ~9x longer, still "
        "a few percent. Host memory: every process holds the whole model unless the model is streamed.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paper-only", action="store_true")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="unstructured", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.record:
        run(args.record, args.pattern, args.threads)
        return
    result = {"machine": machine(), "versions": versions(), "command": command_line(), "paper": paper()}
    json_path = RESULTS_DIR / "distributed.json"
    if args.paper_only and json_path.is_file():  # keep the measured runs
        previous = json.loads(json_path.read_text())
        for key in ("measured", "comparisons", "machine", "versions"):
            if key in previous:
                result[key] = previous[key]
    if not args.paper_only:
        result["measured"], result["comparisons"] = [], []
        with tempfile.TemporaryDirectory(prefix="maiht-dist-bench-") as tmp:
            for pattern in args.patterns.split(","):
                runs = [(1, 1), (2, 1)] + ([(1, 2)] if pattern == "unstructured" else [])
                records = [launch(pattern, p, t, Path(tmp)) for p, t in runs]
                comparison = compare(records[0], records[1])
                result["comparisons"].append({"pattern": pattern, **comparison})
                for record in records:
                    record.pop("masks")
                    record.pop("errors")
                result["measured"] += records
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / "distributed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
