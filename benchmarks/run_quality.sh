#!/usr/bin/env bash
# Reproduce the quality benchmark with one command: benchmark venv (created if missing), every method at
# every setting (each run in its own process, one at a time), the per-layer comparison, then the table
# and the plot. Extra arguments go to quality.py, e.g. --methods maiht --settings 50%,2:4.
#   bash benchmarks/run_quality.sh                  # quick: first 64 test windows of 512 tokens
#   EVAL_WINDOWS=0 bash benchmarks/run_quality.sh   # the whole WikiText-2 test split
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${LLMC_VENV:-$here/.venv-llmcompressor}"
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llmcompressor, optimum_maiht" 2>/dev/null \
  || bash "$here/setup_llmcompressor.sh"
py="$venv/bin/python"
"$py" "$here/quality.py" --eval-windows "${EVAL_WINDOWS:-64}" "$@"
"$py" "$here/layer_errors.py"
"$py" "$here/report_quality.py"
