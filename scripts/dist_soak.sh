#!/usr/bin/env bash
# Soak the end of finished 2-rank torchrun jobs: run the latent-sharded and the data-parallel job of
# tests/dist_worker.py (gloo, CPU; the jobs of tests/test_distributed.py) RUNS times each, alternating,
# while a CPU-bound torch job runs beside them, and count the runs that did not exit 0 and the aborts
# among them ("terminate called ...", SIGABRT). A finished job must exit 0 every time. Also counted: runs
# whose rank 0 still had gloo threads after destroy() (the group was not freed; such threads race
# interpreter shutdown, which is what aborts a rank now and then).
#
#   scripts/dist_soak.sh [RUNS]            # default 30 of each
#   SRC=/path/to/other/checkout scripts/dist_soak.sh 30   # that checkout's src/ (this tests/dist_worker.py)
#   LOAD=0 ...                             # without the job beside
#   CORES=1 ...                            # keep core dumps of aborted ranks (core_pattern permitting)
#
# Prints one line per run and a summary; logs (and cores) of failed runs stay in $OUT (default: a
# temporary directory, printed). Exit status 1 when any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-30}
HERE=$PWD
PY=${PYTHON:-$PWD/.venv/bin/python}
SRC=${SRC:-$PWD}
OUT=${OUT:-$(mktemp -d -t dist_soak.XXXXXX)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHONFAULTHANDLER=1 PYTHONPATH="$SRC/src${PYTHONPATH:+:$PYTHONPATH}"
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
[ "${CORES:-0}" = 1 ] && ulimit -c unlimited

load_pid=
if [ "${LOAD:-1}" = 1 ]; then
  "$PY" -c 'import torch
torch.set_num_threads(2)
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a)' &
  load_pid=$!
  trap 'kill "$load_pid" 2>/dev/null' EXIT
fi

echo "soak: $RUNS runs of each job; src $SRC; load ${LOAD:-1} (pid ${load_pid:-none}); logs in $OUT"
echo "      $(uptime)"
declare -A ran=() failed=() aborted=() leaked=()
for i in $(seq 1 "$RUNS"); do
  for job in sharded dp; do
    dir="$OUT/$job-$i"
    mkdir -p "$dir"
    if [ "$job" = sharded ]; then
      opts="{\"steps\": 40, \"batch\": 128, \"n\": 128, \"dead_tokens\": 384, \"shard_latents\": true, \"out_dir\": \"$dir/out\"}"
    else
      opts="{\"steps\": 40, \"batch\": 128, \"out_dir\": \"$dir/out\"}"
    fi
    (cd "$dir" && "$PY" -m torch.distributed.run --standalone --nproc-per-node=2 \
      "$HERE/tests/dist_worker.py" "$opts" >log 2>&1)
    rc=$?
    abort=0
    grep -aq "terminate called\|SIGABRT\|Fatal Python error: Aborted" "$dir/log" && abort=1
    ran[$job]=$((${ran[$job]:-0} + 1))
    if [ -f "$dir/out/done.json" ] && ! grep -q '"gloo_threads_after_destroy": \[\]' "$dir/out/done.json"; then
      leaked[$job]=$((${leaked[$job]:-0} + 1))
    fi
    if [ "$rc" != 0 ]; then
      failed[$job]=$((${failed[$job]:-0} + 1))
      aborted[$job]=$((${aborted[$job]:-0} + abort))
      echo "  $job $i: exit $rc, abort $abort  ($dir/log)"
    else
      echo "  $job $i: exit 0"
      rm -rf "$dir"
    fi
  done
done
echo "      $(uptime)"
status=0
for job in sharded dp; do
  echo "summary $job: runs ${ran[$job]:-0}, non-zero exits ${failed[$job]:-0}, aborts ${aborted[$job]:-0}," \
    "group not freed by destroy() ${leaked[$job]:-0}"
  [ "${failed[$job]:-0}" = 0 ] || status=1
done
exit $status
