#!/usr/bin/env bash
# Regenerate tests/data/peers/ with the real peer libraries, each in its own throwaway venv outside the repo.
#   bash scripts/peer_fixtures/make_all.sh            # all peers
#   bash scripts/peer_fixtures/make_all.sh saelens    # one (saelens | sparsify | dictionary_learning | circuit_tracer)
# sparsedict's own side (export_circuit_tracer.py) runs with $SPARSEDICT_PYTHON (default: the repo's .venv).
# For saelens it also writes our own SAELens exports (with $SPARSEDICT_PYTHON, default the repo's .venv) and
# has SAELens load and run them (check_sparsedict_exports.py): tests/data/peers/saelens/export_*.
# Venvs live in $PEER_VENVS (default /tmp/peer-venvs); the CPU torch wheel is installed first in each and
# pinned, so no peer pulls a CUDA build. Fixtures are deterministic (fixed seeds, CPU, one thread,
# PYTHONHASHSEED=0, which fixes the key order of SAELens' inference cfg.json): rerunning rewrites identical
# files. Nothing from the peers goes into the repository except the checkpoints they write.
set -euo pipefail
cd "$(dirname "$0")"
VENVS=${PEER_VENVS:-/tmp/peer-venvs}
OURS=${SPARSEDICT_PYTHON:-../../.venv/bin/python}  # sparsedict's own venv (scripts/setup.sh), for our exports
PY=${PYTHON:-python3}
TORCH=torch==2.13.0
declare -A PIN=(
  [saelens]="sae-lens==6.54.12"
  [sparsify]="eai-sparsify==1.3.3"
  [dictionary_learning]="dictionary-learning==0.1.0"
  [circuit_tracer]="circuit-tracer==0.5.0"
)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export XDG_CACHE_HOME="$VENVS/cache" MPLCONFIGDIR="$VENVS/cache/mpl"
# Keep the CPU torch: without this constraint dictionary-learning's nnsight pulls the newest torchvision,
# which needs a newer torch and brings a CUDA build with it. The torchvision that matches torch 2.13 exists
# only as a CUDA build, whose operators fail to register on the CPU torch (and transformers imports it when
# present); nothing dictionary_learning or nnsight runs uses it, so it is removed again.
mkdir -p "$VENVS"
echo "$TORCH" > "$VENVS/constraints.txt"

for peer in "${@:-saelens sparsify dictionary_learning circuit_tracer}"; do
  for p in $peer; do
    venv="$VENVS/$p"
    if [ ! -x "$venv/bin/python" ]; then "$PY" -m venv "$venv"; fi
    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then "$venv/bin/python" -m pip install -q "$TORCH"; fi
    name=${PIN[$p]%%==*} want=${PIN[$p]##*==}
    have=$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
    if [ "$have" != "$want" ]; then "$venv/bin/python" -m pip install -q -c "$VENVS/constraints.txt" "${PIN[$p]}"; fi
    if [ "$p" = dictionary_learning ]; then "$venv/bin/python" -m pip uninstall -q -y torchvision || true; fi
    "$venv/bin/python" -c "import torch; assert torch.__version__ == '${TORCH#torch==}+cpu', torch.__version__"
    echo "== $p (${PIN[$p]}) in $venv"
    # the sd_* fixtures: checkpoints sparsedict exports, which circuit-tracer then loads and runs
    if [ "$p" = circuit_tracer ]; then "${SPARSEDICT_PYTHON:-../../.venv/bin/python}" export_circuit_tracer.py; fi
    "$venv/bin/python" "gen_${p}.py"
    if [ "$p" = saelens ]; then  # our exports, loaded and run by SAELens (fails unless it reproduces ours)
      "$OURS" gen_sparsedict_exports.py
      "$venv/bin/python" check_sparsedict_exports.py
    fi
  done
done
