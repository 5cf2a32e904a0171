"""Zero-shot accuracy with lm-evaluation-harness (optimum_maiht.zeroshot), offline.

The task is our own: tests/data/maiht_mc.yaml, 40 four-way multiple-choice questions written for these
tests (tests/data/maiht_mc.jsonl). Its data file is named relative to the repository root (lm-eval reads
relative ``data_files`` from the working directory), so every test runs from there.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids, make_tiny_model, make_tokenizer

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.report import PruneReport, TaskScore, ZeroShotResults

pytest.importorskip("lm_eval", reason='needs the eval extra: pip install "optimum-maiht[eval]"')

from optimum_maiht import zeroshot  # noqa: E402  (after the skip: the module itself imports no lm_eval)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
TASK = "maiht_mc"


@pytest.fixture(autouse=True)
def from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def lm_eval_directly(model, tokenizer, **options):
    """lm-eval's own API on the same model object: the reference our wrapper must reproduce."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(DATA)), log_samples=False, **options
    )
    return out["results"][TASK]


def by_hand(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm of the task computed here, without lm-eval: the summed log-likelihood of each
    choice after "Question: ...\\nAnswer:" (with the tokenizer's own special tokens, as lm-eval encodes
    them), argmax; acc_norm divides by the choice's length in characters."""
    rows = [json.loads(line) for line in (DATA / "maiht_mc.jsonl").read_text().splitlines()]
    hits = hits_norm = 0
    with torch.no_grad():
        for row in rows:
            context = f"Question: {row['question']}\nAnswer:"
            start = len(tokenizer(context)["input_ids"])
            scores = []
            for choice in row["choices"]:
                ids = torch.tensor([tokenizer(context + " " + choice)["input_ids"]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                targets = ids[0, start:]
                scores.append(float(logp[start - 1 :].gather(1, targets[:, None]).sum()))
            hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
            normed = [s / len(c) for s, c in zip(scores, row["choices"], strict=True)]
            hits_norm += max(range(len(normed)), key=normed.__getitem__) == row["label"]
    return hits / len(rows), hits_norm / len(rows)


# -- the numbers ------------------------------------------------------------------------------------------


@pytest.mark.slow  # about 20 s: lm-eval run twice over the same tasks
def test_accuracy_equals_lm_eval_run_directly_and_by_hand(model, tokenizer):
    ours = zeroshot.evaluate_tasks(model, tokenizer, TASK, include_path=DATA)
    theirs = lm_eval_directly(model, tokenizer)
    acc, acc_norm = ours.score(TASK, "acc"), ours.score(TASK, "acc_norm")
    assert acc.value == theirs["acc,none"] and acc.stderr == theirs["acc_stderr,none"]
    assert acc_norm.value == theirs["acc_norm,none"] and acc_norm.stderr == theirs["acc_norm_stderr,none"]
    assert (acc.value, acc_norm.value) == pytest.approx(by_hand(model, tokenizer), abs=1e-12)
    assert acc.samples == 40 and acc.num_fewshot == 0 and acc.split == "test" and acc.dataset == "json"
    assert acc.higher_is_better is True and acc.subtask_of is None
    assert ours.lm_eval_version == zeroshot.lm_eval_version() and ours.tasks == [TASK]
    assert ours.mean() == acc.value and ours.mean("acc_norm") == acc_norm.value


@pytest.mark.slow  # about 20 s: lm-eval run twice over the same tasks
def test_few_shot_and_limit_as_lm_eval_does_them(model, tokenizer):
    ours = zeroshot.evaluate_tasks(model, tokenizer, [TASK], num_fewshot=2, limit=12, include_path=DATA)
    theirs = lm_eval_directly(model, tokenizer, num_fewshot=2, limit=12)
    acc = ours.score(TASK, "acc")
    assert acc.value == theirs["acc,none"] and ours.score(TASK, "acc_norm").value == theirs["acc_norm,none"]
    assert (acc.num_fewshot, acc.samples, ours.num_fewshot, ours.limit) == (2, 12, 2, 12)


def test_the_model_is_scored_in_place_and_the_caller_keeps_its_random_state(model, tokenizer):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zeroshot.evaluate_tasks(model, tokenizer, TASK, limit=4, include_path=DATA)
    assert torch.equal(torch.rand(3), expected)  # lm-eval seeds torch; we give the generator back
    assert model.training  # restored
    model.eval()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_results_round_trip_through_json(model, tokenizer):
    ours = zeroshot.evaluate_tasks(model, tokenizer, TASK, limit=8, include_path=DATA)
    data = json.loads(json.dumps(ours.to_dict()))
    entry = data["results"][TASK]  # metrics as lm-eval names them, beside what describes the task
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "num_fewshot", "samples"} <= set(entry)
    assert data["mean"] == {"metric": "acc", "value": entry["acc"], "tasks": [TASK]}
    back = ZeroShotResults.from_dict(data)
    assert back == ours


def test_scores_of_groups_and_filters_are_named_as_lm_eval_names_them():
    output = {
        "results": {
            "grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": "N/A"},
            "a": {"alias": " - a", "acc,none": 0.4, "acc_stderr,none": 0.1, "sample_len": 10},
            "gen": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05},
        },
        "group_subtasks": {"grp": ["a"]},
        "n-shot": {"a": 0, "gen": 5},
        "n-samples": {"a": {"original": 10, "effective": 10}},
        "configs": {"gen": {"dataset_path": "org/set", "dataset_name": "main", "test_split": "test"}},
    }
    scores = {(s.task, s.metric): s for s in zeroshot._scores(output)}
    assert set(scores) == {("grp", "acc"), ("a", "acc"), ("gen", "exact_match,strict-match")}
    assert scores["grp", "acc"].stderr is None and scores["a", "acc"].subtask_of == "grp"
    gen = scores["gen", "exact_match,strict-match"]
    assert (gen.stderr, gen.num_fewshot, gen.dataset, gen.dataset_config) == (0.05, 5, "org/set", "main")
    assert gen.stderr_key == "exact_match_stderr,strict-match"
    results = ZeroShotResults(list(scores.values()), ["grp", "gen"], "0.4.13")
    assert results.mean() == 0.5  # the group counts once, by its aggregate; its subtask is left out
    assert ZeroShotResults.from_dict(results.to_dict()) == results


# -- through the pruner: report and card ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny 2:4-pruned Llama whose prune() scored the task before and after, and its saved folder."""
    cwd = Path.cwd()
    os.chdir(ROOT)  # module scope: no monkeypatch
    try:
        tokenizer = make_tokenizer()
        config = MAIHTConfig(pattern="2:4", num_samples=8, sequence_length=32, iterations=5)
        pruner = MAIHTPruner(make_tiny_model("llama", seed=3), config, tokenizer=tokenizer)
        pruner.prune(
            calibration_ids(),
            eval_tasks=[TASK],
            eval_task_options={"include_path": str(DATA), "limit": 20},
            progress=False,
        )
        folder = pruner.save_pretrained(tmp_path_factory.mktemp("zs") / "model")
    finally:
        os.chdir(cwd)
    return pruner, folder


def test_prune_measures_before_and_after_into_the_report(pruned, tokenizer):
    pruner, folder = pruned
    zero_shot = pruner.report.zero_shot
    assert set(zero_shot) == {"before", "after"}
    dense = make_tiny_model("llama", seed=3)  # the same weights as before pruning
    expected = zeroshot.evaluate_tasks(dense, tokenizer, TASK, limit=20, include_path=DATA)
    assert zero_shot["before"].scores == expected.scores
    after = zeroshot.evaluate_tasks(pruner.model, tokenizer, TASK, limit=20, include_path=DATA)
    assert zero_shot["after"].scores == after.scores
    assert zero_shot["after"].limit == 20 and zero_shot["after"].score(TASK, "acc").samples == 20
    saved = json.loads((folder / "maiht_report.json").read_text())
    assert saved["zero_shot"]["after"]["results"][TASK]["acc"] == after.score(TASK, "acc").value
    assert saved["zero_shot"]["before"]["lm_eval_version"] == zeroshot.lm_eval_version()
    assert PruneReport.from_dict(saved).zero_shot == zero_shot
    old = {k: v for k, v in saved.items() if k != "zero_shot"}  # a report from before zero-shot existed
    assert PruneReport.from_dict(old).zero_shot is None


def test_card_carries_the_scores_in_the_model_index_and_a_table(pruned):
    import yaml

    pruner, folder = pruned
    text = (folder / "README.md").read_text()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.S)[1])
    (entry,) = meta["model-index"][0]["results"]  # one dataset: the local task
    assert entry["dataset"]["name"] == TASK and entry["dataset"]["type"] == TASK
    assert entry["dataset"]["split"] == "test" and entry["dataset"]["args"] == {"num_few_shot": 0}
    metrics = {(m["type"], "before pruning" in m["name"]): m["value"] for m in entry["metrics"]}
    zero_shot = pruner.report.zero_shot
    for when in ("before", "after"):
        for metric in ("acc", "acc_norm"):
            value = zero_shot[when].score(TASK, metric).value
            assert metrics[metric, when == "before"] == pytest.approx(value, abs=1e-4)
    assert all("first 20 documents per task" in m["name"] for m in entry["metrics"])
    before, after = zero_shot["before"].score(TASK, "acc"), zero_shot["after"].score(TASK, "acc")
    dense, pruned_ = (f"{s.value:.4f} ± {s.stderr:.4f}" for s in (before, after))
    assert f"| `{TASK}` | `acc` | {dense} | {pruned_} |" in text
    assert f"| **mean over 1 task** | `acc` | **{before.value:.4f}** | **{after.value:.4f}** |" in text
    assert f"lm-eval {zeroshot.lm_eval_version()}, 0-shot, first 20 documents per task" in text


def test_card_with_a_hub_task_links_its_dataset(pruned):
    from optimum_maiht.model_card import render_model_card

    report = PruneReport.from_dict(pruned[0].report.to_dict())
    score = TaskScore("arc_easy", "acc", 0.6, 0.01, 0, 100, "allenai/ai2_arc", "ARC-Easy", "test", True)
    report.zero_shot = {"after": ZeroShotResults([score], ["arc_easy"], "0.4.13")}
    card = render_model_card(report)
    (entry,) = card.data.to_dict()["model-index"][0]["results"]
    assert entry["dataset"] == {
        "name": "arc_easy",
        "type": "allenai/ai2_arc",
        "config": "ARC-Easy",
        "split": "test",
        "args": {"num_few_shot": 0},
    }
    assert "| `arc_easy` | `acc` | n/a | 0.6000 ± 0.0100 |" in str(card)


# -- what goes wrong ---------------------------------------------------------------------------------------


def test_missing_extra_is_one_line_saying_what_to_install(monkeypatch, model, tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    with pytest.raises(ImportError) as info:
        zeroshot.evaluate_tasks(model, tokenizer, TASK)
    message = str(info.value)
    assert 'pip install "optimum-maiht[eval]"' in message and "\n" not in message
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(num_samples=4, sequence_length=16), tokenizer)
    weights = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    with pytest.raises(ImportError, match=re.escape('pip install "optimum-maiht[eval]"')):
        pruner.prune(calibration_ids(4, 16), eval_tasks=["boolq"], progress=False)
    assert pruner.report is None  # refused before any pruning
    assert all(torch.equal(weights[k], v) for k, v in pruner.model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "expected"),
    [("hellaswg", "hellaswag"), ("arc_easyy", "arc_easy"), ("BoolQ", "boolq"), ("maiht_mcc", TASK)],
)
def test_unknown_task_lists_close_matches(model, tokenizer, name, expected):
    with pytest.raises(zeroshot.UnknownTaskError) as info:
        zeroshot.evaluate_tasks(model, tokenizer, ["arc_easy", name], include_path=DATA)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and f"unknown lm-eval task {name!r}" in message
    assert re.search(rf"close matches: [^.]*\b{expected}\b", message) and "lm-eval ls tasks" in message


def test_task_whose_data_cannot_be_downloaded_says_so(model, tokenizer, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        (DATA / "maiht_mc.yaml")
        .read_text()
        .replace("task: maiht_mc", "task: maiht_hub_only")
        .replace("dataset_path: json", "dataset_path: optimum-maiht-tests/not-cached-anywhere")
    )
    with pytest.raises(zeroshot.TaskDataUnavailableError) as info:  # conftest: HF_HUB_OFFLINE=1
        zeroshot.evaluate_tasks(model, tokenizer, "maiht_hub_only", include_path=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, ConnectionError)
    dataset = "optimum-maiht-tests/not-cached-anywhere"
    assert f"'maiht_hub_only' (dataset {dataset}) could not be downloaded" in message
    assert "offline" in message and "--include-path" in message


def test_missing_local_data_file_names_the_task(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML's data_files is relative to the repository root
    with pytest.raises(FileNotFoundError, match=f"task '{TASK}'.*working directory"):
        zeroshot.evaluate_tasks(model, tokenizer, TASK, include_path=DATA)
    with pytest.raises(FileNotFoundError, match="include_path"):
        zeroshot.evaluate_tasks(model, tokenizer, TASK, include_path=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tasks": " , "}, "no task given"),
        ({"num_fewshot": -1}, "num_fewshot must be"),
        ({"limit": 0}, "limit must be"),
        ({"limit": 1.5}, "limit must be"),
        ({"batch_size": 0}, "batch_size must be"),
    ],
)
def test_bad_options_are_refused_before_any_work(model, tokenizer, options, match):
    kwargs = {"tasks": TASK, **options}
    with pytest.raises(ValueError, match=match):
        zeroshot.evaluate_tasks(model, tokenizer, **kwargs)


def test_prune_refuses_bad_task_options_before_pruning(tokenizer):
    pruner = MAIHTPruner(make_tiny_model("llama"), MAIHTConfig(num_samples=4, sequence_length=16), tokenizer)
    with pytest.raises(ValueError, match=r"unknown eval_task_options \['shots'\]"):
        pruner.prune(calibration_ids(4, 16), eval_tasks=TASK, eval_task_options={"shots": 1}, progress=False)
    with pytest.raises(zeroshot.UnknownTaskError, match="close matches: .*maiht_mc"):
        pruner.prune(
            calibration_ids(4, 16),
            eval_tasks="maiht_mx",
            eval_task_options={"include_path": DATA},
            progress=False,
        )
    assert pruner.report is None


def test_wikitext_task_warns_that_it_is_another_perplexity(model, tokenizer, caplog):
    with pytest.raises(zeroshot.TaskDataUnavailableError):  # offline: its data is on the Hub
        zeroshot.evaluate_tasks(model, tokenizer, "wikitext")
    assert any("word- and byte-level rolling perplexity" in r.getMessage() for r in caplog.records)


# -- perplexity as the papers measure it -------------------------------------------------------------------


def test_default_perplexity_window_is_the_training_length_capped_at_2048(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_maiht.evaluation import default_sequence_length, perplexity

    tiny = make_tiny_model("llama")  # max_position_embeddings 128
    assert default_sequence_length(tiny) == 128
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=8192,
    )
    assert default_sequence_length(LlamaForCausalLM(config)) == 2048
    text = ["".join(chr(33 + (i * 7) % 90) for i in range(128 * 5))]
    assert perplexity(tiny, tokenizer, text) == perplexity(tiny, tokenizer, text, sequence_length=128)
    assert math.isfinite(perplexity(tiny, tokenizer, text, max_windows=2))


# -- the command line (in process) -------------------------------------------------------------------------


def run_cli(monkeypatch, *args: str) -> int:
    """``optimum-cli ARGS`` in this process; returns the exit code."""
    from optimum.commands import optimum_cli as entry

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    try:
        entry.main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def cli_error(monkeypatch, capsys, *args: str) -> str:
    """The command must fail with exactly one ``error:`` line and no traceback; returns that line."""
    code = run_cli(monkeypatch, *args)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny model of these tests (seed 3) saved with its tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "tiny"
    make_tiny_model("llama", seed=3).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow  # about 20 s: lm-eval run twice over the same tasks
def test_eval_tasks_json_equals_lm_eval_run_directly(monkeypatch, capsys, folder, model, tokenizer):
    args = ["maiht", "eval", "--model", str(folder), "--max-windows", "2", "--json"]
    tasks = ["--tasks", TASK, "--include-path", "tests/data", "--limit", "20", "--num-fewshot", "1"]
    assert run_cli(monkeypatch, *args, *tasks) == 0
    data = json.loads(capsys.readouterr().out)
    theirs = lm_eval_directly(model, tokenizer, limit=20, num_fewshot=1)
    entry = data["zero_shot"]["results"][TASK]
    assert (entry["acc"], entry["acc_stderr"]) == (theirs["acc,none"], theirs["acc_stderr,none"])
    assert (entry["acc_norm"], entry["acc_norm_stderr"]) == (
        theirs["acc_norm,none"],
        theirs["acc_norm_stderr,none"],
    )
    assert entry["num_fewshot"] == 1 and entry["samples"] == 20
    assert (
        data["zero_shot"]["limit"] == 20
        and data["zero_shot"]["lm_eval_version"] == zeroshot.lm_eval_version()
    )
    assert data["zero_shot"]["mean"] == {"metric": "acc", "value": entry["acc"], "tasks": [TASK]}
    assert data["sequence_length"] == 128 and data["windows"] == 2  # the tiny model's training length


def test_eval_tasks_table(monkeypatch, capsys, folder):
    args = ["maiht", "eval", "--model", str(folder), "--max-windows", "1", "--tasks", TASK]
    assert run_cli(monkeypatch, *args, "--include-path", "tests/data", "--limit", "0.25") == 0
    out = capsys.readouterr().out
    assert "the first 1 non-overlapping windows of 128 tokens" in out
    assert "limit 0.25 per task" in out
    assert re.search(rf"^  {TASK}  acc_norm  0\.\d{{4}} \+- 0\.\d{{4}}  0-shot$", out, re.M), out
    assert re.search(r"^  mean acc over 1 task: 0\.\d{4}$", out, re.M), out


def test_prune_eval_tasks_measures_before_and_after(monkeypatch, capsys, folder, tmp_path):
    (tmp_path / "calib.txt").write_text("".join(chr(33 + (i * 7) % 90) for i in range(4000)))
    out = tmp_path / "out"
    args = ["maiht", "prune", "--model", str(folder), "--output", str(out), "--pattern", "2:4"]
    calibration = ["--num-samples", "4", "--sequence-length", "32", "--dataset", str(tmp_path / "calib.txt")]
    tasks = ["--eval-tasks", TASK, "--eval-include-path", "tests/data", "--eval-limit", "10"]
    assert run_cli(monkeypatch, *args, *calibration, "--iterations", "2", *tasks) == 0
    summary = capsys.readouterr().out
    report = PruneReport.from_dict(json.loads((out / "maiht_report.json").read_text()))
    before, after = report.zero_shot["before"], report.zero_shot["after"]
    assert before.limit == after.limit == 10 and after.score(TASK, "acc").samples == 10
    acc = f"{before.score(TASK, 'acc').value:.4f} -> {after.score(TASK, 'acc').value:.4f}"
    assert f"    {TASK} acc  {acc}" in summary and "mean acc over 1 task  " in summary
    card = (out / "README.md").read_text()
    assert f"| `{TASK}` | `acc` |" in card and "type: acc_norm" in card


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--tasks", "hellaswg"], ["--tasks", "unknown lm-eval task 'hellaswg'", "close matches: hellaswag"]),
        (["--tasks", "arc_easy", "--limit", "0"], ["--limit 0", "fraction"]),
        (["--tasks", "arc_easy", "--limit", "1.5"], ["--limit 1.5"]),
        (["--tasks", "arc_easy", "--num-fewshot", "-1"], ["--num-fewshot -1", "0 or more"]),
        (["--tasks", "arc_easy", "--include-path", "nowhere"], ["--include-path nowhere", "no such folder"]),
        (["--limit", "5"], ["--limit given without --tasks"]),
        (["--tasks", " , "], ["--tasks", "no task given"]),
    ],
)
def test_eval_bad_task_flags_are_one_line_errors(monkeypatch, capsys, folder, flags, words):
    line = cli_error(monkeypatch, capsys, "maiht", "eval", "--model", str(folder), *flags)
    for word in words:
        assert word in line


def test_eval_without_the_extra_or_offline_says_what_to_do(monkeypatch, capsys, folder, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        (DATA / "maiht_mc.yaml").read_text().replace("dataset_path: json", "dataset_path: org/not-cached")
    )
    args = ["maiht", "eval", "--model", str(folder), "--max-windows", "1", "--tasks", TASK]
    line = cli_error(monkeypatch, capsys, *args, "--include-path", str(tmp_path))
    assert f"the data of task '{TASK}' (dataset org/not-cached) could not be downloaded" in line
    assert "offline" in line and "--include-path" in line
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    line = cli_error(monkeypatch, capsys, *args)
    assert 'pip install "optimum-maiht[eval]"' in line
    prune = [
        "maiht",
        "prune",
        "--model",
        str(folder),
        "--output",
        str(tmp_path / "out"),
        "--eval-tasks",
        TASK,
    ]
    assert 'pip install "optimum-maiht[eval]"' in cli_error(monkeypatch, capsys, *prune)
    assert not (tmp_path / "out").exists()
