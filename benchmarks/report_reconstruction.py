"""Render the block-reconstruction runs (``benchmarks/results/reconstruction.json``, written by
``quality.py --results``) beside the peers of ``quality.json`` as ``reconstruction.md``; with ``--runs``,
another such file (``calibration_size.json``: the same runs with more calibration windows) beside its own
``.md``.

Ratios are against llm-compressor's SparseGPT at the same setting, evaluation windows and calibration size
(the latest such record, on the same host where there is one). Each reconstruction run is named by its
method label and the optimum-maiht commit it ran (``+dirty``: with local changes), so that runs of successive
versions of the refit stay apart.

    python benchmarks/report_reconstruction.py [--runs benchmarks/results/calibration_size.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean
from typing import Any

from bench_common import RESULTS_DIR, command_line
from report_quality import LABELS, latest

RUNS = RESULTS_DIR / "reconstruction.json"
PEERS = RESULTS_DIR / "quality.json"
PEER_METHODS = ["wanda-llmc", "sparsegpt-llmc", "maiht"]


def _block_errors(block: dict[str, Any]) -> tuple[float, float]:
    """A block's output error with the solved and with the refitted weights: ``error_solved`` /
    ``error_refit`` since report version 4, ``error_before`` / ``error_after`` in the records before."""
    if "error_solved" in block:
        return block["error_solved"], block["error_refit"]
    return block["error_before"], block["error_after"]


def _errors(record: dict[str, Any]) -> str:
    blocks = [b for b in record.get("details", {}).get("reconstruction") or [] if not b.get("skipped")]
    if not blocks:
        return "–"
    kept = sum(1 for b in blocks if b.get("epochs", 0) == 0)
    before = mean(_block_errors(b)[0] for b in blocks)
    after = mean(_block_errors(b)[1] for b in blocks)
    return f"{before:.4f} → {after:.4f} ({kept} blocks left as solved)"


def _label(method: str) -> str:
    """``maiht-rec[iterations=5]`` -> its label from ``LABELS`` with the options after it."""
    base, _, options = method.partition("[")
    return LABELS.get(base, base) + (f" [{options}" if options else "")


def _host(record: dict[str, Any]) -> str:
    return record["machine"].get("platform", "?")


def _calibration(record: dict[str, Any]) -> tuple[int, int]:
    """(windows, tokens per window) of the record's calibration."""
    return record["calibration"]["num_samples"], record["calibration"]["sequence_length"]


def _baseline(record: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The latest llm-compressor SparseGPT run at the record's setting, evaluation windows and calibration
    size on the same host (the same kernel build: the machines behind this 2-core CPU differ in speed by up
    to a quarter), else on any."""
    same = [
        r
        for r in records
        if r["method"] == "sparsegpt-llmc"
        and r["setting"] == record["setting"]
        and r["eval"]["windows"] == record["eval"]["windows"]
        and _calibration(r) == _calibration(record)
    ]
    here = [r for r in same if _host(r) == _host(record)]
    return (here or same or [None])[-1]


def render(runs: list[dict[str, Any]], peers: list[dict[str, Any]], name: str) -> str:
    """The Markdown table of ``runs`` (the records of the file ``name``), each setting's peers first."""
    hosts = sorted({_host(r) for r in runs + peers})
    lines = [
        "# Block reconstruction on the demo model (experimental)",
        "",
        "SmolLM2-135M-Instruct fp32 on the 2-core CPU; the evaluation of the quality benchmark (first 64 "
        "windows of 512 WikiText-2 test tokens) and its calibration (WikiText-2 validation windows, seed 0; "
        "`calibration`: windows x tokens). Rows: the peers' latest records in `quality.json`, then every "
        f"run of `{name}` in order. `x SparseGPT`: perplexity and prune time over "
        "llm-compressor's SparseGPT at the same setting and calibration, run on the same host (`host`: "
        + ", ".join(f"{i} = `{h}`" for i, h in enumerate(hosts))
        + ") where there is one, i.e. back to back with the run (otherwise the latest of any host). "
        "Block error: the mean over blocks of the reported output error against the dense block (on all "
        "calibration windows until report version 3, on the held-out windows since), before and after the "
        "refit (see the commit column).",
        "",
        "| setting | calibration | method | commit | host | perplexity | x SparseGPT | prune (s) "
        "| x SparseGPT time | block error |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    table = latest(peers)
    for setting in ("50%", "60%", "70%", "2:4", "4:8"):
        windows = {r["eval"]["windows"] for r in runs if r["setting"] == setting}
        for count in sorted(windows):
            rows = [table.get(count, {}).get((m, setting)) for m in PEER_METHODS]
            rows += [r for r in runs if r["setting"] == setting and r["eval"]["windows"] == count]
            for record in filter(None, rows):
                base = _baseline(record, peers + runs)
                commit = record["versions"].get("optimum-maiht-commit", "–")
                ratio = f"{record['ppl'] / base['ppl']:.3f}" if base else "–"
                speed = f"{record['prune_seconds'] / base['prune_seconds']:.2f}" if base else "–"
                windows, length = _calibration(record)
                lines.append(
                    f"| {setting} | {windows} x {length} | {_label(record['method'])} | {commit} "
                    f"| {hosts.index(_host(record))} "
                    f"| {record['ppl']:.2f} | {ratio} | {record['prune_seconds']:.0f} | {speed} "
                    f"| {_errors(record)} |"
                )
    lines += ["", f"Command: `{command_line()}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=RUNS, help="JSON list of quality.py records to render")
    args = parser.parse_args()
    runs = json.loads(args.runs.read_text())
    peers = json.loads(PEERS.read_text())
    out = args.runs.with_suffix(".md")
    out.write_text(render(runs, peers, args.runs.name))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
