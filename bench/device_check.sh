#!/usr/bin/env bash
# One-command GPU check on a bare machine (python, torch, triton, numpy; no mujoco / gymnasium):
#   bash bench/device_check.sh [OUT]          # OUT defaults to bench/results/device-check
#   bash bench/device_check.sh --dry-run OUT  # on a CPU: runs every step that can run there
# Steps, each with a time limit; the limits (plus the 2 s grace of each kill) add up to 478 s, so
# the whole run ends within 8 minutes whatever happens:
#   build        150 s  build + install the extension (nvcc; without ninja the four sources compile
#                       one after another)
#   cuda-tests   100 s  pytest -m cuda in six processes side by side (each compiles its own Triton
#                       kernels); every op call of the CUDA tests of ops and nn runs under
#                       torch.cuda.set_sync_debug_mode("error")
#   ops           40 s  bench/device_check.py: ensemble_mlp fwd+bwd eager / fused / both in a CUDA
#                       graph, kNN at N = Q = 1e6
#   update       180 s  one paper-size ddppo-sn update (synthetic transitions) eager, fastrp,
#                       --compile and --compile --cuda-graphs in one process, 2 timed repeats each
#                       after a warm-up (the two compiled providers compile their closures there:
#                       about a minute each with 16 compile threads), with the torch.compile
#                       counters of each provider; the JSON is rewritten after every provider, so
#                       a step stopped by its limit keeps what it measured
# Prints a summary; logs and JSON (device name, versions, date) under OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-bench/results/device-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PY OUT
declare -A STATUS
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=2 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}
# pytest -m cuda in six groups of tests at once (Triton compiles each kernel on one core; the
# tests compile many kernel variants: every shape and, where the launchers split the layers, one
# forward and one data-gradient kernel per layer)
cuda_tests() {
  local rest=(--ignore=tests/test_mlp.py --ignore=tests/test_precision.py --ignore=tests/test_jvp.py
              --ignore=tests/test_linear.py --ignore=tests/test_spectral.py --ignore=tests/test_capture_safety.py
              --ignore=tests/test_knn.py --ignore=tests/test_nn.py --ignore=tests/test_policy_critic.py)
  local pids=() rc=0 i=0
  group() {  # group ARGS...: one pytest process in the background, its log cuda-tests-<i>.log
    echo "-- group $i: $*" > "$OUT/cuda-tests-$i.log"
    "$PY" -m pytest -q -m cuda -p no:cacheprovider "$@" >> "$OUT/cuda-tests-$i.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  }
  group tests/test_mlp.py -k "cuda_matches_reference"
  group tests/test_mlp.py -k "not cuda_matches_reference"
  group tests/test_precision.py
  group tests/test_jvp.py tests/test_linear.py tests/test_spectral.py
  group tests/test_capture_safety.py tests/test_knn.py tests/test_nn.py tests/test_policy_critic.py
  group tests "${rest[@]}"
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || rc=1
    head -n 1 "$OUT/cuda-tests-$i.log"
    tail -n 15 "$OUT/cuda-tests-$i.log"
  done
  return $rc
}
export -f cuda_tests
if [ $DRY = 1 ]; then
  step build 150 "$PY" -c "import fastrp, fastrp.ops, fastrp.nn; print('import ok, extension', fastrp.has_ext())"
  step cuda-tests 300 bash -c cuda_tests
  step ops 120 "$PY" bench/device_check.py --dry-run --out "$OUT"
  step update 300 "$PY" bench/update.py --quick --synthetic --device cpu --providers eager,fastrp --counters \
    --json "$OUT/update.json"
else
  step build 150 "$PY" -m pip install --no-build-isolation --no-deps -q -e .
  step cuda-tests 100 bash -c cuda_tests
  step ops 40 "$PY" bench/device_check.py --out "$OUT"
  step update 180 env TORCHINDUCTOR_COMPILE_THREADS=16 "$PY" bench/update.py --device cuda --synthetic --repeats 2 \
    --model-epochs 1 --providers eager,fastrp,fastrp-compile,fastrp-cudagraph --counters --json "$OUT/update.json"
fi
echo
echo "== summary ($OUT)"
for name in build cuda-tests ops update; do echo "  $name: ${STATUS[$name]:-not run}"; done
for log in "$OUT"/cuda-tests-*.log; do
  [ -e "$log" ] && grep -h -E "passed|failed|error|skipped|no tests ran" "$log" | tail -n 1 | sed "s|^|  tests $(basename "$log" .log): |"
done
grep -h -E "^\| (ensemble|knn)" "$OUT/ops.log" | sed 's/^/  /'
grep -h -E "^\| (eager|fastrp)" "$OUT/update.log" | sed 's/^/  /'
grep -h -E "^counters" "$OUT/update.log" | sed 's/^/  /'
