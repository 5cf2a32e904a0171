"""What every benchmark script shares: the demo model, the one calibration tensor, the machine, the versions.

Every method in ``quality.py`` and ``layer_errors.py`` gets exactly the tensor :func:`calibration_ids`
returns (64 windows x 512 tokens of WikiText-2 validation, seed 0 by default), and is evaluated on
WikiText-2 test with the same windows; the tensor's SHA-256 goes into every record to show it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO_DIR = BENCH_DIR.parent
DATA_DIR = Path(os.environ.get("WIKITEXT2_DIR", REPO_DIR.parent / "shared" / "data" / "wikitext-2-raw-v1"))
VALIDATION = "validation-00000-of-00001.parquet"
TEST = "test-00000-of-00001.parquet"

CALIB_SAMPLES = 64
CALIB_LENGTH = 512
EVAL_LENGTH = 512
BEFORE_29 = {"start": "wanda", "reconstruction_epochs": 0}
"""The package defaults before issue #29 (mAIHT from Wanda's mask, no block refit): the committed results
of the scripts that pass these fields were measured with them, and they reproduce those results."""


def wikitext2(split_file: str) -> str:
    """The split's texts joined with blank lines (from ``../shared/data``; ``WIKITEXT2_DIR`` overrides)."""
    path = DATA_DIR / split_file
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 file not found: {path}; set WIKITEXT2_DIR to its folder")
    import pyarrow.parquet as pq

    return "\n\n".join(pq.read_table(path, columns=["text"]).column("text").to_pylist())


def load_demo(dtype: torch.dtype = torch.float32, folder: str | Path | None = None) -> tuple[Any, Any, Path]:
    """The offline demo model (SmolLM2-135M-Instruct, fp32 folder), or the model of a local ``folder``
    (e.g. Gemma 3 270M saved in float32), its tokenizer and its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_maiht.demo import demo_model_path

    path = Path(folder) if folder is not None else demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, path


def calibration_ids(
    tokenizer: Any, num_samples: int = CALIB_SAMPLES, length: int = CALIB_LENGTH, seed: int = 0
) -> torch.Tensor:
    """``LongTensor[num_samples, length]``: seeded windows of WikiText-2 validation, BOS first."""
    from optimum_maiht.data import prepare_calibration

    # a list, not a str: a plain string would be read as a file path or a bundled text's name
    return prepare_calibration([wikitext2(VALIDATION)], tokenizer, num_samples, length, seed=seed)


def test_windows(tokenizer: Any, count: int) -> torch.Tensor:
    """The first ``count`` non-overlapping ``EVAL_LENGTH``-token windows of WikiText-2 test (0 = all)."""
    from optimum_maiht.data import special_prefix, token_windows, tokenize

    return token_windows(
        tokenize(tokenizer, wikitext2(TEST)), count or None, EVAL_LENGTH, special_prefix(tokenizer)
    )


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (shows that every method saw the same calibration)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def machine() -> dict[str, Any]:
    """The CPU / GPU this ran on, the vector instructions torch's CPU kernels use (``"AVX512"``,
    ``"AVX2"``...: one CPU name can cover both), and how many threads torch used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "optimum-maiht"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:  # the exact optimum-maiht source: commit, plus "+dirty" when the work tree has local changes
        git = ["git", "-C", str(REPO_DIR)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", "optimum_maiht"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        found["optimum-maiht-commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return found


def command_line() -> str:
    """This process's command line, relative to the repository root when possible."""
    argv = [sys.executable, *sys.argv]
    return " ".join(shlex.quote(a) for a in argv).replace(str(REPO_DIR) + "/", "")


def parse_options(options: list[str]) -> dict[str, Any]:
    """``["iterations=40", "scope=layer"]`` -> ``{"iterations": 40, "scope": "layer"}`` (JSON values)."""
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"option {option!r} must look like key=value, e.g. iterations=40")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed
