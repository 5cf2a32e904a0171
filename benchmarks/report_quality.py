"""Render ``benchmarks/results/quality.json`` as Markdown tables (``quality.md``) and a plot (PNG).

For every machine, evaluation size, method and setting the latest record wins. One section per machine
and evaluation size (the quick subset and the full test split; the newest machine first, as times are
comparable only on one machine), each with perplexity, prune time and peak resident memory; the plot shows
perplexity per setting per method, each the latest run on whichever machine (perplexity moves by less than 3%
between the machines here), for the evaluation size that has the most runs.

    benchmarks/.venv-llmcompressor/bin/python benchmarks/report_quality.py
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_common import RESULTS_DIR, command_line

SETTING_ORDER = ["dense", "50%", "60%", "70%", "2:4", "4:8"]
METHOD_ORDER = [
    "dense",
    "magnitude",
    "wanda-llmc",
    "sparsegpt-llmc",
    "maiht-fast",
    "maiht-solve",
    "maiht",
    "wanda-rec",
    "sparsegpt-rec",
    "maiht-rec",
]
PLOT_TOP = 1000.0  # perplexities above this (magnitude pruning) are drawn cut, with their value printed
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude (ours, per layer)",
    "wanda-llmc": "Wanda (llm-compressor)",
    "sparsegpt-llmc": "SparseGPT (llm-compressor)",
    "maiht": "mAIHT (optimum-maiht, defaults)",
    "maiht-fast": "optimum-maiht, --preset fast",
    "maiht-solve": "optimum-maiht, defaults without the refit",
    "wanda-rec": "Wanda mask + block reconstruction (optimum-maiht)",
    "maiht-rec": "mAIHT + block reconstruction (optimum-maiht)",
    "sparsegpt-ref": "SparseGPT (ours) in optimum-maiht's pipeline",
    "sparsegpt-rec": "SparseGPT (ours) + block reconstruction (optimum-maiht)",
}


def _order(items: list[str], order: list[str]) -> list[str]:
    return sorted(items, key=lambda x: (order.index(x) if x in order else len(order), x))


def machine_name(machine: dict[str, Any]) -> str:
    """A record's ``machine`` as its section names it (with the CPU's vector instructions where the record
    has them: records before 2026-12-06 do not)."""
    cpu = machine["cpu"] + (f" ({machine['cpu_capability']})" if "cpu_capability" in machine else "")
    return f"{cpu}, {machine['cores']} cores, {machine['torch_threads']} torch threads"


def latest(
    records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any] = lambda r: r["eval"]["windows"]
) -> dict[Any, dict[tuple[str, str], dict[str, Any]]]:
    """``{key(record): {(method, setting): latest record}}``; by default keyed by eval windows, whatever
    the machine."""
    table: dict[Any, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for record in records:
        table[key(record)][(record["method"], record["setting"])] = record
    return table


def calibration(record: dict[str, Any]) -> tuple[int, int]:
    """(windows, tokens per window) of a record's calibration."""
    return record["calibration"]["num_samples"], record["calibration"]["sequence_length"]


def latest_by_machine(
    records: list[dict[str, Any]],
) -> dict[tuple[str, int, tuple[int, int]], dict[tuple[str, str], dict[str, Any]]]:
    """``{(machine, eval windows, calibration): {(method, setting): latest record}}``, the newest machine's
    first, then the most calibration windows: runs on another calibration never replace a cell."""
    table = latest(records, key=lambda r: (machine_name(r["machine"]), r["eval"]["windows"], calibration(r)))
    newest = machine_name(records[-1]["machine"])
    return dict(sorted(table.items(), key=lambda kv: (kv[0][0] != newest, -kv[0][1], -kv[0][2][0])))


def _cell(record: dict[str, Any] | None, field: str) -> str:
    if record is None:
        return "–"
    if field == "ppl":
        return f"{record['ppl']:.2f}"
    if field == "prune_seconds":  # "shared": run beside other work, so not a timing
        return f"{record['prune_seconds']:.0f}" + (" (shared)" if record.get("shared") else "")
    if field == "sparsity_measured":
        return f"{100 * record['sparsity_measured']:.2f}"
    return f"{record['peak_rss_mb'] / 1024:.2f}"


def render(records: list[dict[str, Any]]) -> str:
    """The Markdown report: one section per machine, evaluation size and calibration size."""
    lines = ["# Quality benchmark: mAIHT vs SparseGPT and Wanda (llm-compressor)", ""]
    first = records[-1]
    seeds = ", ".join(str(seed) for seed in sorted({r["calibration"]["seed"] for r in records}))
    lines += [
        f"Model: {first['model']}. Every method prunes the linear layers of the decoder blocks (not "
        "`lm_head`, tied to the embedding) on the same calibration tensor within a section: its windows x "
        f"tokens of WikiText-2 validation, seed {seeds} (the section's title says how many; each record "
        "carries the tensor's SHA-256). Perplexity on WikiText-2 test, non-overlapping "
        "windows of 512 tokens, each starting with BOS. Prune time is the wall time of the pruning call "
        "(calibration forwards included); peak memory is the run's peak resident set (its own process, "
        "evaluation included). Measured sparsity is the share of exact zeros in the pruned layers: each "
        "method rounds the number of weights kept per row (or per layer) its own way, hence differences of "
        "up to 0.1 point at 60% and 70%. Lower is better everywhere else. A time marked (shared) is of a "
        "run that shared the machine with other work: not a timing.",
        "",
    ]
    for (machine, windows, (samples, length)), runs in latest_by_machine(records).items():
        any_run = next(iter(runs.values()))
        scope = (
            "the whole test split"
            if any_run["eval"]["all_windows"]
            else f"the first {windows} windows of the test split (quick subset)"
        )
        methods = _order(list({m for m, _ in runs}), METHOD_ORDER)
        settings = _order(list({s for _, s in runs if s != "dense"}), SETTING_ORDER)
        dense = runs.get(("dense", "dense"))
        tokens = any_run["eval"]["tokens"]
        lines += [
            f"## On {machine}: calibration {samples} x {length} tokens, evaluation on {scope}, {windows} "
            f"windows, {tokens} tokens",
            "",
        ]
        if dense is not None:
            lines += [f"Dense perplexity: **{dense['ppl']:.2f}**.", ""]
        for field, title in (
            ("ppl", "Perplexity"),
            ("prune_seconds", "Prune time (s)"),
            ("peak_rss_mb", "Peak resident memory (GiB)"),
            ("sparsity_measured", "Measured sparsity of the pruned layers (%)"),
        ):
            lines += [
                f"### {title}",
                "",
                "| method | " + " | ".join(settings) + " |",
                "|---|" + "---|" * len(settings),
            ]
            for method in methods:
                if method == "dense":
                    continue
                cells = []
                for setting in settings:
                    cell = _cell(runs.get((method, setting)), field)
                    if field == "ppl" and (method, setting) in runs:
                        best = min(r["ppl"] for (m, s), r in runs.items() if s == setting)
                        cell = f"**{cell}**" if runs[(method, setting)]["ppl"] == best else cell
                    cells.append(cell)
                lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
            lines.append("")
    machines = {json.dumps(r["machine"], sort_keys=True) for r in records}
    commit_key = "optimum-maiht-commit"
    versions = {
        json.dumps({k: v for k, v in r["versions"].items() if k != commit_key}, sort_keys=True)
        for r in records
    }
    ours = [r for r in records if r["method"] != "dense" and not r["method"].endswith("-llmc")]
    commits = sorted({r["versions"].get(commit_key, "?") for r in ours})
    commands = sorted({r["command"] for r in records})
    lines += ["## Provenance", ""]
    lines += [f"- Machine: {machine_name(m)}, {m['platform']}" for m in map(json.loads, sorted(machines))]
    lines += [
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in json.loads(v).items()) for v in sorted(versions)
    ]
    if commits:
        lines += [
            "- optimum-maiht source of the runs in its pipeline (git commit, `+dirty` = local changes): "
            + ", ".join(f"`{c}`" for c in commits)
        ]
    lines += ["- Commands that produced these records:"] + [f"  - `{c}`" for c in commands]
    lines += [f"- Rendered by `{command_line()}`", ""]
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: perplexity per setting per method, each its latest run (log scale, cut at
    ``PLOT_TOP``), dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # every setting the records hold, each method's latest run of it on whichever machine: perplexity
    # barely depends on the machine (within 3% between the machines here: SparseGPT's most), unlike time
    tables = latest(records, key=lambda r: (r["eval"]["windows"], calibration(r)))
    chosen = max(tables, key=lambda k: (len(tables[k]), k))
    windows, runs = chosen[0], tables[chosen]
    methods = [m for m in _order(list({m for m, _ in runs}), METHOD_ORDER) if m != "dense"]
    settings = _order(list({s for _, s in runs if s != "dense"}), SETTING_ORDER)
    fig, ax = plt.subplots(figsize=(9, 5.4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(settings))]
        ys = [runs[(method, s)]["ppl"] if (method, s) in runs else float("nan") for s in settings]
        # bars past the top of the axis are cut there; their label still gives the value
        bars = ax.bar(xs, [min(y, PLOT_TOP) for y in ys], width, label=LABELS.get(method, method))
        labels = [("" if y != y else f"{y:.1f}" if y < PLOT_TOP else f"{y:.0f} ↑") for y in ys]
        ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
    dense = runs.get(("dense", "dense"))
    if dense is not None:
        ax.axhline(
            dense["ppl"], color="black", linestyle="--", linewidth=1, label=f"dense ({dense['ppl']:.2f})"
        )
    if any(y >= PLOT_TOP for y in (r["ppl"] for r in runs.values())):
        ax.text(
            0.005,
            0.99,
            f"↑ bar cut at {PLOT_TOP:g}; the label is its value",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
        )
    ax.set_yscale("log")
    # bars start at the bottom of the axis: a decade below the lowest value keeps every bar visible
    values = [min(r["ppl"], PLOT_TOP) for r in runs.values()]
    ax.set_ylim(10 ** math.floor(math.log10(min(values) / 2)), max(values) * 2.5)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("sparsity (unstructured %) or N:M pattern")
    ax.set_ylabel("WikiText-2 test perplexity (log scale, lower is better)")
    any_run = next(iter(runs.values()))
    scope = "full test split" if any_run["eval"]["all_windows"] else f"first {windows} windows"
    model = any_run["model"].split(" (")[0]
    ax.set_title(f"{model} pruned one-shot: perplexity ({scope} of 512 tokens, latest runs)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "quality.json")
    parser.add_argument(
        "--output", type=Path, default=RESULTS_DIR / "quality", help="writes OUTPUT.md and OUTPUT.png"
    )
    args = parser.parse_args()
    records = json.loads(args.results.read_text())
    if not records:
        raise SystemExit(f"{args.results} holds no records yet: run benchmarks/quality.py first")
    args.output.with_suffix(".md").write_text(render(records))
    plot(records, args.output.with_suffix(".png"))
    print(f"wrote {args.output.with_suffix('.md')} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
