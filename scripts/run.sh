#!/usr/bin/env bash
# The README's two commands:  bash scripts/run.sh demo   |   bash scripts/run.sh test [pytest args]
# Each first sets everything up (scripts/bootstrap.sh, idempotent), then runs its job. `test` lints first
# (ruff check, config in pyproject.toml) and stops on a finding; `lint` runs only that.
set -euo pipefail
cd "$(dirname "$0")/.."
job=${1:-test}
shift || true
bash scripts/bootstrap.sh
VENV=${COMPRESSM_VENV:-.venv}
case "$job" in
  demo) exec "$VENV/bin/compressm" demo "$@" ;;
  lint) exec "$VENV/bin/ruff" check . ;;
  test) "$VENV/bin/ruff" check .; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh demo|test|lint [args]" >&2; exit 2 ;;
esac
