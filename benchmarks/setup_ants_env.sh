#!/usr/bin/env bash
# Create .venv-ants: antspyx (ANTsPy) in its own venv, for benchmarks/bench_accuracy.py (ANTs SyN /
# SyNCC) and benchmarks/bench_affine.py (ANTs Affine) to compare against. It never imports torch,
# so it stays small; voxreg's environment is left untouched.
#
#   bash benchmarks/setup_ants_env.sh            # creates ./.venv-ants (git-ignored)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${ANTS_VENV:-.venv-ants}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# antspyx 0.6.3 is what prepared the IXI data (../shared/data/README.md); numpy/scipy as there
"$VENV/bin/python" -m pip install --quiet antspyx==0.6.3 numpy==2.3.5 scipy==1.15.3
"$VENV/bin/python" -c "import ants; print('ok: antspyx', ants.__version__)"
