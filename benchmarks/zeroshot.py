"""Zero-shot accuracy and perplexity of the demo model dense, pruned to 50% and to 2:4, offline.

    python benchmarks/zeroshot.py            # -> benchmarks/results/zeroshot.{json,md,png}

The pruning papers' seven tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA) download
their data from the Hugging Face Hub, which this machine cannot reach, and no package registry we can
use (PyPI, npm, Debian) ships their data. So this benchmark builds three multiple-choice tasks of its own
from the bundled WikiText-2 *test* excerpt (CC BY-SA 3.0, Merity et al. 2016; calibration uses the
validation excerpt, so no item was seen while pruning), writes them as ordinary lm-eval task YAMLs with
local JSONL data, and runs them through ``optimum_maiht.zeroshot.evaluate_tasks`` (lm-evaluation-harness
on the model in memory), exactly as ``optimum-cli maiht eval --include-path DIR --tasks ...`` would:

- ``wt2_next_sentence`` (HellaSwag-like): after one or two sentences of an article, which of four
  sentences comes next? The three wrong ones are sentences of the same article, from other paragraphs.
- ``wt2_last_word`` (LAMBADA-like, as multiple choice): the last word of a sentence among four words that
  end other sentences of the excerpt.
- ``wt2_word_order`` (BLiMP-like): a sentence or the same sentence with two neighbouring words swapped;
  the model should prefer the original.

The generated items are derived from CC BY-SA text: they are written to a temporary folder (or
``--tasks-dir``) and not committed; their SHA-256 goes into the results. Perplexity: the bundled test
excerpt, non-overlapping windows of the model's training length capped at 2048 (SmolLM2: 8192 -> 2048),
BOS first (``optimum_maiht.evaluation.perplexity`` defaults), the first ``--ppl-windows`` of them (8 by
default: the whole excerpt, 34 windows, would take 3 minutes per model on 2 cores).

Pruning: ``MAIHTPruner`` defaults except ``num_samples=32`` (x 512 tokens of the bundled validation
excerpt) to keep the run short on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_common import RESULTS_DIR, command_line, load_demo, machine, versions  # noqa: E402

SETTINGS = {"dense": None, "50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
TASKS = ("wt2_next_sentence", "wt2_last_word", "wt2_word_order")
LICENCE = "CC BY-SA 3.0, WikiText-2 by Merity et al. 2016; the items are derived from its test excerpt"


# --- the local tasks ----------------------------------------------------------------------------------


def detokenize(text: str) -> str:
    """WikiText's tokenized spacing back to ordinary text (" @-@ " -> "-", " , " -> ", "...)."""
    for raw, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), (" n't", "n't")):
        text = text.replace(raw, plain)
    text = re.sub(r" ([.,;:!?)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    return re.sub(r"\s+", " ", text).strip()


def articles(text: str) -> list[list[list[str]]]:
    """Articles -> paragraphs -> sentences of the excerpt (headings dropped, detokenized)."""
    result: list[list[list[str]]] = []
    for line in text.split("\n"):
        line = line.strip()
        if re.fullmatch(r"= [^=].* =", line):  # a top-level title starts an article
            result.append([])
        elif not line or line.startswith("="):
            continue
        elif result:
            sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", detokenize(line))
            result[-1].append([s for s in sentences if s])
    return [a for a in result if a]


def words(sentence: str) -> int:
    return len(sentence.split())


def next_sentence_items(corpus: list, rng: random.Random, count: int) -> list[dict[str, Any]]:
    items = []
    for paragraphs in corpus:
        for p_index, paragraph in enumerate(paragraphs):
            others = [
                s for j, p in enumerate(paragraphs) if abs(j - p_index) > 1 for s in p if 6 <= words(s) <= 40
            ]
            for i in range(1, len(paragraph)):
                target = paragraph[i]
                if not 6 <= words(target) <= 40 or len(others) < 3:
                    continue
                context = " ".join(paragraph[max(0, i - 2) : i])
                if words(context) > 80:
                    continue
                choices = [target, *rng.sample(others, 3)]
                rng.shuffle(choices)
                items.append({"context": context, "choices": choices, "label": choices.index(target)})
    rng.shuffle(items)
    return items[:count]


def last_word_items(corpus: list, rng: random.Random, count: int) -> list[dict[str, Any]]:
    sentences = [s for a in corpus for p in a for s in p if 8 <= words(s) <= 40 and s.endswith(".")]
    finals = [s[:-1].split()[-1] for s in sentences]
    vocabulary = sorted({w for w in finals if w.isalpha() and len(w) >= 3})
    items = []
    for sentence, final in zip(sentences, finals, strict=True):
        if not (final.isalpha() and len(final) >= 3):
            continue
        distractors = rng.sample([w for w in vocabulary if w.lower() != final.lower()], 3)
        choices = [final, *distractors]
        rng.shuffle(choices)
        context = sentence[: -len(final) - 1].rstrip()
        items.append({"context": context, "choices": choices, "label": choices.index(final)})
    rng.shuffle(items)
    return items[:count]


def word_order_items(corpus: list, rng: random.Random, count: int) -> list[dict[str, Any]]:
    items = []
    for sentence in (s for a in corpus for p in a for s in p if 8 <= words(s) <= 30):
        tokens = sentence.split()
        i = rng.randrange(1, len(tokens) - 2)
        if tokens[i] == tokens[i + 1]:
            continue
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
        choices = [sentence, " ".join(tokens)]
        rng.shuffle(choices)
        items.append({"context": "", "choices": choices, "label": choices.index(sentence)})
    rng.shuffle(items)
    return items[:count]


YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def build_tasks(folder: Path, items: int, seed: int) -> dict[str, Any]:
    """Write the three tasks (YAML + JSONL) into ``folder``; returns their sizes and data digests."""
    from optimum_maiht.data import bundled_text

    corpus = articles(bundled_text("wikitext2-test"))
    builders = {
        "wt2_next_sentence": next_sentence_items,
        "wt2_last_word": last_word_items,
        "wt2_word_order": word_order_items,
    }
    info = {}
    folder.mkdir(parents=True, exist_ok=True)
    for task, build in builders.items():
        rows = build(corpus, random.Random(seed), items)
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        (folder / f"{task}.yaml").write_text(YAML.format(task=task, data=data.resolve()), encoding="utf-8")
        info[task] = {
            "items": len(rows),
            "choices": len(rows[0]["choices"]),
            "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
            "example": rows[0],
        }
    return info


# --- the runs -----------------------------------------------------------------------------------------


def run_setting(name: str, tasks_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from optimum_maiht import MAIHTConfig, MAIHTPruner
    from optimum_maiht.evaluation import default_sequence_length, perplexity
    from optimum_maiht.zeroshot import evaluate_tasks

    model, tokenizer, _ = load_demo()
    record: dict[str, Any] = {"setting": name}
    if SETTINGS[name] is not None:
        config = MAIHTConfig(num_samples=args.num_samples, sequence_length=512, **SETTINGS[name])
        pruner = MAIHTPruner(model, config, tokenizer=tokenizer, device="cpu")
        start = time.perf_counter()
        pruner.prune("wikitext2-validation", progress=False)
        record["prune_seconds"] = round(time.perf_counter() - start, 1)
        record["sparsity"] = pruner.report.sparsity
        record["config"] = config.to_dict()
    start = time.perf_counter()
    record["sequence_length"] = default_sequence_length(model)
    windows = args.ppl_windows or None
    record["perplexity_windows"] = windows
    record["perplexity"] = perplexity(model, tokenizer, "wikitext2-test", max_windows=windows, batch_size=2)
    record["perplexity_seconds"] = round(time.perf_counter() - start, 1)
    results = evaluate_tasks(
        model, tokenizer, list(TASKS), limit=args.limit, include_path=tasks_dir, batch_size=args.batch_size
    )
    record["zero_shot"] = results.to_dict()
    print(
        f"{name}: perplexity {record['perplexity']:.2f} (windows of {record['sequence_length']}), "
        + ", ".join(f"{s.task} {s.metric} {s.value:.4f}" for s in results.scores)
        + f", mean acc {results.mean():.4f}",
        flush=True,
    )
    return record


def write_markdown(data: dict[str, Any], path: Path) -> None:
    runs = data["runs"]
    header = (
        "| model | " + " | ".join(f"{t} acc | {t} acc_norm" for t in TASKS) + " | mean acc | perplexity |"
    )
    lines = [
        "# Zero-shot accuracy: SmolLM2-135M-Instruct dense, 50% and 2:4 (mAIHT)",
        "",
        "Offline, on a 2-core CPU. **Tasks**: none of the pruning papers' seven (BoolQ, RTE, HellaSwag, "
        "WinoGrande, ARC-e, ARC-c, OpenBookQA) has its data in a package registry reachable here (PyPI, npm, "
        "Debian), so three multiple-choice tasks were built from the bundled WikiText-2 **test** excerpt "
        f"(licence: {data['task_licence']}) and scored with lm-evaluation-harness "
        f"{data['lm_eval_version']} on the model in memory (`optimum_maiht.zeroshot.evaluate_tasks`), "
        "0-shot, every item: "
        + "; ".join(f"`{t}` {i['items']} items x {i['choices']} choices" for t, i in data["tasks"].items())
        + ". See `benchmarks/zeroshot.py` for how the items are made.",
        "",
        "**Perplexity**: the bundled WikiText-2 test excerpt, "
        + (f"the first {runs[0]['perplexity_windows']}" if runs[0]["perplexity_windows"] else "all")
        + " non-overlapping windows of "
        f"{runs[0]['sequence_length']} tokens (the model's training length, 8192, capped at 2048), BOS "
        "first. "
        "Not comparable with lm-eval's `wikitext` task (word-level rolling perplexity).",
        "",
        f"**Pruning**: `MAIHTPruner` defaults, calibration {data['num_samples']} x 512 tokens of the bundled "
        "WikiText-2 validation excerpt (seed 0).",
        "",
        header,
        "|---|" + "---:|" * (2 * len(TASKS) + 2),
    ]
    for run in runs:
        results = run["zero_shot"]["results"]
        cells = []
        for task in TASKS:
            entry = results[task]
            cells += [f"{entry['acc']:.4f} ± {entry['acc_stderr']:.4f}", f"{entry['acc_norm']:.4f}"]
        mean = run["zero_shot"]["mean"]["value"]
        lines.append(
            f"| {run['setting']} | " + " | ".join(cells) + f" | **{mean:.4f}** | {run['perplexity']:.2f} |"
        )
    lines += [
        "",
        "± is lm-eval's standard error of the accuracy (sqrt(p(1-p)/(n-1))); differences smaller than about "
        "two of them are noise. `acc_norm` divides each choice's log-likelihood by its length in characters "
        "(for `wt2_word_order` both choices have the same length, so it equals `acc`). `wt2_word_order` is "
        "nearly saturated for all three models (a sanity check: pruning kept the preference for grammatical "
        "word order); `wt2_last_word` separates them most, in the same order as perplexity.",
        "",
        "| model | prune time (s) | measured sparsity | perplexity time (s) |",
        "|---|---:|---:|---:|",
    ]
    for run in runs:
        prune = f"{run['prune_seconds']:.0f}" if "prune_seconds" in run else "-"
        sparsity = f"{100 * run['sparsity']:.2f}%" if "sparsity" in run else "-"
        lines.append(f"| {run['setting']} | {prune} | {sparsity} | {run['perplexity_seconds']:.0f} |")
    lines += [
        "",
        "On a machine that reaches the Hugging Face Hub, the standard seven run with the same code:",
        "",
        "```bash",
        "optimum-cli maiht eval --model smollm2-maiht-2of4 \\",
        "    --tasks boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa --json",
        "```",
        "",
        f"Command: `{data['command']}`; machine and versions in `zeroshot.json`.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    runs = data["runs"]
    labels = [*TASKS, "mean"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        results = run["zero_shot"]["results"]
        values = [results[t]["acc"] for t in TASKS] + [run["zero_shot"]["mean"]["value"]]
        errors = [results[t]["acc_stderr"] for t in TASKS] + [float("nan")]  # no bar for the mean
        xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(labels))]
        left.bar(xs, values, width, yerr=errors, capsize=2, label=run["setting"])
    chance = [1 / data["tasks"][t]["choices"] for t in TASKS]
    for i, c in enumerate(chance):
        left.hlines(c, i - 0.45, i + 0.45, colors="grey", linestyles="dotted")
    left.set_xticks(range(len(labels)), labels, rotation=10)
    left.set_ylabel("accuracy (lm-eval acc, 0-shot)")
    left.set_ylim(0, 1)
    left.legend(title="SmolLM2-135M-Instruct")
    left.set_title("local WikiText-2 tasks (dotted: chance)")
    right.bar([r["setting"] for r in runs], [r["perplexity"] for r in runs], color=["C0", "C1", "C2"])
    first = f"first {runs[0]['perplexity_windows']} " if runs[0].get("perplexity_windows") else ""
    right.set_title(f"perplexity ({first}x {runs[0]['sequence_length']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: dense, 50%%, 2:4")
    parser.add_argument("--items", type=int, default=200, help="items per task")
    parser.add_argument("--ppl-windows", type=int, default=8, help="perplexity windows (0: whole excerpt)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval limit per task (default: all)")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval requests per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the items' generation")
    parser.add_argument("--tasks-dir", type=Path, default=None, help="keep the generated tasks here")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the .json")
    args = parser.parse_args()
    if args.render:
        data = json.loads((args.out / "zeroshot.json").read_text())
        write_markdown(data, args.out / "zeroshot.md")
        plot(data, args.out / "zeroshot.png")
        return
    import torch

    from optimum_maiht.zeroshot import lm_eval_version

    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maiht-zeroshot-") as tmp:
        tasks_dir = args.tasks_dir or Path(tmp)
        tasks = build_tasks(tasks_dir, args.items, args.seed)
        runs = [run_setting(name, tasks_dir, args) for name in args.settings.split(",")]
    data = {
        "model": "SmolLM2-135M-Instruct (offline demo model, fp32)",
        "lm_eval_version": lm_eval_version(),
        "tasks": tasks,
        "task_licence": LICENCE,
        "num_samples": args.num_samples,
        "limit": args.limit,
        "runs": runs,
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "versions": versions(),
        "command": command_line(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zeroshot.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    write_markdown(data, args.out / "zeroshot.md")
    plotted = plot(data, args.out / "zeroshot.png")
    written = "zeroshot.json, zeroshot.md" + (", zeroshot.png" if plotted else "")
    print(f"wrote {written} to {args.out} in {data['seconds']} s")


if __name__ == "__main__":
    main()
