"""Data side of ``bench_native.py``: the ixi-raw scans and their robustness copies, the brain1mm
pair as NIfTI, and the in-domain reference carried into the fixed scan's native space.

Imports numpy, nibabel, torch and voxreg (main environment only).

Copies of a scan (the labels follow each copy; written as float32 images, label maps keep
their integer dtype):

* ``lps``: the same voxels re-laid out in LPS order (``nibabel.as_closest_canonical``, then
  axes 0 and 1 flipped with the affine updated): the world image is identical, only the array
  order and the header differ.
* ``1mm``: resampled to 1 mm isotropic over the same field of view (the outer faces of the grid
  stay where they were: 2 mm voxel ``i`` becomes 1 mm voxels at ``i - 0.25`` and ``i + 0.25``);
  linear for images, nearest for labels (:func:`voxreg.io.resample_to`).
* ``aniso``: 1 mm in-plane and 3 mm along the array axis closest to superior-inferior (thick
  axial slices), same field of view, same interpolation (point sampling: no slice-profile
  blurring is simulated).
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from voxreg import io
from voxreg import transforms as T

COPIES = ("lps", "1mm", "aniso")
# The brain1mm scans carry no affine. FreeSurfer's conformed (LIA) voxel-to-RAS matrix of a
# 160x192x224 crop at 1 mm, used only as a diagnostic next to the identity affine.
LIA_1MM = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])
BRAIN1MM = ("vxm_test_scan", "l2r_subject_1")


# ------------------------------------------------------------------------------------------------
# ixi-raw
# ------------------------------------------------------------------------------------------------


def raw_ids(raw: Path) -> list[str]:
    """The ixi-raw subject ids, sorted."""
    return sorted(p.name[: -len(".nii.gz")] for p in (raw / "images").glob("*.nii.gz"))


def ordered_pairs(ids: list[str]) -> list[tuple[str, str]]:
    """All ordered ``(moving, fixed)`` pairs, in ``itertools.permutations`` order."""
    return list(itertools.permutations(ids, 2))


def every_third(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The subset used for ANTs SyN, fine-tuning and the copies: pairs 0, 3, 6, ..."""
    return pairs[::3]


def raw_paths(raw: Path, subject: str) -> tuple[Path, Path]:
    return raw / "images" / f"{subject}.nii.gz", raw / "labels" / f"{subject}.nii.gz"


def atlas_to_native(raw: Path) -> dict[str, np.ndarray]:
    """Per subject, the 4x4 RAS matrix MNI world -> native world (the ANTs affine of ``ixi/``)."""
    import json

    table = json.loads((raw / "atlas_to_native_ras.json").read_text())
    return {k: np.asarray(v, dtype=np.float64) for k, v in table.items()}


def p99_scales(raw: Path) -> dict[str, float]:
    with open(raw / "subjects.csv", newline="") as handle:
        return {row["id"]: float(row["p99_5_in_mask"]) for row in csv.DictReader(handle)}


def short(pair: tuple[str, str]) -> str:
    """``IXI014-HH-1236 -> IXI059-HH-1284`` as ``014>059`` (brain1mm names kept short too)."""
    def one(name: str) -> str:
        return name[3:6] if name.startswith("IXI") else name.split("_")[0]
    return f"{one(pair[0])}>{one(pair[1])}"


# ------------------------------------------------------------------------------------------------
# copies
# ------------------------------------------------------------------------------------------------


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, path)
    return path


def lps_copy(path: Path, labels: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)``: the scan in LPS array order, the same world image."""
    canonical = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(canonical.dataobj) if labels else canonical.get_fdata(dtype=np.float32)
    shape = data.shape
    flip = np.array([[-1.0, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0],
                     [0, 0, 0, 1]])
    affine = canonical.affine @ flip
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine


def refined_grid(shape: tuple[int, ...], affine: np.ndarray, factors: tuple[float, ...]
                 ) -> tuple[tuple[int, ...], np.ndarray]:
    """A grid over the same field of view with voxels ``factors`` times the old ones (per axis;
    ``0.5`` halves the voxel size). The new voxel ``k`` sits at old index
    ``-0.5 + f/2 + f k``."""
    new_shape = tuple(int(round(n / f)) for n, f in zip(shape, factors))
    scale = np.eye(4)
    for axis, f in enumerate(factors):
        scale[axis, axis] = f
        scale[axis, 3] = -0.5 + f / 2
    return new_shape, affine @ scale


def superior_axis(affine: np.ndarray) -> int:
    """The array axis whose world direction is closest to superior-inferior."""
    return int(np.argmax(np.abs(affine[2, :3]) / np.linalg.norm(affine[:3, :3], axis=0)))


def resampled_copy(path: Path, labels: bool, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of the ``1mm`` or ``aniso`` copy (see the module doc)."""
    image = io.load_labels(path) if labels else io.load_image(path)
    if not labels:
        image.data = image.data.astype(np.float32)
    spacing = np.asarray(image.spacing)
    target_mm = np.ones(3)
    if kind == "aniso":
        target_mm[superior_axis(image.affine)] = 3.0
    elif kind != "1mm":
        raise ValueError(kind)
    shape, affine = refined_grid(image.shape, image.affine, tuple(target_mm / spacing))
    target = io.Image(np.zeros(shape, np.uint8), affine)
    moved = io.resample_to(image, target, "nearest" if labels else "linear")
    return moved.data, affine


def write_copies(raw: Path, subjects: list[str], kind: str, folder: Path
                 ) -> dict[str, tuple[Path, Path]]:
    """Write the ``kind`` copy of every subject (image, labels); ``{id: (image, labels)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for subject in subjects:
        paths = []
        for labels, source in zip((False, True), raw_paths(raw, subject)):
            target = folder / f"{subject}_{'seg' if labels else 'img'}.nii.gz"
            if not target.exists():
                data, affine = (lps_copy(source, labels) if kind == "lps"
                                else resampled_copy(source, labels, kind))
                _save(target, data.astype(data.dtype if labels else np.float32), affine)
            paths.append(target)
        out[subject] = (paths[0], paths[1])
    return out


def check_same_world(original: Path, copy: Path, labels_original: Path, labels_copy: Path
                     ) -> float:
    """Fraction of label voxels that differ when the copy is resampled (nearest, through the
    headers) back onto the original grid: 0 for a pure re-layout such as ``lps``."""
    back = io.resample_to(io.load_labels(labels_copy), io.load_image(original), "nearest")
    return float((back.data != io.load_labels(labels_original).data).mean())


# ------------------------------------------------------------------------------------------------
# brain1mm
# ------------------------------------------------------------------------------------------------


def write_brain1mm(folder: Path, data: Path, affine: np.ndarray, tag: str,
                   label_dtype=np.int32) -> dict[str, tuple[Path, Path]]:
    """The two brain1mm scans as NIfTI with ``affine``; ``{name: (image, labels)}``.

    The labels are stored as ``label_dtype`` (the npz holds uint16: see ``uint16_label_probe``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in BRAIN1MM:
        archive = np.load(data / f"{name}.npz")
        img = _save(folder / f"{name}_{tag}_img.nii.gz", archive["vol"].astype(np.float32), affine)
        seg = _save(folder / f"{name}_{tag}_seg.nii.gz", archive["seg"].astype(label_dtype), affine)
        out[name] = (img, seg)
    return out


def uint16_label_probe() -> str | None:
    """``None`` if :func:`voxreg.transforms.sample` with ``interp="label"`` takes a uint16
    label map, else the error it raises (the brain1mm npz labels are uint16)."""
    labels = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint16)[None, None]
    coords = torch.tensor([[[[0.3]], [[0.6]]]], dtype=torch.float32)
    try:
        T.sample(labels, coords, interp="label")
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return None


# ------------------------------------------------------------------------------------------------
# the in-domain reference, carried into the fixed scan's native space
# ------------------------------------------------------------------------------------------------


def _points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.tensordot(affine[:3, :3], index, axes=1) + affine[:3, 3].reshape(3, 1, 1, 1)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.tensordot(matrix[:3, :3], points, axes=1) + matrix[:3, 3].reshape(3, 1, 1, 1)


def through_mni(fixed_shape: tuple[int, ...], fixed_affine: np.ndarray, moving_affine: np.ndarray,
                mni_to_fixed: np.ndarray, mni_to_moving: np.ndarray, mni_affine: np.ndarray,
                disp: np.ndarray | None) -> np.ndarray:
    """Moving-scan voxel coordinates ``(3, *fixed_shape)`` for each fixed-scan voxel: fixed voxel
    -> world -> MNI world (``inv(mni_to_fixed)``) -> MNI voxel -> ``+ disp`` (MNI voxels,
    ``(3, *mni_shape)``, pull-back, linearly interpolated, zero outside the MNI grid; ``None``:
    zero) -> MNI world -> moving world (``mni_to_moving``) -> moving voxel."""
    world = _points(fixed_shape, fixed_affine)
    mni_vox = _apply(np.linalg.inv(mni_affine) @ np.linalg.inv(mni_to_fixed), world)
    if disp is not None:
        field = torch.from_numpy(np.ascontiguousarray(disp, dtype=np.float32))[None]
        mni_vox = mni_vox + T.sample(field, torch.from_numpy(mni_vox.astype(np.float32))[None]
                                     )[0].numpy().astype(np.float64)
    moving_vox = _apply(np.linalg.inv(moving_affine) @ mni_to_moving @ mni_affine, mni_vox)
    return moving_vox.astype(np.float32)


def sample_labels(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """``labels`` (on the moving grid) read at ``coords`` with label interpolation."""
    tensor = torch.from_numpy(np.ascontiguousarray(labels))[None, None]
    return T.sample(tensor, torch.from_numpy(coords)[None], interp="label")[0, 0].numpy()
