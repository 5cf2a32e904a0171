"""Render the block-reconstruction runs (``benchmarks/results/reconstruction.json``, written by
``quality.py --results``) beside the peers of ``quality.json`` as ``reconstruction.md``.

Ratios are against llm-compressor's SparseGPT at the same setting and evaluation windows (the latest record
of ``quality.json``). Each reconstruction run is named by its method label and the optimum-maiht commit it
ran (``+dirty``: with local changes), so that runs of successive versions of the refit stay apart.

    python benchmarks/report_reconstruction.py
"""

from __future__ import annotations

import json
from statistics import mean
from typing import Any

from bench_common import RESULTS_DIR, command_line
from report_quality import LABELS, latest

RUNS = RESULTS_DIR / "reconstruction.json"
PEERS = RESULTS_DIR / "quality.json"
PEER_METHODS = ["wanda-llmc", "sparsegpt-llmc", "maiht"]


def _errors(record: dict[str, Any]) -> str:
    blocks = record.get("details", {}).get("reconstruction") or []
    if not blocks:
        return "–"
    kept = sum(1 for b in blocks if b.get("epochs", 0) == 0)
    before = mean(b["error_before"] for b in blocks)
    after = mean(b["error_after"] for b in blocks)
    return f"{before:.4f} → {after:.4f} ({kept} kept as solved)"


def render(runs: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    lines = [
        "# Block reconstruction on the demo model (experimental)",
        "",
        "SmolLM2-135M-Instruct fp32 on the 2-core CPU; the calibration (64 x 512 WikiText-2 validation "
        "tokens, seed 0) and the evaluation (first 64 windows of 512 WikiText-2 test tokens) of the quality "
        "benchmark. Peers: the latest runs of `quality.json` (idle machine). `x SparseGPT`: perplexity and "
        "prune time over llm-compressor's SparseGPT at the same setting. Block error: the mean over blocks "
        "of the reported output error against the dense block on all calibration windows, before and after "
        "the refit (its definition changed between versions, see the commit column).",
        "",
        "| setting | method | commit | perplexity | x SparseGPT | prune (s) | x SparseGPT time "
        "| block error |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    table = latest(peers)
    for setting in ("50%", "60%", "70%", "2:4", "4:8"):
        windows = {r["eval"]["windows"] for r in runs if r["setting"] == setting}
        for count in sorted(windows):
            base = table.get(count, {}).get(("sparsegpt-llmc", setting))
            rows = [table.get(count, {}).get((m, setting)) for m in PEER_METHODS]
            rows += [r for r in runs if r["setting"] == setting and r["eval"]["windows"] == count]
            for record in filter(None, rows):
                method = record["method"]
                label = LABELS.get(method, method)
                commit = record["versions"].get("optimum-maiht-commit", "–")
                ratio = f"{record['ppl'] / base['ppl']:.3f}" if base else "–"
                speed = f"{record['prune_seconds'] / base['prune_seconds']:.2f}" if base else "–"
                lines.append(
                    f"| {setting} | {label} | {commit} | {record['ppl']:.2f} | {ratio} | "
                    f"{record['prune_seconds']:.0f} | {speed} | {_errors(record)} |"
                )
    lines += ["", f"Command: `{command_line()}`", ""]
    return "\n".join(lines)


def main() -> None:
    runs = json.loads(RUNS.read_text())
    peers = json.loads(PEERS.read_text())
    out = RUNS.with_suffix(".md")
    out.write_text(render(runs, peers))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
