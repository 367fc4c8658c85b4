#!/usr/bin/env bash
# One check on a lent GPU (about 10 minutes): build the package there, run the GPU correctness tests
# (CUDA and Triton backends against the reference), then the benchmarks (`python -m bench`); logs go to $OUT and a
# short summary (status per step, the benchmark table) is printed last.
#
#   PYTHONUNBUFFERED=1 OUT=/tmp/out bash bench/gpu_check.sh
#
# Each step runs under `timeout`; a failing step does not stop the later ones (their logs say why).
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
JOBS="${MAX_JOBS:-16}"
ARCHS="${COMPRESSM_CUDA_ARCHS:-9.0}"
declare -a SUMMARY=()

# run_step NAME SECONDS LOG COMMAND...: run with a time limit, record PASS/FAIL/TIMEOUT and the duration.
run_step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local start=$SECONDS
  echo "=== $name (limit ${limit}s): $*" >"$log"
  echo "--- $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local status=PASS
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAIL(rc=$rc)"; fi
  SUMMARY+=("$(printf '%-8s %-12s %5ss  %s' "$name" "$status" "$((SECONDS - start))" "$log")")
  tail -n 3 "$log"
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1 || true
  nvcc --version 2>&1 | tail -n 1 || true
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

run_step build 180 "$OUT/build.log" env MAX_JOBS="$JOBS" COMPRESSM_CUDA_ARCHS="$ARCHS" TORCH_CUDA_ARCH_LIST="$ARCHS" \
  "$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -c 'from compressm_kernels._extensions import load_extension; m, r = load_extension("_C_cuda"); print("_C_cuda:", r or "loaded")' \
  >>"$OUT/build.log" 2>&1
tail -n 1 "$OUT/build.log"

# --maxfail instead of -x: one GPU run should show every broken area, not only the first.
run_step tests 180 "$OUT/tests.log" "$PY" -m pytest tests/test_gpu_scans.py tests/test_cuda_extension.py -q -rs \
  --maxfail=10

run_step bench 150 "$OUT/bench.log" "$PY" -m bench scan --device cuda --backends cuda,triton,mamba \
  --dstates 128,64,32,16,12,8 --json-dir "$OUT" --plots-dir "$OUT"
# The other suites at their quick sizes (decode step vs mamba_ssm's Triton step, block before/after surgery,
# Hankel energies, Mamba-2's scan vs mamba_ssm's Triton SSD); the scan table above stays the one the summary shows.
run_step bench-rest 120 "$OUT/bench_rest.log" bash -c \
  "for s in decode block hankel ssd; do \"$PY\" -m bench \$s --device cuda --quick --json-dir '$OUT' --plots-dir '$OUT' || exit 1; done"

echo
echo "================================ summary ================================"
head -n 4 "$OUT/env.log"
printf '%s\n' "${SUMMARY[@]}"
echo "--- tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -n 10
echo "--- benchmark tables"
# Each suite prints "== title ==", the machine header, then its fixed-width table; show those, not the chatter.
for log in "$OUT/bench.log" "$OUT/bench_rest.log"; do
  sed -n '/^== /,$p' "$log" | grep -vE '^(wrote |\[|\s*$)'
done
