"""Time per mixture-of-experts block: measured on the CPU for a small random MoE model, and on paper for
Qwen3-30B-A3B and Mixtral-8x7B on one H100.

    python benchmarks/moe_block_time.py            # -> results/moe_block_time.{json,md}

Measured: a random Qwen3-MoE model (hidden 512, 32 experts of intermediate 256, top-4, 2 blocks) built from
its config, pruned at 50% unstructured with the default solver settings on 16 x 256 random calibration
tokens; the time of each block comes from the report's ``block_seconds``, for ``experts_per_pass`` =
auto (one pass) and 4 (8 passes), and for the same model with experts left dense (``ignore`` the fused
weights) to show what the experts cost.

On paper: flop counts of the work of one block, divided by assumed GPU throughputs (stated in the output).
The solver costs about 71 ``(out x in) @ (in x in)`` products per matrix (2 per iteration x 20, 30 CG
steps, 1 start); the calibration costs one forward per pass plus the propagation forward, and the Gram
accumulation ``2 * tokens * top_k * in^2`` per expert matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from bench_common import BEFORE_29

RESULTS = Path(__file__).parent / "results"

SOLVE_PRODUCTS = 71  # (out x in) @ (in x in) products per matrix at the defaults (20 iterations, 30 CG)
GPU_FP32_FLOPS = 50e12  # H100 SXM, fp32 (TF32 off) matmul, sustained (peak 67 TFLOP/s)
GPU_BF16_FLOPS = 400e12  # H100 SXM, bf16 forward matmuls, sustained (peak 989 TFLOP/s dense)
GRAM_BUDGET = 2 * 1024**3  # optimum_maiht.experts.GRAM_BUDGET_BYTES

PAPER_MODELS = {
    # hidden, expert intermediate, experts, top-k, blocks, attention (q, kv) output sizes
    "Qwen3-30B-A3B": dict(hidden=2048, inter=768, experts=128, top_k=8, blocks=48, q=4096, kv=512),
    "Mixtral-8x7B": dict(hidden=4096, inter=14336, experts=8, top_k=2, blocks=32, q=4096, kv=1024),
}
CALIBRATION_TOKENS = 128 * 2048


def on_paper(name: str, m: dict) -> dict:
    """Flops, memory and seconds of one MoE block on one H100 (see the module docstring)."""
    h, i, e, k = m["hidden"], m["inter"], m["experts"], m["top_k"]
    n = CALIBRATION_TOKENS
    expert_matrices = [(2 * i, h), (h, i)]  # (out, in): gate_up, down
    attention = [(m["q"], h), (m["kv"], h), (m["kv"], h), (h, m["q"])]
    solve = (
        SOLVE_PRODUCTS
        * 2
        * (e * sum(o * d * d for o, d in expert_matrices) + sum(o * d * d for o, d in attention))
    )
    gram_per_expert = 4 * sum(d * d for _, d in expert_matrices)
    per_pass = max(1, GRAM_BUDGET // gram_per_expert)
    passes = math.ceil(e / per_pass)
    active = sum(o * d for o, d in attention) + k * sum(o * d for o, d in expert_matrices)
    forward = 2 * n * active
    gram = 2 * n * k * sum(d * d for _, d in expert_matrices) + 2 * n * (h * h + m["q"] ** 2)  # + q/k/v, o
    seconds = solve / GPU_FP32_FLOPS + (passes + 1) * forward / GPU_BF16_FLOPS + gram / GPU_FP32_FLOPS
    return {
        "model": name,
        **m,
        "calibration_tokens": n,
        "solve_tflop": round(solve / 1e12, 1),
        "forward_tflop": round(forward / 1e12, 1),
        "gram_tflop": round(gram / 1e12, 1),
        "experts_per_pass": min(per_pass, e),
        "passes": passes,
        "gram_gib_per_pass": round(min(per_pass, e) * gram_per_expert / 1024**3, 2),
        "seconds_per_block": round(seconds, 1),
        "minutes_all_blocks": round(seconds * m["blocks"] / 60, 1),
    }


def measured(experts_per_pass: int | None, prune_experts: bool) -> dict:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from optimum_maiht import MAIHTConfig, MAIHTPruner

    config = Qwen3MoeConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_experts=32,
        num_experts_per_tok=4,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 1000, (16, 256), generator=torch.Generator().manual_seed(0))
    ignore = list(MAIHTConfig().ignore) + ([] if prune_experts else [r"experts\.(gate_up|down)_proj$"])
    pruner = MAIHTPruner(
        model,
        MAIHTConfig(
            experts_per_pass=experts_per_pass,
            ignore=ignore,
            min_expert_tokens=0,
            sequence_length=256,
            **BEFORE_29,
        ),
        device="cpu",
    )
    start = time.perf_counter()
    pruner.prune(ids, progress=False)
    report = pruner.report
    return {
        "experts_per_pass": experts_per_pass if prune_experts else None,
        "experts_pruned": prune_experts,
        "block_seconds": report.block_seconds,
        "seconds": round(time.perf_counter() - start, 2),
        "matrices_pruned": len(report.pruned),
        "sparsity": round(report.sparsity, 4),
    }


def markdown(result: dict) -> str:
    lines = [
        "# Time per MoE block",
        "",
        f"Measured on {result['machine']} (torch {result['torch']}), random Qwen3-MoE (hidden 512, "
        "32 experts x intermediate 256, top-4, 2 blocks), 16 x 256 calibration tokens, 50% unstructured, "
        "default solver settings:",
        "",
        "| experts | experts_per_pass | passes | matrices pruned | block 0 (s) | block 1 (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in result["measured"]:
        per_pass = run["experts_per_pass"]
        passes = "1" if not run["experts_pruned"] else str(math.ceil(32 / per_pass)) if per_pass else "1"
        lines.append(
            f"| {'pruned' if run['experts_pruned'] else 'dense (ignored)'} | "
            f"{per_pass if per_pass else ('auto' if run['experts_pruned'] else '-')} | {passes} | "
            f"{run['matrices_pruned']} | {run['block_seconds'][0]:.2f} | {run['block_seconds'][1]:.2f} |"
        )
    lines += [
        "",
        f"On paper, one H100 (fp32 solves at {GPU_FP32_FLOPS / 1e12:.0f} TFLOP/s, bf16 forwards at "
        f"{GPU_BF16_FLOPS / 1e12:.0f} TFLOP/s sustained), 128 x 2048 calibration tokens, default settings:",
        "",
        "| model | solves (TFLOP) | one forward (TFLOP) | Grams (TFLOP) | experts / pass | passes | "
        "Grams / pass (GiB) | s / block | min, all blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["on_paper"]:
        lines.append(
            f"| {row['model']} | {row['solve_tflop']} | {row['forward_tflop']} | {row['gram_tflop']} | "
            f"{row['experts_per_pass']} | {row['passes']} | {row['gram_gib_per_pass']} | "
            f"{row['seconds_per_block']} | {row['minutes_all_blocks']} |"
        )
    lines += [
        "",
        "The paper figures leave out the eager expert loop's per-expert kernel launches and host syncs "
        "(one per expert and batch) and the attention scores; they are lower bounds of the same order.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    runs = [measured(None, True), measured(4, True), measured(None, False)]
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "measured": runs,
        "on_paper": [on_paper(name, m) for name, m in PAPER_MODELS.items()],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "moe_block_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "moe_block_time.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
