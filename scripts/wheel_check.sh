#!/usr/bin/env bash
# Build the sdist and the wheel from this tree, check what each holds, install the wheel (not editable)
# into a separate fresh virtualenv and smoke-test it there from outside the source tree; then build the sdist
# against a CPU-only torch and without OpenMP in a third virtualenv and smoke-test that wheel too.
# Needs scripts/bootstrap.sh first (reuses its torch install from the local disk and its build objects).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${COMPRESSM_VENV:-.venv}/bin/python
WHEEL_VENV=$(realpath -m "${COMPRESSM_WHEEL_VENV:-.venv-wheel}")
rm -rf dist

"$PY" -m build --sdist --no-isolation --outdir dist . >/dev/null
sdist=$(ls dist/*.tar.gz)
listing=$(tar tzf "$sdist")
for must in setup.py pyproject.toml README.md LICENSE CHANGELOG.md csrc/include; do
  grep -q "/$must" <<<"$listing" || { echo "sdist lacks $must" >&2; exit 1; }
done
if grep -E '\.so$|\.o$|/\.venv|/build/|__pycache__|/tests/|_build_info\.py' <<<"$listing"; then
  echo "sdist holds build outputs, venvs, caches or tests (above)" >&2; exit 1
fi
echo "sdist ok: $sdist ($(wc -l <<<"$listing") entries)"

# Same build folder as the editable install, so ninja reuses its objects.
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w dist .
wheel=$(ls dist/*.whl)
contents=$("$PY" -m zipfile -l "$wheel")
for must in compressm_kernels/_C compressm_kernels/_build_info.py; do
  grep -q "$must" <<<"$contents" || { echo "wheel lacks $must" >&2; exit 1; }
done
echo "wheel ok: $wheel"

# smoke_test VENV WHEEL: install WHEEL (not editable) into VENV and run the CPU kernels from outside the source tree.
smoke_test() {
  local venv=$1 wheel=$2 smoke version
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
  smoke=$(cd / && "$venv/bin/python" - <<'PY'
import torch
import compressm_kernels as ck
status = ck.backend_status("cpu")
print("torch", torch.__version__, "backends on cpu:", status)
assert status["cpu"] is None, f"the wheel's CPU kernel does not load: {status['cpu']}"
torch.manual_seed(0)
u, delta, z = (torch.randn(2, 8, 100) for _ in range(3))
A = -torch.rand(8, 12) - 0.5
B, C = torch.randn(2, 12, 100), torch.randn(2, 12, 100)
mask = torch.rand(12) > 0.5
mask[0] = True
out, last = ck.selective_scan_fn(u, delta, A, B, C, z=z, delta_softplus=True, return_last_state=True,
                                 state_mask=mask, backend="cpu")
ref, ref_last = ck.selective_scan_ref(u, delta, A, B, C, z=z, delta_softplus=True, return_last_state=True,
                                      state_mask=mask)
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(last, ref_last, rtol=1e-4, atol=1e-4)
from compressm_kernels.ops.conv1d import causal_conv1d, causal_conv1d_torch  # the C++ conv is in the wheel
w = torch.randn(8, 4)
torch.testing.assert_close(causal_conv1d(u, w, None, "silu"), causal_conv1d_torch(u, w, None, "silu"))
print("installed from", ck.__file__, "version", ck.__version__)
PY
  )
  echo "$smoke"
  grep -q "installed from $(cd / && "$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')" <<<"$smoke" \
    || { echo "smoke test imported the package from the source tree, not the wheel" >&2; return 1; }
  version=$("$venv/bin/compressm" --version)
  [ "$version" = "compressm_kernels $("$venv/bin/python" -c 'import compressm_kernels as c; print(c.__version__)')" ] \
    || { echo "compressm --version ($version) disagrees with __version__" >&2; return 1; }
  echo "wheel smoke test ok ($version)"
}

[ -x "$WHEEL_VENV/bin/python" ] || python3 -m venv "$WHEEL_VENV"
"$WHEEL_VENV/bin/python" -c "import torch" 2>/dev/null || "$WHEEL_VENV/bin/python" -m pip install -q torch==2.14.1 numpy
smoke_test "$WHEEL_VENV" "$wheel"

# The sdist against a CPU-only torch (pip's +cpu build) on this machine, whose CUDA toolkit setup.py finds: it must
# build the CPU kernels alone (it failed here, at torch's CUDAExtension, until setup.py checked torch.version.cuda).
# Built without OpenMP too, as a compiler without it (Apple's clang) would build it: the same smoke test, one thread.
CPU_TORCH_VENV=$(realpath -m "${COMPRESSM_CPU_TORCH_VENV:-.venv-cpu-torch}")
[ -x "$CPU_TORCH_VENV/bin/python" ] || python3 -m venv "$CPU_TORCH_VENV"
"$CPU_TORCH_VENV/bin/python" -c "import torch" 2>/dev/null \
  || "$CPU_TORCH_VENV/bin/python" -m pip install -q torch==2.13.0 numpy ninja setuptools wheel
"$CPU_TORCH_VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
  || { echo "$CPU_TORCH_VENV holds a CUDA build of torch, not a CPU-only one" >&2; exit 1; }
rm -rf "$CPU_TORCH_VENV/dist"
COMPRESSM_NO_OPENMP=1 MAX_JOBS=${MAX_JOBS:-2} "$CPU_TORCH_VENV/bin/python" -m pip wheel -q --no-build-isolation \
  --no-deps -w "$CPU_TORCH_VENV/dist" "$sdist"
smoke_test "$CPU_TORCH_VENV" "$(ls "$CPU_TORCH_VENV"/dist/*.whl)"
