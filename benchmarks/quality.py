"""Quality benchmark: WikiText-2 perplexity of the demo model pruned by mAIHT and by its peers.

Methods (``--methods``):

* ``dense``: the unpruned model (run once, whatever the settings);
* ``magnitude``: ours, keep the largest ``|W|`` over each whole layer (N:M: per group), through the pipeline
  (``MAIHTConfig(solver="magnitude", scope="layer")``: its calibration pass runs, the mask ignores it);
* ``wanda-llmc``, ``sparsegpt-llmc``: llm-compressor's ``WandaPruningModifier`` / ``SparseGPTModifier``
  through ``oneshot`` (its sequential pipeline, its defaults, ``lm_head`` ignored);
* ``maiht``: ``optimum_maiht.MAIHTPruner`` at its defaults (since issue #29: mAIHT from SparseGPT's
  solution, then two epochs of the block refit; ``--maiht-option key=value`` overrides a ``MAIHTConfig``
  field, and the run is then labelled with it); ``maiht-fast``: the ``"fast"`` preset
  (``MAIHTConfig.from_preset("fast")``);
* not run unless asked for: ``maiht-solve`` (the defaults without the refit: the layer solves alone),
  ``maiht-rec`` (mAIHT from Wanda's mask plus 4 epochs of the refit, the setting of the earlier
  reconstruction table), ``wanda-rec`` / ``sparsegpt-rec`` (Wanda's mask, or our SparseGPT's masks and
  weights, plus the defaults' refit: the ablation of the start), ``sparsegpt-ref`` (our SparseGPT alone,
  ``optimum_maiht.solvers.sparsegpt``, the paper's Algorithm 1 with its mask choice over each 128-column
  block: ``solver="sparsegpt", scope="layer"``; it checks our SparseGPT against ``sparsegpt-llmc``).
  ``--maiht-option`` applies to all of these. Records made before issue #29 ran ``wanda-rec`` and
  ``sparsegpt-rec`` with 4 epochs and ``maiht`` without the refit: each record's ``details.config`` says.

Every method but ``dense`` and the two llm-compressor ones runs in ``MAIHTPruner``'s pipeline with the
solver its ``MAIHTConfig`` names (:data:`PIPELINE_METHODS`); the record's ``details.solver`` is the
report's.

Settings (``--settings``): ``50%``, ``60%``, ``70%`` (unstructured), ``2:4``, ``4:8``.

Every method prunes the decoder blocks' linear layers (never ``lm_head``, tied to the embedding) on the
same calibration tensor (64 x 512 tokens of WikiText-2 validation, seed 0) and is scored on the same
non-overlapping 512-token windows of WikiText-2 test (``--eval-windows N`` takes the first N, 0 = all).
Each run is a subprocess of its own, so its peak resident memory is its own; each appends one record to
``benchmarks/results/quality.json``. ``benchmarks/report_quality.py`` turns that file into the table and the
plot. Run it with the benchmark virtualenv (``benchmarks/setup_llmcompressor.sh``):

    benchmarks/.venv-llmcompressor/bin/python benchmarks/quality.py --eval-windows 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    CALIB_LENGTH,
    CALIB_SAMPLES,
    EVAL_LENGTH,
    RESULTS_DIR,
    calibration_ids,
    command_line,
    load_demo,
    machine,
    parse_options,
    tensor_digest,
    test_windows,
    versions,
)

from optimum_maiht import MAIHTConfig, MAIHTPruner
from optimum_maiht.configuration import PRESETS
from optimum_maiht.evaluation import perplexity, sparsity_by_layer_type

logger = logging.getLogger("quality")

OFF = {"reconstruction_epochs": 0}
PIPELINE_METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"solver": "magnitude", "scope": "layer", **OFF},
    "maiht": {"solver": "maiht"},
    "maiht-fast": {"solver": "maiht", **PRESETS["fast"]},
    "maiht-solve": {"solver": "maiht", **OFF},
    "maiht-rec": {"solver": "maiht", "start": "wanda", "reconstruction_epochs": 4},
    "wanda-rec": {"solver": "wanda"},
    "sparsegpt-ref": {"solver": "sparsegpt", "scope": "layer", **OFF},
    "sparsegpt-rec": {"solver": "sparsegpt", "scope": "layer"},
}
"""Methods run by ``MAIHTPruner``'s pipeline: the ``MAIHTConfig`` fields each sets (``--maiht-option``
overrides them)."""
OPTION_METHODS = [m for m in PIPELINE_METHODS if m != "magnitude"]
"""The methods ``--maiht-option`` applies to (magnitude stays the plain baseline, unlabelled)."""
DEFAULT_METHODS = ["dense", "magnitude", "wanda-llmc", "sparsegpt-llmc", "maiht", "maiht-fast"]
METHODS = DEFAULT_METHODS + ["maiht-solve", "maiht-rec", "wanda-rec", "sparsegpt-ref", "sparsegpt-rec"]
SETTINGS = ["50%", "60%", "70%", "2:4", "4:8"]
RESULTS = RESULTS_DIR / "quality.json"
REPORTS = RESULTS_DIR.parent / "work" / "reports"
"""Where each pipeline run's ``maiht_report`` is saved (ignored by git)."""


def parse_setting(setting: str) -> tuple[float, str]:
    """``"50%"`` -> ``(0.5, "unstructured")``; ``"2:4"`` -> ``(0.5, "2:4")``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", setting)
    if match:
        sparsity = float(match[1]) / 100
        if not 0 < sparsity < 1:
            raise ValueError(f"setting {setting!r}: the percentage must lie strictly between 0 and 100")
        return sparsity, "unstructured"
    match = re.fullmatch(r"(\d+):(\d+)", setting)
    if match and 0 < int(match[1]) < int(match[2]):
        return 1 - int(match[1]) / int(match[2]), setting
    raise ValueError(f"setting {setting!r} must be a percentage like '50%' or an N:M pattern like '2:4'")


# --------------------------------------------------------------------------------------------------
# one run, in its own process


def prune_llmc(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    method: str,
    sparsity: float,
    pattern: str,
    batch_size: int,
) -> dict[str, Any]:
    """llm-compressor's oneshot with our calibration windows as a pre-tokenized dataset (no shuffling)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    modifier_cls = SparseGPTModifier if method == "sparsegpt-llmc" else WandaPruningModifier
    mask_structure = "0:0" if pattern == "unstructured" else pattern
    modifier = modifier_cls(
        sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"]
    )
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=[modifier],
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=batch_size,
        pipeline="sequential",
        output_dir=None,
    )
    return {"modifier": modifier.model_dump(mode="json", exclude_none=True)}


def geometric_mean(values: list[float]) -> float:
    """Geometric mean (values floored at 1e-30, so that an exact fit does not zero it)."""
    return float(torch.tensor(values, dtype=torch.float64).clamp_min(1e-30).log().mean().exp())


def prune_pipeline(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    sparsity: float,
    pattern: str,
    batch_size: int,
    seed: int,
    fields: dict[str, Any],
    report_dir: Path,
) -> dict[str, Any]:
    """``MAIHTPruner`` on the given calibration tensor with the ``MAIHTConfig`` ``fields`` (the solver among
    them); the report is saved in ``report_dir``, its summary returned."""
    settings = {
        "sparsity": sparsity if pattern == "unstructured" else None,
        "pattern": pattern,
        "num_samples": int(ids.shape[0]),
        "sequence_length": int(ids.shape[1]),
        "batch_size": batch_size,
        "seed": seed,
        **fields,
    }
    pruner = MAIHTPruner(model, MAIHTConfig(**settings), tokenizer=tokenizer, device="cpu")
    pruner.prune(ids, progress=False)
    report = pruner.report
    report_dir.mkdir(parents=True, exist_ok=True)
    name = f"{report.solver}-{pattern.replace(':', 'of')}-{sparsity:g}-{int(time.time())}.json"
    (report_dir / name).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    layers = report.pruned
    rebuilt = report.reconstruction
    return {
        "solver": report.solver,
        "config": report.config,
        "geomean_layer_error_wanda_mask": geometric_mean([layer.error_wanda for layer in layers]),
        "geomean_layer_error": geometric_mean([layer.error for layer in layers]),
        "solver_seconds": round(sum(layer.seconds for layer in layers), 2),
        "reconstruction": None if rebuilt is None else [block.to_dict() for block in rebuilt],
    }


def run_one(
    model_folder: str | None,
    method: str,
    setting: str,
    eval_windows: int,
    seed: int,
    batch_size: int,
    calib: tuple[int, int],
    options: dict[str, Any],
) -> dict[str, Any]:
    """Load the model, prune it with ``method`` at ``setting``, evaluate it: one result record
    (``options``: the ``--maiht-option`` fields, for the methods of :data:`OPTION_METHODS`)."""
    torch.manual_seed(seed)
    model, tokenizer, path = load_demo(folder=model_folder)
    embedding = model.get_input_embeddings().weight.detach().clone()
    ids = calibration_ids(tokenizer, *calib, seed)
    sparsity, pattern = (0.0, "dense") if method == "dense" else parse_setting(setting)
    details: dict[str, Any] = {}
    start = time.perf_counter()
    if method in ("wanda-llmc", "sparsegpt-llmc"):
        details = prune_llmc(model, tokenizer, ids, method, sparsity, pattern, batch_size)
    elif method in PIPELINE_METHODS:
        fields = {**PIPELINE_METHODS[method], **options}
        details = prune_pipeline(model, tokenizer, ids, sparsity, pattern, batch_size, seed, fields, REPORTS)
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    prune_seconds = time.perf_counter() - start
    rss_prune = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if not torch.equal(model.get_input_embeddings().weight.detach(), embedding):
        raise RuntimeError(f"{method} changed the input embedding (tied to lm_head): the run is invalid")
    windows = test_windows(tokenizer, eval_windows)
    start = time.perf_counter()
    ppl = perplexity(model, None, windows, EVAL_LENGTH, batch_size=4)
    eval_seconds = time.perf_counter() - start
    label = method if not options else method + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"
    return {
        "method": label,
        "setting": "dense" if method == "dense" else setting,
        "sparsity_target": sparsity,
        "pattern": pattern,
        "sparsity_measured": round(sparsity_by_layer_type(model)["overall"], 6),
        "ppl": ppl,
        "eval": {
            "dataset": "WikiText-2 test",
            "sequence_length": EVAL_LENGTH,
            "windows": int(windows.shape[0]),
            "all_windows": eval_windows == 0,
            "tokens": int(windows.numel()),
            "sha256": tensor_digest(windows),
        },
        "calibration": {
            "dataset": "WikiText-2 validation",
            "num_samples": int(ids.shape[0]),
            "sequence_length": int(ids.shape[1]),
            "seed": seed,
            "batch_size": batch_size,
            "sha256": tensor_digest(ids),
        },
        "prune_seconds": round(prune_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "peak_rss_mb_prune": round(rss_prune, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "details": details,
        "model": (
            f"SmolLM2-135M-Instruct (offline demo model, fp32, {path.name})"
            if model_folder is None
            else f"{model.config.model_type} ({path.name})"
        ),
        "machine": machine(),
        "versions": versions(),
        "worker_command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------------
# the driver


def append_record(record: dict[str, Any], results: Path) -> None:
    """Append one record to the JSON list in ``results`` (written atomically)."""
    records = json.loads(results.read_text()) if results.is_file() else []
    records.append(record)
    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=results.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(json.dumps(records, indent=1) + "\n")
    os.replace(tmp.name, results)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated, from " + ", ".join(SETTINGS).replace("%", "%%"),
    )
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=64,
        help="first N 512-token windows of WikiText-2 test; 0 = the whole split",
    )
    parser.add_argument(
        "--model", default=None, help="a local float32 model folder (default: the offline demo model)"
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration window seed")
    parser.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES, help="calibration windows")
    parser.add_argument("--calib-length", type=int, default=CALIB_LENGTH, help="tokens per window")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="calibration windows per forward pass, for every method"
    )
    parser.add_argument(
        "--maiht-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a MAIHTConfig field for every run of {', '.join(OPTION_METHODS)} (repeatable)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON list the records are appended to")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    options = parse_options(args.maiht_option)

    if args.worker:
        record = run_one(
            args.model,
            *args.worker,
            args.eval_windows,
            args.seed,
            args.batch_size,
            (args.calib_samples, args.calib_length),
            options,
        )
        args.record.write_text(json.dumps(record) + "\n")
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {METHODS}")
    for s in settings:
        try:
            parse_setting(s)
        except ValueError as err:
            parser.error(str(err))
    runs = [(m, "dense") for m in methods if m == "dense"]
    runs += [(m, s) for s in settings for m in methods if m != "dense"]
    driver_command = command_line()
    # a driver terminated by `timeout` or `kill` takes its running worker with it: SystemExit interrupts
    # subprocess.run, which then kills the child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    failures = 0
    for method, setting in runs:
        with tempfile.TemporaryDirectory() as tmp:
            record_file = Path(tmp) / "record.json"
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                method,
                setting,
                "--eval-windows",
                str(args.eval_windows),
                "--seed",
                str(args.seed),
                "--batch-size",
                str(args.batch_size),
                "--calib-samples",
                str(args.calib_samples),
                "--calib-length",
                str(args.calib_length),
                "--record",
                str(record_file),
            ]
            if args.model is not None:
                command += ["--model", args.model]
            if method in OPTION_METHODS:
                command += [f"--maiht-option={o}" for o in args.maiht_option]
            logger.info("run %s at %s", method, setting)
            start = time.perf_counter()
            done = subprocess.run(command, check=False)
            if done.returncode or not record_file.is_file():
                logger.error("%s at %s failed (exit code %d)", method, setting, done.returncode)
                failures += 1
                continue
            record = json.loads(record_file.read_text())
        record["command"] = driver_command
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        append_record(record, args.results)
        logger.info(
            "%s at %s: perplexity %.3f, prune %.1f s, peak RSS %.0f MB",
            record["method"],
            setting,
            record["ppl"],
            record["prune_seconds"],
            record["peak_rss_mb"],
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
