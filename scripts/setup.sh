#!/usr/bin/env bash
# Idempotent set-up: a project-local virtual environment with everything installed.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first (never the multi-GB CUDA build);
# the rest of the stack then sees its torch requirement already met. Re-running is a no-op unless
# pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
stamp=.venv/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run takes about two minutes) ..." >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.3"          # GPU machine: the default (CUDA) build
  else
    "${pip[@]}" "$TORCH_CPU_SPEC"     # CPU machine: the CPU build
  fi
fi
"${pip[@]}" -e ".[dev]"
echo "$want" > "$stamp"
