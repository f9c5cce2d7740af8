#!/usr/bin/env bash
# One-command GPU check on a bare machine (python, torch, triton, numpy; no mujoco / gymnasium):
#   bash bench/device_check.sh [OUT]          # OUT defaults to bench/results/device-check
#   bash bench/device_check.sh --dry-run OUT  # on a CPU: runs every step that can run there
# Steps, each bounded so the whole run stays under 8 minutes: build + install the extension, the
# CUDA tests under torch.cuda.set_sync_debug_mode("error"), the timed ops (bench/device_check.py),
# one paper-size ddppo-sn update eager / --compile / --compile --cuda-graphs (bench/update.py with
# synthetic transitions), and the inductor / cudagraph counters. Prints a summary; JSON under OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-bench/results/device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
declare -A STATUS
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}
if [ $DRY = 1 ]; then
  step build 300 "$PY" -c "import fastrp, fastrp.ops, fastrp.nn; print('import ok, extension', fastrp.has_ext())"
  step cuda-tests 300 "$PY" -m pytest -q -x -m cuda tests/test_capture_safety.py tests/test_mlp.py
  step ops 120 "$PY" bench/device_check.py --dry-run --out "$OUT"
  step update 300 "$PY" bench/update.py --quick --synthetic --device cpu --providers eager,fastrp --json "$OUT/update.json"
else
  step build 150 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
  step cuda-tests 150 "$PY" -m pytest -q -x -m cuda -p no:cacheprovider tests
  step ops 60 "$PY" bench/device_check.py --out "$OUT"
  step update 150 env TORCHINDUCTOR_COMPILE_THREADS=16 "$PY" bench/update.py --device cuda --synthetic --repeats 3 \
    --model-epochs 1 --counters --json "$OUT/update.json"
fi
echo
echo "== summary ($OUT)"
for name in build cuda-tests ops update; do echo "  $name: ${STATUS[$name]:-not run}"; done
grep -h -E "passed|failed|error" "$OUT/cuda-tests.log" | tail -n 1 | sed 's/^/  tests: /'
grep -h -E "^\| (ensemble|knn)" "$OUT/ops.log" | sed 's/^/  /'
grep -h -E "^\| (eager|fastrp)" "$OUT/update.log" | sed 's/^/  /'
grep -h -E "^counters" "$OUT/update.log" | sed 's/^/  /'
