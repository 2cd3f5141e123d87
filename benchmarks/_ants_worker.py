"""ANTs side of ``bench_accuracy.py``: register pairs with antspyx and save the warped labels.

Runs in its own environment (``.venv-ants``: ``python -m venv .venv-ants &&
.venv-ants/bin/pip install antspyx==0.6.3``) and imports neither torch nor voxreg, so the
scores are computed by the caller with voxreg's one Dice function.

    .venv-ants/bin/python benchmarks/_ants_worker.py JOB.json

``JOB.json``: ``{"transform": "SyN", "threads": 2, "seed": 2024, "out_dir": ...,
"pairs": [{"name": ..., "moving": img, "fixed": img, "moving_labels": seg}, ...]}``. For each
pair it writes ``out_dir/<name>.npz`` with ``moved_labels`` (uint16, genericLabel
interpolation onto the fixed grid), ``seconds`` (``ants.registration`` only, as a user would
time it), ``folding_pct`` (% of voxels whose Jacobian determinant of the forward warp is
<= 0, from ``ants.create_jacobian_determinant_image``) and the transform type; pairs whose
file exists are skipped, so an interrupted run continues.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    threads = str(int(job.get("threads", 2)))
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
    os.environ["ANTS_RANDOM_SEED"] = str(job.get("seed", 2024))
    import ants
    import numpy as np

    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    transform = job["transform"]
    for pair in job["pairs"]:
        target = out_dir / f"{pair['name']}.npz"
        if target.exists():
            continue
        fixed = ants.image_read(pair["fixed"])
        moving = ants.image_read(pair["moving"])
        moving_labels = ants.image_read(pair["moving_labels"])
        with tempfile.TemporaryDirectory() as tmp:
            tic = time.perf_counter()
            reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform,
                                    outprefix=str(Path(tmp) / "reg_"),
                                    random_seed=int(job.get("seed", 2024)))
            seconds = time.perf_counter() - tic
            moved = ants.apply_transforms(fixed=fixed, moving=moving_labels,
                                          transformlist=reg["fwdtransforms"],
                                          interpolator="genericLabel")
            warps = [t for t in reg["fwdtransforms"] if t.endswith(".nii.gz")]
            if warps:
                jac = ants.create_jacobian_determinant_image(fixed, warps[0], do_log=False)
                folding = float((jac.numpy() <= 0).mean() * 100)
            else:
                folding = 0.0
            labels = np.rint(moved.numpy()).astype(np.uint16)
            partial = target.with_suffix(".part.npz")
            np.savez_compressed(partial, moved_labels=labels, seconds=seconds,
                                folding_pct=folding, transform=transform)
            os.replace(partial, target)
        print(f"{transform} {pair['name']}: {seconds:.1f} s, folding {folding:.4f} %", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.split("\n\n")[2], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
