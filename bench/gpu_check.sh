#!/usr/bin/env bash
# One check on a lent GPU: build the package there, run the GPU correctness tests (CUDA and Triton backends
# against the reference, whole layers and models GPU == CPU), the CUDA scan under compute-sanitizer, then the
# benchmarks (`python -m bench`); logs go to $OUT and a short summary (status per step, the benchmark tables) is
# printed last. Seven logs and no JSON: the device tool returns at most eight files from $OUT.
#
#   PYTHONUNBUFFERED=1 OUT=/tmp/out GPU_CHECK_SECONDS=420 bash bench/gpu_check.sh
#
# Each step runs under `timeout`, capped so that all of them end within GPU_CHECK_SECONDS and the summary
# still prints; a failing step does not stop the later ones (their logs say why). Pure-Python packages the
# machine lacks (mamba_ssm, for its Triton kernels as baselines and its model test) can be carried in
# .gpu_site/ (git-ignored), which goes on PYTHONPATH; mamba_ssm built without CUDA is pure Python:
#   mkdir -p .gpu_site && cp -r "$(python -c 'import os, importlib.util as u; \
#     print(os.path.dirname(u.find_spec("mamba_ssm").origin))')" .gpu_site/
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
JOBS="${MAX_JOBS:-16}"
ARCHS="${COMPRESSM_CUDA_ARCHS:-9.0}"
BUDGET="${GPU_CHECK_SECONDS:-540}"
declare -a SUMMARY=()
if [ -d .gpu_site ]; then export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"; fi

# run_step NAME SECONDS LOG COMMAND...: run with a time limit, record PASS/FAIL/TIMEOUT and the duration.
run_step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local left=$((BUDGET - SECONDS - 10))  # keep ~10 s for the summary
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then SUMMARY+=("$(printf '%-8s %-12s' "$name" "NOT-RUN")"); return 0; fi
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
  "$PY" -c 'import mamba_ssm; print("mamba_ssm", mamba_ssm.__version__)' 2>&1 | tail -n 1
  echo "build flags: CC=${CC:-} CXX=${CXX:-} CFLAGS=${CFLAGS:-} CXXFLAGS=${CXXFLAGS:-} LDFLAGS=${LDFLAGS:-}"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

run_step build 180 "$OUT/build.log" env MAX_JOBS="$JOBS" COMPRESSM_CUDA_ARCHS="$ARCHS" TORCH_CUDA_ARCH_LIST="$ARCHS" \
  "$PY" -m pip install --no-deps --no-build-isolation -e .
"$PY" -c 'from compressm_kernels._extensions import load_extension; m, r = load_extension("_C_cuda"); print("_C_cuda:", r or "loaded")' \
  >>"$OUT/build.log" 2>&1
# The extensions must need the shared libstdc++ (setup.py): a static copy crashed on integers in error messages.
readelf -d compressm_kernels/_C*.so 2>&1 | grep -E '^File|NEEDED.*(stdc|gcc)' >>"$OUT/build.log"
tail -n 3 "$OUT/build.log"

# --maxfail instead of -x: one GPU run should show every broken area, not only the first.
XDIST=()
if "$PY" -c 'import xdist' 2>/dev/null; then XDIST=(-n 8); fi
run_step tests 150 "$OUT/tests.log" "$PY" -m pytest tests/test_gpu_scans.py tests/test_gpu_models.py \
  tests/test_cuda_extension.py tests/test_triton_scan.py tests/test_triton_state_update.py \
  tests/test_state_update_kernels.py -q -rs --maxfail=10 \
  "${XDIST[@]}"

# Out-of-bounds or misaligned accesses and shared-memory races that the value checks could miss.
run_step memcheck 60 "$OUT/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
  "$PY" -m bench.gpu_memcheck
run_step racecheck 45 "$OUT/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
  "$PY" -m bench.gpu_memcheck --few

run_step bench 90 "$OUT/bench.log" "$PY" -m bench scan --device cuda --backends cuda,triton,mamba \
  --dstates 128,64,16,8 --json-dir "" --plots-dir ""
# The other suites at their quick sizes (block before/after surgery, decode step vs mamba_ssm's Triton step,
# Hankel energies, Mamba-2's scan vs mamba_ssm's Triton SSD); the scan table above stays the one the summary shows.
run_step bench-rest 180 "$OUT/bench_rest.log" bash -c \
  "for s in block decode ssd hankel; do \"$PY\" -m bench \$s --device cuda --quick --json-dir '' --plots-dir '' || exit 1; done"

echo
echo "================================ summary ================================"
head -n 7 "$OUT/env.log"
printf '%s\n' "${SUMMARY[@]}"
echo "--- tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -n 10
for tool in memcheck racecheck; do
  echo "--- $tool: $(grep -E '(ERROR SUMMARY|HAZARD|calls of the CUDA scan ran)' "$OUT/$tool.log" | tail -n 3 | tr '\n' ' ')"
done
echo "--- benchmark tables"
# Each suite prints "== title ==", the machine header, then its fixed-width table; show those, not the chatter.
for log in "$OUT/bench.log" "$OUT/bench_rest.log"; do
  sed -n '/^== /,$p' "$log" | grep -vE '^(wrote |\[|\s*$)'
done
