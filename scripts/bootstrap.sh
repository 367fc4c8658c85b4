#!/usr/bin/env bash
# Create .venv and install everything the package, its tests and its benchmarks need. Idempotent:
# each step is skipped when what it installs is already there. Offline: no step downloads a prebuilt
# binary (mamba-ssm and causal-conv1d are built from source without their CUDA parts).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${COMPRESSM_VENV:-.venv}
PY="$VENV/bin/python"

[ -x "$PY" ] || python3 -m venv "$VENV"
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1') == '$2' else 1)" 2>/dev/null; }
have_any() { "$PY" -c "import importlib.metadata as m; m.version('$1')" 2>/dev/null; }

have torch 2.14.1 || "$PY" -m pip install -q torch==2.14.1
for pkg in numpy pytest ninja pybind11 einops packaging wheel setuptools scipy build scikit-learn matplotlib; do
  have_any "${pkg}" || "$PY" -m pip install -q "$pkg"
done
# Test oracles: pure-Python builds of mamba-ssm and causal-conv1d. FORCE_BUILD stops their setup.py
# from trying to download a prebuilt wheel (no network); --no-cache-dir keeps a cached wheel from
# hiding that failure on a fresh machine. --no-deps skips their GPU-only dependencies.
if ! have mamba_ssm 2.3.2.post1 || ! have causal_conv1d 1.7.0; then
  MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
  CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir \
      mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0
fi
have_any transformers || "$PY" -m pip install -q transformers
# The linter `bash scripts/run.sh test` runs first; pinned, since new ruff releases add findings.
have ruff 0.17.6 || "$PY" -m pip install -q ruff==0.17.6

# The compiled extensions, in place; ninja in build/ recompiles only what changed, so a second run is quick.
mkdir -p build
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace > build/build_ext.log 2>&1; then
  tail -n 60 build/build_ext.log >&2; echo "building the extensions failed; full log: build/build_ext.log" >&2; exit 1
fi
# The package itself, editable (its extensions are already in place).
have_any compressm-kernels || COMPRESSM_NO_EXTENSIONS=1 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
