"""Image and label-map files: the :class:`Image` (data and grid), reading (:func:`load_image`,
:func:`load_labels`, :func:`read_grid`), intensity normalisation, resampling between grids, and
atomic writing (:func:`save_image`). The formats are listed in :mod:`voxreg.io`.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from voxreg._atomic import atomic_path
from voxreg.transforms import warp

__all__ = [
    "Image",
    "Normalize",
    "SUPPORTED",
    "atomic_write",
    "check_affine",
    "check_input_file",
    "check_output_file",
    "check_output_path",
    "format_of",
    "load_image",
    "load_labels",
    "normalize",
    "npz_keys",
    "read_file",
    "read_grid",
    "resample_to",
    "same_grid",
    "save_image",
    "voxel_sizes",
]

SUPPORTED = (".nii.gz", ".nii", ".mgz", ".mgh", ".npz", ".npy")
_NIBABEL = (".nii.gz", ".nii", ".mgz", ".mgh")

Normalize = Literal["minmax", "percentile", "none"]


@dataclass
class Image:
    """An image (or label map) and its grid.

    Attributes:
        data: ``(*spatial)`` or, when ``channels``, ``(C, *spatial)``.
        affine: ``(4, 4)`` voxel-to-world matrix (RAS mm for NIfTI; identity for numpy files).
        header: the nibabel header it came with, or ``None``.
        path: the file it was read from, or ``None``.
        channels: ``data`` carries a leading channel axis.

    >>> image = Image(np.zeros((2, 4, 5, 6)), np.diag([2.0, 2.0, 2.0, 1.0]), channels=True)
    >>> image.shape, image.ndim, image.spacing         # spatial only; spacing in mm
    ((4, 5, 6), 3, (2.0, 2.0, 2.0))
    """

    data: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    header: Any = None
    path: Path | None = None
    channels: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape (without the channel axis)."""
        return tuple(self.data.shape[1:] if self.channels else self.data.shape)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel sizes (world units, mm for NIfTI) along the spatial axes."""
        return voxel_sizes(self.affine, self.ndim)


def format_of(path: str | os.PathLike) -> str:
    """The extension of ``path`` among :data:`SUPPORTED` (case-insensitive).

    Raises:
        ValueError: an unsupported extension (the message lists the supported ones).

    >>> format_of("sub/brain.NII.GZ")
    '.nii.gz'
    """
    name = Path(path).name.lower()
    for ext in SUPPORTED:
        if name.endswith(ext):
            return ext
    raise ValueError(
        f"unsupported file type for {str(path)!r}: use one of {', '.join(SUPPORTED)}"
    )


def voxel_sizes(affine: np.ndarray, ndim: int = 3) -> tuple[float, ...]:
    """Voxel sizes along the first ``ndim`` array axes: column norms of ``affine[:3, :ndim]``.

    >>> voxel_sizes(np.diag([2.0, 3.0, 1.5, 1.0]))
    (2.0, 3.0, 1.5)
    """
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :ndim] ** 2).sum(0)))


def check_input_file(path: str | os.PathLike, kind: str = "file") -> Path:
    """``path`` as a :class:`~pathlib.Path` if it is an existing file; else FileNotFoundError
    (``no such {kind}: 'path'``) or IsADirectoryError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such {kind}: {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not a {kind}")
    return path


def check_affine(affine: Any, name: str = "affine") -> np.ndarray:
    """``affine`` as a finite ``(4, 4)`` float64 voxel-to-world matrix; else a ValueError naming
    ``name``."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ValueError(f"{name} must be a finite (4, 4) voxel-to-world matrix, got shape "
                         f"{matrix.shape}")
    return matrix


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The names of the arrays of an ``.npz`` archive (``[]`` for any other format)."""
    path = Path(path)
    if format_of(path) != ".npz":
        return []
    check_input_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return list(archive.keys())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read {str(path)!r} (corrupt or not a .npz file): {err}") from None


def _pick_npz(archive: Any, path: Path, key: str | None, prefer: tuple[str, ...]) -> np.ndarray:
    keys = list(archive.keys())
    if key is not None:
        if key not in keys:
            raise ValueError(f"{str(path)!r} has no array {key!r}; it holds {', '.join(keys) or 'none'}")
        return archive[key]
    if len(keys) == 1:
        return archive[keys[0]]
    for name in prefer:
        if name in keys:
            return archive[name]
    raise ValueError(
        f"{str(path)!r} holds several arrays ({', '.join(keys)}) and none is called "
        f"{' or '.join(repr(p) for p in prefer)}: choose one with key="
    )


def read_file(path: Path, key: str | None, prefer: tuple[str, ...], vector: bool = False) -> Image:
    """Read ``path``; ``vector=True`` takes an ``.npz``/``.npy`` array ``(ndim, *spatial)`` as a
    field with its components first (a displacement)."""
    ext = format_of(path)
    check_input_file(path)
    try:
        if ext in _NIBABEL:
            img = nib.load(str(path))
            data = np.asarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=np.float64)
            header = img.header
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                data = np.asarray(_pick_npz(archive, path, key, prefer))
            affine, header = np.eye(4), None
        else:
            data = np.load(path, allow_pickle=False)
            affine, header = np.eye(4), None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except ValueError as err:
        if "has no array" in str(err) or "holds several arrays" in str(err):
            raise
        raise ValueError(f"cannot read {str(path)!r}: {err}") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, Exception) as err:  # noqa: B014
        # nibabel's ImageFileError, truncated gzip streams, corrupt archives...
        raise ValueError(f"cannot read {str(path)!r} (corrupt or not a {ext} file): {err}") from None
    if data.dtype == object or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise ValueError(f"{str(path)!r} holds no numeric image (dtype {data.dtype})")
    if not data.dtype.isnative:  # MGH files are big-endian
        data = data.astype(data.dtype.newbyteorder("="))
    channels = False
    if vector and ext not in _NIBABEL and data.ndim in (3, 4) and data.shape[0] == data.ndim - 1:
        channels = True
    if ext in _NIBABEL:
        if data.ndim == 5 and data.shape[3] == 1:  # vector image (X, Y, Z, 1, C)
            data = np.moveaxis(data[:, :, :, 0], -1, 0)
            if data.shape[3] == 1 and data.shape[0] == 2:  # a 2D vector image (X, Y, 1, 1, 2)
                data = data[..., 0]
            channels = True
        elif data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
            channels = True
        elif data.ndim > 5:
            raise ValueError(f"{str(path)!r} has {data.ndim} axes; voxreg reads 2D to 4D images")
    if data.ndim < 2 or data.ndim - channels > 3:
        raise ValueError(
            f"{str(path)!r} has shape {data.shape}; voxreg reads 2D and 3D images"
        )
    return Image(np.ascontiguousarray(data), affine, header, path, channels)


def load_image(
    path: str | os.PathLike,
    normalize: Normalize | None = None,
    key: str | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> Image:
    """Read an image.

    Args:
        path: a ``.nii.gz``, ``.nii``, ``.mgz``, ``.mgh``, ``.npz`` or ``.npy`` file.
        normalize: ``None`` keeps the stored values and dtype (nibabel's scaling, ``scl_slope``,
            applied); otherwise see :func:`normalize` (the result is float32 in [0, 1]).
        key: the array of an ``.npz`` archive (default: its only array, else ``vol``, else
            ``seg``).
        percentiles: for ``normalize="percentile"``.

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: unsupported extension (the message lists the supported ones), corrupt or
            unreadable file, or not a 2D/3D image.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_image(Path(tmp) / "image.nii.gz", np.arange(24.0).reshape(2, 3, 4),
    ...                       affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    ...     image = load_image(path)
    ...     scaled = load_image(path, normalize="minmax")
    >>> image.shape, str(image.data.dtype), image.spacing   # float64 is stored as float32
    ((2, 3, 4), 'float32', (2.0, 2.0, 2.0))
    >>> float(scaled.data.min()), float(scaled.data.max())
    (0.0, 1.0)
    """
    image = read_file(Path(path), key, ("vol", "seg"))
    if normalize is not None:
        image.data = _normalize_array(image.data, normalize, percentiles)
    return image


def load_labels(path: str | os.PathLike, key: str | None = None) -> Image:
    """Read a label map: like :func:`load_image` (``.npz``: ``seg`` first), as integers.

    Float data are accepted only if every value is a whole number (they are cast to int32).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_image(Path(tmp) / "labels.npz", np.array([[0, 1], [2, 2]]), key="seg")
    ...     labels = load_labels(path)
    >>> labels.data, labels.data.dtype                 # int64 stored in the smallest type
    (array([[0, 1],
           [2, 2]], dtype=uint8), dtype('uint8'))
    """
    image = read_file(Path(path), key, ("seg", "vol"))
    data = image.data
    if data.dtype == np.bool_:
        image.data = data.astype(np.uint8)
    elif not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise ValueError(
                f"{str(path)!r} is not a label map: it holds non-integer values (dtype {data.dtype})"
            )
        image.data = data.astype(np.int32)
    return image


def read_grid(path: str | os.PathLike, key: str | None = None) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape and affine of an image file, reading only the header where possible.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_image(Path(tmp) / "image.nii", np.zeros((2, 3, 4), np.float32))
    ...     shape, affine = read_grid(path)
    >>> shape, affine.shape
    ((2, 3, 4), (4, 4))
    """
    path = Path(path)
    ext = format_of(path)
    if ext in _NIBABEL:
        check_input_file(path)
        try:
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - nibabel raises many kinds
            raise ValueError(f"cannot read {str(path)!r} (corrupt or not a {ext} file): {err}") from None
        if len(shape) == 5 and shape[3] == 1:
            shape = shape[:3] if shape[4] != 2 or shape[2] != 1 else shape[:2]
        elif len(shape) == 4:
            shape = shape[:3]
        return shape, affine
    image = read_file(path, key, ("vol", "seg"))
    return image.shape, image.affine


# --------------------------------------------------------------------------------------------
# intensities
# --------------------------------------------------------------------------------------------


def normalize(
    data: np.ndarray,
    method: Normalize = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Map intensities to float32 in [0, 1].

    Args:
        data: any numeric array.
        method: ``"minmax"``: ``(x - min) / (max - min)`` (for uint8 data that use the full
            range 0..255, as the IXI images do, this is ``x / 255``); ``"percentile"``: clip to
            the ``percentiles`` (robust to a few very bright voxels), then min-max;
            ``"none"``: only the cast to float32 (no clipping).
        percentiles: lower and upper percentiles for ``"percentile"``.

    A constant image gives zeros. NaNs are not allowed.

    >>> normalize(np.array([0, 50, 100]), "minmax")
    array([0. , 0.5, 1. ], dtype=float32)
    >>> normalize(np.array([3.0, 3.0]), "minmax")
    array([0., 0.], dtype=float32)
    """
    array = np.asarray(data)
    if method not in ("minmax", "percentile", "none"):
        raise ValueError(f"normalize must be 'minmax', 'percentile' or 'none', got {method!r}")
    out = array.astype(np.float32)
    if method == "none":
        return out
    if not np.all(np.isfinite(out)):
        raise ValueError("the image contains NaN or infinite values; cannot normalise it")
    if method == "minmax":
        lo, hi = float(out.min()), float(out.max())
    else:
        p_lo, p_hi = percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        lo, hi = (float(v) for v in np.percentile(out, [p_lo, p_hi]))
        out = np.clip(out, lo, hi)
    if hi <= lo:
        return np.zeros_like(out)
    return ((out - lo) / (hi - lo)).astype(np.float32)


_normalize_array = normalize  # load_image's argument shadows the name


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------


def same_grid(a: Image, b: Image, atol: float = 1e-3) -> bool:
    """Whether two images share a grid: same spatial shape and affines equal within ``atol``.

    >>> same_grid(Image(np.zeros((4, 4))), Image(np.ones((4, 4)))), same_grid(
    ...     Image(np.zeros((4, 4))), Image(np.zeros((4, 4)), np.diag([2.0, 1.0, 1.0, 1.0])))
    (True, False)
    """
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol, rtol=0)


def resample_to(
    moving: Image,
    fixed: Image,
    interp: Literal["linear", "nearest", "label"] | None = None,
    fill_value: float = 0.0,
) -> Image:
    """Resample ``moving`` onto ``fixed``'s grid through world coordinates.

    Each fixed voxel ``x`` reads the moving image at ``inv(A_moving) @ A_fixed @ x`` (pull-back,
    :func:`voxreg.warp` with ``shift_center=False``); points outside the moving image read
    ``fill_value``.

    Args:
        interp: ``"linear"``, ``"nearest"`` or ``"label"`` (label maps: the label whose
            linearly interpolated indicator is largest, as ANTs' ``genericLabel``); default
            nearest for integer data (label maps keep their values and dtype), linear otherwise.

    Returns:
        An :class:`Image` on the fixed grid with the fixed affine (and the fixed header).

    >>> moving = Image(np.arange(16.0).reshape(4, 4))
    >>> shifted = np.eye(4)
    >>> shifted[0, 3] = 1.0                     # fixed voxel i sits at moving voxel i + 1
    >>> resample_to(moving, Image(np.zeros((4, 4)), shifted)).data[:, 0]
    array([ 4.,  8., 12.,  0.])
    """
    if moving.ndim != fixed.ndim:
        raise ValueError(f"cannot resample a {moving.ndim}D image onto a {fixed.ndim}D grid")
    ndim = fixed.ndim
    if interp is None:
        interp = "linear" if np.issubdtype(moving.data.dtype, np.floating) else "nearest"

    def linear_part(affine: np.ndarray) -> np.ndarray:
        a = np.asarray(affine, dtype=np.float64)
        keep = list(range(ndim)) + [3]
        return a[np.ix_(keep, keep)] if ndim < 3 else a

    matrix = np.linalg.inv(linear_part(moving.affine)) @ linear_part(fixed.affine)
    # warp() with an affine samples onto the image's own grid: pad the moving image (with the
    # fill value, which is what lies outside it) to cover the fixed grid, then crop.
    common = tuple(max(m, f) for m, f in zip(moving.shape, fixed.shape))
    data = moving.data if moving.channels else moving.data[None]
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    pad = [(0, 0)] + [(0, c - m) for c, m in zip(common, moving.shape)]
    padded = np.pad(data, pad, mode="constant", constant_values=fill_value) if any(
        p[1] for p in pad) else data
    tensor = torch.from_numpy(np.ascontiguousarray(padded))
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    theta = torch.as_tensor(matrix[:ndim], dtype=torch.float64)
    if tensor.is_floating_point():
        theta = theta.to(tensor.dtype)
    moved = warp(tensor[None], theta[None], interp=interp, fill_value=fill_value,
                 shift_center=False)[0]
    moved = moved[(slice(None),) + tuple(slice(0, f) for f in fixed.shape)].numpy()
    if not moving.channels:
        moved = moved[0]
    if interp == "linear" and not np.issubdtype(moved.dtype, np.floating):
        moved = moved.astype(np.float32)
    return Image(np.ascontiguousarray(moved), np.array(fixed.affine, dtype=np.float64),
                 fixed.header, None, moving.channels)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """Check that ``path`` can be written as an image output without touching an input.

    Raises:
        ValueError: unsupported extension, or ``path`` is one of ``inputs``.
        FileNotFoundError / NotADirectoryError / PermissionError: its folder is missing, not a
            folder, or not writable.

    >>> check_output_path("moved.nii.gz", inputs=("moving.nii.gz",))
    PosixPath('moved.nii.gz')
    >>> check_output_path("moving.nii.gz", inputs=("moving.nii.gz",))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: output 'moving.nii.gz' is the input 'moving.nii.gz': voxreg never overwrites ...
    """
    format_of(Path(path))
    return check_output_file(path, inputs)


def check_output_file(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """:func:`check_output_path` for any file (no extension check), e.g. a CSV table.

    >>> check_output_file("dice.csv")
    PosixPath('dice.csv')
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a folder; give a file name")
    resolved = path.resolve()
    for item in inputs:
        if item is None:
            continue
        other = Path(item)
        if resolved == other.resolve() or (path.exists() and other.exists()
                                           and os.path.samefile(path, other)):
            raise ValueError(
                f"output {str(path)!r} is the input {str(other)!r}: voxreg never overwrites its "
                "inputs, choose another output name"
            )
    parent = resolved.parent
    if not parent.exists():
        raise FileNotFoundError(f"output folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {str(parent)!r} is not writable")
    return path


def _storable(data: np.ndarray) -> np.ndarray:
    """Integer data in a type every tool reads; float64 as float32; bool as uint8."""
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32) if data.dtype != np.float32 else data
    if data.dtype.itemsize > 4 or data.dtype == np.uint32:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        for candidate in (np.uint8, np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return data.astype(candidate)
        raise ValueError(f"integer values {lo}..{hi} do not fit in int32")
    return data


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` (same extension), then move
    it onto ``path`` in one step."""
    ext = format_of(path)
    parent = path.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {str(parent)!r} does not exist")
    with atomic_path(path, suffix=ext) as tmp:
        write(str(tmp))
    return path


def _nibabel_image(path: Path, data: np.ndarray, affine: np.ndarray, header: Any):
    ext = format_of(path)
    if ext in (".mgz", ".mgh"):
        if data.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            data = data.astype(np.float32 if np.issubdtype(data.dtype, np.floating) else np.int32)
        hdr = header if isinstance(header, nib.freesurfer.mghformat.MGHHeader) else None
        img = nib.MGHImage(data, affine, header=hdr.copy() if hdr is not None else None)
        img.set_data_dtype(data.dtype)
        return img
    hdr = header.copy() if isinstance(header, nib.Nifti1Header) else None
    if hdr is not None and type(header) is not nib.Nifti1Header:  # e.g. NIfTI-2
        hdr = None
    img = nib.Nifti1Image(data, affine, header=hdr, dtype=data.dtype)
    img.header.set_slope_inter(None, None)
    if hdr is None:
        img.header.set_xyzt_units("mm")
        img.set_sform(affine, code=2)
        img.set_qform(affine, code=2)
    return img


def save_image(
    path: str | os.PathLike,
    data: Any,
    affine: np.ndarray | None = None,
    header: Any = None,
    like: Image | None = None,
    channels: bool = False,
    key: str = "vol",
) -> Path:
    """Write an image or label map atomically.

    Args:
        path: destination; its extension picks the format (see the module doc). Its folder must
            exist. An existing file is replaced whole (never partially written).
        data: numpy array or tensor ``(*spatial)`` (``(C, *spatial)`` with ``channels``, stored as
            a 4D NIfTI ``(*spatial, C)``).
        affine: ``(4, 4)`` voxel-to-world matrix; default ``like``'s, else identity.
        header: a nibabel header used as a template (dtype and scaling are reset to fit
            ``data``); default ``like``'s.
        like: an :class:`Image` whose grid the data live on.
        channels: ``data`` has a leading channel axis.
        key: the array name in an ``.npz``.

    Returns:
        The path written.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = save_image(Path(tmp) / "labels.nii.gz", np.array([[[0, 1], [2, 300]]]))
    ...     stored = load_image(path).data
    >>> str(stored.dtype), stored.shape                # int64 stored as int16, shape kept
    ('int16', (1, 2, 2))
    """
    path = Path(path)
    ext = format_of(path)
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = _storable(np.asarray(data))
    if affine is None:
        affine = like.affine if like is not None else np.eye(4)
    if header is None and like is not None:
        header = like.header
    affine = check_affine(affine)
    if ext == ".npz":
        return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **{key: data}))
    if ext == ".npy":
        return atomic_write(path, lambda tmp: np.save(tmp, data))
    if channels:
        data = np.moveaxis(data, 0, -1)
    image = _nibabel_image(path, np.ascontiguousarray(data), affine, header)
    return atomic_write(path, lambda tmp: image.to_filename(tmp))
