#!/usr/bin/env bash
# One call on a lent GPU machine: build fastsam._C with nvcc for the GPU present, run the test
# suite there (DEVICE is cuda, so every backend test runs torch, triton and the cuda extension,
# and the gpu-marked tests run), then the step benchmark. Everything is logged under $OUT.
#
#   TESTS="tests/test_parity.py ..." BENCH="--sets resnet50" bash bench/device_run.sh
#     TESTS  pytest arguments, default "tests" ("-" skips the tests); TEST_K: a -k expression
#     BENCH  arguments of `python -m fastsam.bench`, default "--quick" ("-" skips it)
#     E2E    optional: arguments of `python -m fastsam.bench.e2e` (set, even empty, to run it;
#            E2E="--trainer hf" trains GPT-2 through SAMTrainer, needs transformers there)
#     GDB_TEST  optional: one test run under cuda-gdb first (a native backtrace)
#
# Stage limits (seconds) keep the whole call inside one 10-minute command:
#   BUILD_S (200), TEST_S (270), BENCH_S (150). The tests get SIGINT at their limit, so
#   pytest still prints the failures it has seen.
set -uo pipefail
OUT=${OUT:-/tmp/fastsam-device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
tests=${TESTS:-tests}
bench=${BENCH:---quick}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export FASTSAM_CUDA_ARCHS=${FASTSAM_CUDA_ARCHS:-9.0}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -2
  echo "CC=${CC:-} CXX=${CXX:-}: $(${CXX:-c++} --version | head -1)"
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# The build swallows a compiler failure (a pure-Python install still works): check the import.
SECONDS=0
timeout "${BUILD_S:-200}" "$PY" -m pip install -v --no-deps --no-build-isolation -e . \
  >"$OUT/build.log" 2>&1
echo "build: rc $? in ${SECONDS}s"
"$PY" -c "import torch; from fastsam.backends import native; \
print('cuda backend:', native.unavailable_reason('cuda', torch.device('cuda')) or 'available')" \
  2>&1 | tee -a "$OUT/env.txt"
grep -n -i -E "error|warning: fastsam" "$OUT/build.log" | head -30

# GDB_TEST="tests/x.py::name": run that one test under cuda-gdb and print the native stack
# where it stops (a crash), for what Python's faulthandler cannot show.
if [ -n "${GDB_TEST:-}" ]; then
  timeout 120 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary fastsam" --args "$PY" \
    -m pytest -q -x -p no:cacheprovider -p no:xdist "$GDB_TEST" >"$OUT/gdb.log" 2>&1
  grep -n -E "signal|^#[0-9]+ " "$OUT/gdb.log" | head -40
fi

if [ "$tests" != "-" ]; then
  SECONDS=0
  # One intra-op thread per test worker: 12 workers x 16 threads each starved the machine.
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=1 timeout -s INT -k 30 "${TEST_S:-270}" "$PY" -m pytest -q -rfE --tb=short \
    -n "${TEST_WORKERS:-12}" -p no:cacheprovider --durations=15 ${TEST_K:+-k "$TEST_K"} $tests >"$OUT/tests.log" 2>&1
  echo "tests: rc $? in ${SECONDS}s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -40
fi

if [ "$bench" != "-" ]; then
  SECONDS=0
  # shellcheck disable=SC2086
  timeout "${BENCH_S:-150}" "$PY" -m fastsam.bench --no-progress \
    --json "$OUT/bench.json" --csv "$OUT/bench.csv" $bench >"$OUT/bench.txt" 2>&1
  echo "bench: rc $? in ${SECONDS}s"
  cat "$OUT/bench.txt" | tail -60
fi

# E2E="..." (arguments of `python -m fastsam.bench.e2e`, "" for its defaults): whole training
# steps, optimizer included; skipped unless set.
if [ -n "${E2E+set}" ]; then
  SECONDS=0
  # shellcheck disable=SC2086
  timeout "${E2E_S:-90}" "$PY" -m fastsam.bench.e2e --json "$OUT/e2e.json" $E2E \
    >"$OUT/e2e.txt" 2>&1
  echo "e2e: rc $? in ${SECONDS}s"
  tail -20 "$OUT/e2e.txt"
fi
