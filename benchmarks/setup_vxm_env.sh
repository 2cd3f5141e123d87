#!/usr/bin/env bash
# Recreate .venv-vxm: the official voxelmorph 0.3.4 (PyTorch-only since 0.3) in its own venv, for
# benchmarks/bench_transforms.py to compare against. Everything is pinned and installed with
# --no-deps, so pip never resolves (and never pulls an unpinned torch with GBs of CUDA packages).
#
#   bash benchmarks/setup_vxm_env.sh            # creates ./.venv-vxm (git-ignored)
#   VXM_VENV=/tmp/vxm bash benchmarks/setup_vxm_env.sh
#
# Only the packages that `import voxelmorph` actually imports are installed: voxelmorph's declared
# h5py and neurite's einops are never imported by 0.3.4 and are left out; scikit-image is
# imported (voxelmorph.py.utils: `from skimage import measure`) but its imageio/tifffile are not
# needed for that import.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VXM_VENV:-.venv-vxm}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --no-deps)

# torch: the CPU wheel, pinned like the main environment (constraints.txt)
"${PIP[@]}" torch==2.13.0
# torch's own runtime dependencies
"${PIP[@]}" filelock==4.3.1 typing_extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0 \
    networkx==3.6.1 Jinja2==3.1.6 MarkupSafe==3.0.4 fsspec==2026.9.0
# the reference implementation
"${PIP[@]}" voxelmorph==0.3.4 neurite==0.3.4 pystrum==0.4
# what their imports need
"${PIP[@]}" numpy==2.4.6 scipy==1.17.1 packaging==26.4 six==1.17.0 nibabel==5.4.2 tqdm==4.70.1 \
    matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0 kiwisolver==1.5.1 \
    pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 \
    scikit-image==0.26.0 lazy-loader==0.6

"$VENV/bin/python" - <<'EOF'
import torch, voxelmorph, neurite
from voxelmorph.nn.modules import SpatialTransformer, IntegrateVelocityField
print(f"ok: voxelmorph {voxelmorph.__version__}, neurite {neurite.__version__}, torch {torch.__version__}")
EOF
