#!/usr/bin/env bash
# One prepared GPU check for the kernels (issue 7), <= 8 minutes of wall time on an H100 (every step runs
# under `timeout`): GPU kernel tests, the quick benchmark (d=768, n=32768, k=32, B=4096, bf16) with both
# encode algorithms (merge / filter), both grouped-sum implementations (tiled Triton / torch), the full
# TopK step fused vs reference, the GEMM roofline fraction and the tuning variants, then the issue shape set
# (filter encode + tiled sums vs reference) under a time cap, and a SUMMARY of the fastest variants.
# Run from the repo root on a CUDA machine. Outputs go to $OUT (default ./gpu_out).
# Works without installing sparsedict: src/sparsedict + kernels/ are copied into a temporary package dir.
# Budget knobs (seconds): TEST_MAX (pytest), QUICK_MAX (quick + tune), FULL_MAX (the shape set stops
# starting new shapes after this long; its hard timeout is FULL_MAX + 50).
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
T0=$(date +%s)

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} | tee "$OUT/machine.txt"

echo "== GPU kernel tests (merge + filter encode, fallback, grouped sums, decode, normalised Adam)"
timeout -k 10 "${TEST_MAX:-165}" $PY -m pytest tests/test_kernels_gpu.py -m gpu -q -p no:cacheprovider -rA 2>&1 \
  | tee "$OUT/pytest_gpu_full.txt" | grep -v "^PASSED\|^$" | tail -60 | tee "$OUT/pytest_gpu.txt"
echo "# tests done at +$(( $(date +%s) - T0 ))s"

echo "== benchmark: quick (d=768, n=32768, k=32, B=4096) + tuning variants"
timeout -k 10 "${QUICK_MAX:-175}" $PY benchmarks/kernels.py --quick --tune --json "$OUT/bench_quick.jsonl" 2>&1 \
  | tee "$OUT/bench_quick.txt"
echo "# quick done at +$(( $(date +%s) - T0 ))s"

echo "== benchmark: issue shape set (filter encode, tiled sums; capped at ${FULL_MAX:-40}s)"
timeout -k 10 $(( ${FULL_MAX:-40} + 50 )) $PY benchmarks/kernels.py --max-seconds "${FULL_MAX:-40}" \
  --ops topk_encode,sparse_decode,topk_step --variants filter,tiled \
  --json "$OUT/bench_full.jsonl" 2>&1 | tee "$OUT/bench_full.txt"

echo "== SUMMARY (fastest variants; knobs: sparsedict.kernels.topk_encode.DEFAULT_ALGORITHM or"
echo "   SPARSEDICT_TOPK_ALGORITHM=merge|filter; default_filter_config; sparse_decode.GROUPED_SUM_IMPL /"
echo "   SPARSEDICT_GROUPED_SUM=tiled|torch; sparse_decode.GROUPED_SUM_CONFIG)"
grep -h "^# GEMM\|^# best\|^# tune best\|^# tune encode .* filter default\|^# tune encode .* stage A\|^topk_step\|filter counts" \
  "$OUT/bench_quick.txt" "$OUT/pytest_gpu_full.txt" 2>/dev/null | tee "$OUT/summary.txt"
grep -h "passed\|failed" "$OUT/pytest_gpu.txt" | tail -1 | tee -a "$OUT/summary.txt"
echo "== done at +$(( $(date +%s) - T0 ))s"
