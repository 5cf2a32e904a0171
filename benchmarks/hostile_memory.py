"""Peak host memory of loading a hostile compressed checkpoint against a valid one of about the same size.

    python benchmarks/hostile_memory.py --label after       # -> results/hostile_memory.{json,md}
    PYTHONPATH=/path/to/older/checkout python benchmarks/hostile_memory.py --label before

The hostile folder (issue #28, item 3) is a tiny Llama-style compact checkpoint (hidden 64, 2 blocks)
in which one pruned weight, ``model.layers.0.mlp.down_proj.weight``, is replaced by parts that agree
with each other but not with ``config.json``: a stored shape of ``ROWS x 2048``, a bitmask of that shape
(``ROWS x 256`` bytes) keeping two weights per row (one in each 4 KB page of the float32 row), their
values and row offsets. Its files take about ``HOSTILE_MB`` MB; decompressed, the weight would take 32
times its bitmask. The valid folder is a magnitude-pruned (50%) Llama-style checkpoint whose compact files
take about the same bytes (hidden 512, intermediate 1536, 4 blocks, vocabulary 2048).

Each load is ``MAIHTModelForCausalLM.from_pretrained(folder)`` in a child process (the model building
included); its peak resident memory is the child's ``ru_maxrss``, its baseline the resident memory after
the imports (torch, transformers, the Llama model code, optimum_maiht). Results are appended under
``--label``, so that runs of two code versions sit side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import RESULTS_DIR, command_line, machine, versions

HOSTILE_MB = 38
ROWS = HOSTILE_MB * 2**20 // 256
LAYER = "model.layers.0.mlp.down_proj.weight"
CHILD = """
import json, resource, sys
import torch, transformers
from transformers import LlamaForCausalLM  # the model code, imported before the baseline
import optimum_maiht
from optimum_maiht.modeling import MAIHTModelForCausalLM

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

base = rss()
try:
    MAIHTModelForCausalLM.from_pretrained(sys.argv[1])
    outcome = "loaded"
except Exception as err:
    outcome = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
record = {"baseline_bytes": base, "peak_bytes": peak, "outcome": outcome, "code": optimum_maiht.__file__}
print(json.dumps(record))
"""


def llama(hidden: int, intermediate: int, blocks: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def pruned_layers(model: torch.nn.Module) -> dict[str, None]:
    """Zero the smaller half of every linear weight of the blocks (per row); their ``sparse_layers``."""
    from optimum_maiht.solvers import LayerSpec, magnitude_prune

    layers = {}
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(magnitude_prune(module.weight, LayerSpec(0.5)))
                layers[f"model.layers.{name}.weight"] = None
    return layers


def write_valid(folder: Path) -> None:
    from optimum_maiht.compressed import save_compressed

    model = llama(512, 1536, 4, 2048)
    save_compressed(model, folder, pruned_layers(model))


def write_hostile(folder: Path) -> None:
    """A tiny compact checkpoint, then LAYER's parts replaced by those of a ROWS x 2048 weight."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from optimum_maiht.compressed import COMPRESSED_INDEX_NAME, save_compressed

    model = llama(64, 128, 2, 128)
    save_compressed(model, folder, pruned_layers(model))
    index = json.loads((folder / COMPRESSED_INDEX_NAME).read_text())
    shard = folder / index["weight_map"][f"{LAYER}.bitmask"]
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    bitmask = torch.zeros(ROWS, 256, dtype=torch.uint8)
    bitmask[:, 0] = bitmask[:, 128] = 1  # weights 0 and 1024 of each row kept: every page of the weight
    tensors[f"{LAYER}.shape"] = torch.tensor([ROWS, 2048])
    tensors[f"{LAYER}.bitmask"] = bitmask
    tensors[f"{LAYER}.row_offsets"] = torch.arange(0, 2 * ROWS, 2)
    tensors[f"{LAYER}.compressed"] = torch.ones(2 * ROWS)
    save_file(tensors, str(shard), metadata=metadata)


def load_in_child(folder: Path) -> dict:
    command = [sys.executable, "-c", CHILD, str(folder)]  # run beside the folder: no checkout on sys.path[0]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=folder.parent)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["file_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    record["above_baseline_bytes"] = record["peak_bytes"] - record["baseline_bytes"]
    record["above_baseline_x_files"] = round(record["above_baseline_bytes"] / record["file_bytes"], 2)
    return record


def markdown(data: dict) -> str:
    lines = [
        "# Peak memory: loading a hostile compact checkpoint vs a valid one",
        "",
        f"Machine: {data['machine'].get('cpu', '')}. Command: `{data['command']}`.",
        "How the checkpoints are built and measured: the docstring of benchmarks/hostile_memory.py.",
        "",
        "| code | checkpoint | files (MB) | peak above baseline (MB) | x files | outcome |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, run in data["runs"].items():
        for kind in ("valid", "hostile"):
            r = run[kind]
            lines.append(
                f"| {label} | {kind} | {r['file_bytes'] / 2**20:.1f} | "
                f"{r['above_baseline_bytes'] / 2**20:.0f} | {r['above_baseline_x_files']} | "
                f"{r['outcome'][:120]} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--label", required=True, help="name of this run in the results (e.g. the code version)"
    )
    args = parser.parse_args()
    path = RESULTS_DIR / "hostile_memory.json"
    data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        valid, hostile = Path(tmp) / "valid", Path(tmp) / "hostile"
        write_valid(valid)
        write_hostile(hostile)
        run = {"valid": load_in_child(valid), "hostile": load_in_child(hostile), "versions": versions()}
    data["runs"][args.label] = run
    data.update(machine=machine(), command=command_line())
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS_DIR / "hostile_memory.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
