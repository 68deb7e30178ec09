#!/usr/bin/env bash
# One prepared GPU check for the kernels (issue 7): GPU kernel tests, then benchmarks/kernels.py.
# Run from the repo root on a CUDA machine. Outputs go to $OUT (default ./gpu_out).
# Works without installing sparsedict: src/sparsedict + kernels/ are copied into a temporary package dir.
# Budget knobs: FULL_MAX (seconds after which the full shape set stops starting new shapes).
set -u
OUT=${OUT:-$(pwd)/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SITE=$(mktemp -d)
mkdir -p "$SITE/sparsedict"
cp -r src/sparsedict/. "$SITE/sparsedict/"
rm -rf "$SITE/sparsedict/kernels" && cp -r kernels "$SITE/sparsedict/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} | tee "$OUT/machine.txt"

echo "== GPU kernel tests"
timeout 120 $PY -m pytest tests/test_kernels_gpu.py -m gpu -q -p no:cacheprovider -rA 2>&1 | tail -40 | tee "$OUT/pytest_gpu.txt"

echo "== benchmark: quick (d=768, n=32768, k=32, B=4096)"
timeout 110 $PY benchmarks/kernels.py --quick --tune --json "$OUT/bench_quick.jsonl" 2>&1 | tee "$OUT/bench_quick.txt"

echo "== benchmark: issue shape set"
timeout $(( ${FULL_MAX:-100} + 60 )) $PY benchmarks/kernels.py --max-seconds "${FULL_MAX:-100}" \
  --json "$OUT/bench_full.jsonl" 2>&1 | tee "$OUT/bench_full.txt"
echo "== done"
