"""Peak host memory of ``optimum-cli maiht prune`` on a fused mixture-of-experts checkpoint: streamed (the
default; transformers' conversion applied one block at a time) against in memory (``--no-stream``).

    python benchmarks/streaming_moe_memory.py     # -> results/streaming_moe_memory.{json,md}

Checkpoint: a random Qwen3-MoE-style float32 model built from a config, saved by transformers (its
checkpoint layout: one tensor per expert and projection, 1 GB shards) into a temporary folder (deleted
afterwards) with the demo model's tokenizer: hidden 512, 64 experts of 256 (8 per token), 8 heads, a tied
49152-token embedding, and enough blocks for about 2 GB. Each run is a child process whose peak resident
memory is its ``ru_maxrss`` (the launcher of ``streaming_memory.py``); the baseline is a child that imports
torch, transformers and the Qwen3-MoE class. Pruning: 50% unstructured on 8 windows of 128 tokens of the
bundled WikiText-2 validation excerpt, 2 iterations and 2 refit steps (the memory does not depend on them;
they keep the runs short), on the CPU. The two outputs are compared tensor by tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import command_line, machine, versions
from streaming_memory import PRUNE_FLAGS, bench_main, gib, peak_rss, prune, same_tensors, save_random_model

MOE = dict(
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_experts=64,
    num_experts_per_tok=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
BLOCKS = 19
"""About 101 MB per block (experts 64 x 3 x 512 x 256 float32) and 101 MB for the embedding: 2.0 GB."""
BASELINE = "import torch, transformers; from transformers import Qwen3MoeForCausalLM, AutoModelForCausalLM"


def write_checkpoint(folder: Path) -> int:
    """The random checkpoint, as transformers saves it; the bytes of its weights."""
    from transformers import Qwen3MoeConfig

    return save_random_model(folder, Qwen3MoeConfig, **MOE, num_hidden_layers=BLOCKS)


def run(work: Path) -> dict:
    baseline, _, code = peak_rss([sys.executable, "-c", BASELINE])
    assert code == 0
    source = work / "qwen3-moe"
    size = write_checkpoint(source)
    row = {"blocks": BLOCKS, "checkpoint_bytes": size}
    for mode, flags in (("streaming", []), ("in_memory", ["--no-stream"])):
        rss, seconds = prune(source, work / f"out-{mode}", *flags)
        row[mode] = {
            "peak_bytes": rss,
            "above_baseline_bytes": rss - baseline,
            "above_baseline_vs_checkpoint": round((rss - baseline) / size, 3),
            "seconds": round(seconds, 1),
        }
        print(mode, row[mode], flush=True)
    row["identical"] = same_tensors(work / "out-streaming", work / "out-in_memory")
    return {
        "baseline_bytes": baseline,
        "baseline": BASELINE,
        "model": MOE,
        "prune_flags": PRUNE_FLAGS,
        "row": row,
        "machine": machine(),
        "versions": versions(),
        "command": command_line(),
    }


def markdown(data: dict) -> str:
    row, model = data["row"], data["model"]
    lines = [
        "# Peak host memory: a fused mixture-of-experts checkpoint, streaming vs in memory",
        "",
        f"`optimum-cli maiht prune` on a random Qwen3-MoE-style float32 checkpoint ({row['blocks']} blocks "
        f"of {model['num_experts']} experts of {model['moe_intermediate_size']}, hidden "
        f"{model['hidden_size']}; tied 49152-token embedding) saved by transformers (per-expert tensors, "
        "fused on load); peak resident "
        f"memory (`ru_maxrss`) and above a baseline process that imports torch and transformers "
        f"({gib(data['baseline_bytes'])} GiB); {data['machine']['cores']} cores, "
        f"{data['versions'].get('torch')}.",
        "",
        "| mode | peak (GiB) | above baseline (GiB) | x checkpoint | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("streaming", "in_memory"):
        m = row[mode]
        cells = [mode.replace("_", " "), gib(m["peak_bytes"]), gib(m["above_baseline_bytes"])]
        cells += [f"{m['above_baseline_vs_checkpoint']:.2f}", m["seconds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    same = "identical" if row["identical"] else "NOT identical"
    lines += [
        "",
        f"Checkpoint: {gib(row['checkpoint_bytes'])} GiB of weights. The two outputs are {same}, tensor by "
        "tensor.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    bench_main("streaming_moe_memory", __doc__, run, markdown)


if __name__ == "__main__":
    main()
