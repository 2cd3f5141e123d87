"""Register two scans as they come (any grid, orientation, voxel size, intensity range, whole head
or skull-stripped) with a model trained in a fixed domain, the way mri_synthmorph does.

The pipeline (:func:`register_native`):

1. **Each scan to the model's reference** (:func:`align_to_reference`): an affine registration
   of the whole scan to the domain's reference image (mutual information), the reference's brain
   mask pulled back onto the scan (dilated by ``mask_dilation`` voxels of the reference grid),
   then a second affine registration of the masked scan. The result is the world map
   ``reference RAS mm -> scan RAS mm`` and the scan's brain mask.
2. **Into the model's domain, one interpolation**: both scans are sampled on the domain grid
   through their maps, masked with the reference's brain mask (so whole heads look like the
   skull-stripped training images) and scaled as the training images were
   (:meth:`voxreg.domain.ModelDomain.scale_intensities`: divide by the 99.5th percentile in the
   brain, clip to [0, 1]). Only the network sees these images.
3. **The network** (optionally refined by instance optimisation, ``finetune`` steps) gives the
   displacement ``u`` on the domain grid (voxels, pull-back).
4. **One world-space transform**: a fixed-scan voxel ``y`` goes to the world, into the domain
   through the fixed scan's map, by ``u`` (zero outside the domain grid), and out to the moving
   scan through the moving scan's map: :attr:`NativeResult.coords` holds, for every voxel of the
   fixed grid, the voxel of the *original* moving scan to read. The moved image is one
   resampling of the original moving scan (:func:`voxreg.transforms.sample`), in its own
   intensity units; label maps use ``"label"`` or ``"nearest"``.

Frames: world = RAS millimetres (the NIfTI convention, ``docs/conventions.md`` rule 12); affine
world matrices pull back (``reference -> scan``, ``fixed -> moving``), as
:class:`voxreg.affine.AffineResult.world_matrix`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from voxreg import io
from voxreg import transforms as T
from voxreg._runtime import model_device
from voxreg.affine import register_affine
from voxreg.domain import ModelDomain
from voxreg.registration import finetune, register

__all__ = [
    "NativeResult",
    "align_to_reference",
    "domain_coords",
    "header_unknown",
    "orient_to_reference",
    "register_native",
]


@dataclass
class NativeResult:
    """What :func:`register_native` returns (numpy arrays; world = RAS mm).

    Attributes:
        coords: ``(ndim, *fixed_shape)`` float32: for each fixed-grid voxel, the voxel
            coordinates (``ij``) of the original moving scan it shows. The whole transform.
        world_disp: ``(ndim, *fixed_shape)`` float32: the same map as a world displacement,
            ``moving_point - fixed_point`` in RAS mm (pull-back).
        fixed_to_moving: ``(4, 4)`` the affine part alone, fixed RAS -> moving RAS.
        reference_to_fixed, reference_to_moving: ``(4, 4)`` each scan's map from the domain.
        domain_disp: ``(1, ndim, *domain.shape)`` the network's displacement (domain voxels).
        domain_moving, domain_fixed: the network's inputs ``(*domain.shape)``.
        fixed_mask, moving_mask: each scan's brain mask on its own grid (boolean).
        inverse_coords: with ``inverse=True``: ``(ndim, *moving_shape)``, for each moving-grid
            voxel the fixed-scan voxel it shows (the inverse transform); else ``None``.
        registration: what the network (or the instance optimisation) returned in the domain.
        seconds: time per stage.
    """

    coords: np.ndarray
    world_disp: np.ndarray
    fixed_to_moving: np.ndarray
    reference_to_fixed: np.ndarray
    reference_to_moving: np.ndarray
    domain_disp: np.ndarray
    domain_moving: np.ndarray
    domain_fixed: np.ndarray
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    inverse_coords: np.ndarray | None = None
    registration: Any = None
    seconds: dict[str, float] = field(default_factory=dict)

    def resample(self, moving: io.Image | np.ndarray, interp: str = "linear",
                 fill_value: float = 0.0) -> np.ndarray:
        """The moving scan (or a label map on its grid) on the fixed grid, one interpolation.

        Integer data keep their dtype with ``interp="nearest"`` or ``"label"``.
        """
        return _resample(moving, self.coords, interp, fill_value)

    def resample_fixed(self, fixed: io.Image | np.ndarray, interp: str = "linear",
                       fill_value: float = 0.0) -> np.ndarray:
        """The fixed scan (or a label map on its grid) on the moving grid by the inverse
        transform (needs ``inverse=True``), one interpolation."""
        if self.inverse_coords is None:
            raise ValueError("register_native(..., inverse=True) computes the inverse transform")
        return _resample(fixed, self.inverse_coords, interp, fill_value)


def _resample(image: io.Image | np.ndarray, coords: np.ndarray, interp: str,
              fill_value: float) -> np.ndarray:
    data = image.data if isinstance(image, io.Image) else np.asarray(image)
    tensor = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    points = torch.from_numpy(coords)[None]
    if tensor.is_floating_point():
        points = points.to(tensor.dtype)
    return T.sample(tensor, points, interp=interp, fill_value=fill_value)[0, 0].numpy()


def _grid_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(3, *shape)`` of a grid's voxel centres (2D grids: the first two)."""
    index = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape],
                                 indexing="ij"))
    ndim = len(shape)
    return np.tensordot(affine[:3, :ndim], index, axes=1) + affine[:3, 3].reshape(3, *[1] * ndim)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix (4, 4)`` applied to points ``(3, *shape)``."""
    return np.tensordot(matrix[:3, :3], points, axes=1) + matrix[:3, 3].reshape(
        3, *[1] * (points.ndim - 1))


def _to_voxels(points: np.ndarray, affine: np.ndarray, ndim: int) -> np.ndarray:
    """World points ``(3, *shape)`` -> voxel coordinates ``(ndim, *shape)`` of a grid."""
    return _apply(np.linalg.inv(affine), points)[:ndim]


def domain_coords(image_affine: np.ndarray, domain: ModelDomain,
                  reference_to_image: np.ndarray) -> np.ndarray:
    """``(ndim, *domain.shape)`` voxel coordinates of ``image`` for each domain voxel, through the
    world map ``reference_to_image`` (domain RAS -> image RAS)."""
    world = _apply(reference_to_image, _grid_points(domain.shape, domain.affine))
    return _to_voxels(world, image_affine, domain.ndim).astype(np.float32)


def _sample(data: np.ndarray, coords: np.ndarray, interp: str = "linear") -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    return T.sample(tensor, torch.from_numpy(coords)[None], interp=interp)[0, 0].numpy()


def header_unknown(image: io.Image) -> bool:
    """Whether a scan's header carries no orientation: its affine is the identity, as numpy files
    and NIfTI files written without one have (voxreg then cannot know which way the head
    faces)."""
    return bool(np.allclose(image.affine, np.eye(4)))


def _signed_permutations(ndim: int = 3):
    """The 48 axis-aligned orientations of a 3D grid: every permutation of the axes with every
    choice of signs (reflections included: a header that lost its orientation may also have lost
    its handedness)."""
    for perm in itertools.permutations(range(ndim)):
        for signs in itertools.product((1.0, -1.0), repeat=ndim):
            matrix = np.zeros((ndim, ndim))
            for axis, (target, sign) in enumerate(zip(perm, signs)):
                matrix[target, axis] = sign
            yield matrix


def _coarse(image: io.Image, spacing: float) -> io.Image:
    """``image`` smoothed and decimated to about ``spacing`` mm (for a quick search)."""
    sizes = np.asarray(io.voxel_sizes(image.affine, 3))
    steps = np.maximum(1, np.round(spacing / sizes)).astype(int)
    data = ndimage.gaussian_filter(np.asarray(image.data, np.float32), steps / 2.0)
    data = data[tuple(slice(0, None, k) for k in steps)]
    affine = image.affine @ np.diag([*steps.astype(float), 1.0])
    return io.Image(np.ascontiguousarray(data), affine)


def orient_to_reference(image: io.Image, reference: io.Image, spacing: float = 6.0,
                        handedness: float | None = None) -> np.ndarray:
    """An affine for a scan whose header carries no orientation (:func:`header_unknown`): of the
    axis-aligned orientations (centred on the grid, with the header's voxel size), the one whose
    quick affine registration to ``reference`` fits best (mutual information, on copies
    decimated to about ``spacing`` mm).

    A brain and its mirror image fit a reference almost equally well, so the handedness (the
    sign of the orientation's determinant) is better given than searched: ``handedness`` +1 or
    -1 restricts the search to the 24 orientations of that sign (:func:`register_native` passes
    the other scan's), ``None`` searches all 48.

    Returns:
        ``(4, 4)`` voxel -> world matrix to use for ``image`` in the reference's space.
    """
    sizes = np.asarray(io.voxel_sizes(image.affine, 3))
    centre = (np.asarray(image.shape) - 1) / 2
    small = _coarse(image, spacing)
    small_reference = _coarse(reference, spacing)
    best, best_loss = image.affine, np.inf
    for matrix in _signed_permutations():
        if handedness is not None and np.sign(np.linalg.det(matrix)) != np.sign(handedness):
            continue
        candidate = np.eye(4)
        candidate[:3, :3] = matrix * sizes
        candidate[:3, 3] = -candidate[:3, :3] @ centre
        steps = np.diag(small.affine)[:3] / np.diag(image.affine)[:3]
        trial = io.Image(small.data, candidate @ np.diag([*steps, 1.0]))
        loss = register_affine(trial, small_reference, levels=(1,), iterations=(30,),
                               rigid_iterations=15, max_points=4096).loss
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best


def align_to_reference(image: io.Image, domain: ModelDomain, *, mask_dilation: int = 1,
                       reference: io.Image | None = None,
                       reference_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Affine map from the domain's reference to ``image`` and the image's brain mask.

    Two affine registrations (mutual information): the whole scan, then the scan masked by the
    reference's brain mask pulled back through the first map (so a skull, neck or field of view
    larger than the reference does not pull the second one). The first stage relies on the
    anatomy inside the head (grey and white matter) to tell the brain from the head.

    Args:
        image: a 3D scan on any grid (whole head or skull-stripped, any intensity range).
        domain: the model's domain; must have a reference image and mask.
        mask_dilation: voxels of the reference grid by which the brain mask is grown.
        reference, reference_mask: the domain's reference image and mask (loaded when ``None``).

    Returns:
        ``(reference_to_image, mask)``: ``(4, 4)`` RAS mm map (pull-back: a reference point ->
        the image point that shows it) and a boolean mask on the image's grid.
    """
    reference = domain.reference_image() if reference is None else reference
    brain = domain.reference_mask() if reference_mask is None else reference_mask
    if mask_dilation:
        brain = ndimage.binary_dilation(brain, iterations=int(mask_dilation))
    first = register_affine(image, reference).world_matrix
    voxels = _to_voxels(_apply(np.linalg.inv(first), _grid_points(image.shape, image.affine)),
                        domain.affine, domain.ndim).astype(np.float32)
    mask = _sample(brain.astype(np.float32), voxels) > 0.5
    if not mask.any():
        raise ValueError(f"the brain mask of the reference does not overlap the scan "
                         f"{str(image.path or 'image')!r} after affine alignment")
    stripped = io.Image(np.where(mask, image.data, 0).astype(np.float32), image.affine,
                        image.header, image.path)
    second = register_affine(stripped, reference).world_matrix
    return second, mask


def register_native(
    moving: io.Image,
    fixed: io.Image,
    model: nn.Module,
    domain: ModelDomain,
    *,
    finetune_steps: int = 0,
    finetune_options: dict[str, Any] | None = None,
    mask_dilation: int = 1,
    inverse: bool = False,
    progress: bool = False,
    reference: io.Image | None = None,
    reference_mask: np.ndarray | None = None,
) -> NativeResult:
    """Register two 3D scans on any grids through the model's domain (see the module doc).

    Args:
        moving, fixed: 3D scans (:class:`voxreg.io.Image`, one channel) with their affines.
        model: a registration model (``VxmDense``) trained in ``domain``.
        domain: the model's domain, with a reference image and brain mask.
        finetune_steps: instance-optimisation steps in the domain (0: the network alone).
        finetune_options: more arguments of :func:`voxreg.registration.finetune`.
        mask_dilation: see :func:`align_to_reference`.
        inverse: also compute the inverse transform (:attr:`NativeResult.inverse_coords`).
        progress: progress bar for the instance optimisation.
        reference, reference_mask: the domain's reference image and brain mask (default: the
            files the domain names, shipped with voxreg).

    Returns:
        A :class:`NativeResult` on the fixed scan's grid.

    Raises:
        ValueError: for 2D or multi-channel scans, a domain without a reference, or a model
            whose input shape differs from the domain's.
    """
    for name, image in (("moving", moving), ("fixed", fixed)):
        if image.channels or image.ndim != 3:
            raise ValueError(f"{name} must be a single-channel 3D scan for the native pipeline, "
                             f"got shape {tuple(image.data.shape)}")
    inshape = tuple(getattr(model, "inshape", domain.shape))
    if inshape != tuple(domain.shape):
        raise ValueError(f"the model takes {inshape} inputs but its domain grid is {domain.shape}")
    seconds: dict[str, float] = {}
    tic = time.perf_counter()
    reference = domain.reference_image() if reference is None else reference
    brain = domain.reference_mask() if reference_mask is None else np.asarray(reference_mask, bool)
    original = {"moving": moving.affine, "fixed": fixed.affine}
    if header_unknown(fixed):
        fixed = io.Image(fixed.data, orient_to_reference(fixed, reference), fixed.header,
                         fixed.path)
    if header_unknown(moving):  # the fixed scan's handedness (see orient_to_reference)
        moving = io.Image(moving.data, orient_to_reference(
            moving, reference, handedness=np.linalg.det(fixed.affine[:3, :3])), moving.header,
            moving.path)
    ref_to_fixed, fixed_mask = align_to_reference(fixed, domain, mask_dilation=mask_dilation,
                                                  reference=reference, reference_mask=brain)
    ref_to_moving, moving_mask = align_to_reference(moving, domain, mask_dilation=mask_dilation,
                                                    reference=reference, reference_mask=brain)
    seconds["affine"] = time.perf_counter() - tic

    tic = time.perf_counter()
    inputs = []
    for image, matrix in ((moving, ref_to_moving), (fixed, ref_to_fixed)):
        resampled = _sample(np.asarray(image.data, np.float32),
                            domain_coords(image.affine, domain, matrix))
        inputs.append(np.where(brain, domain.scale_intensities(resampled, brain), 0.0)
                      .astype(np.float32))
    domain_moving, domain_fixed = inputs
    seconds["resample"] = time.perf_counter() - tic

    tic = time.perf_counter()
    device = model_device(model)
    if finetune_steps:
        result = finetune(model, domain_moving, domain_fixed, steps=int(finetune_steps),
                          progress=progress, device=device, inverse=inverse,
                          **(finetune_options or {}))
    else:
        result = register(model, domain_moving, domain_fixed, device=device, inverse=inverse,
                          return_time=True)
    disp = _field(result.disp, domain)
    seconds["network"] = time.perf_counter() - tic

    tic = time.perf_counter()
    coords, _ = _through_domain(fixed, moving, ref_to_fixed, ref_to_moving, disp, domain)
    inverse_coords = None
    if inverse:
        inverse_coords, _ = _through_domain(moving, fixed, ref_to_moving, ref_to_fixed,
                                            _field(result.inverse_disp, domain), domain)
    # world quantities in the scans' own header frames (which differ from the working frames
    # only for a scan whose header carried no orientation)
    fixed_points = _grid_points(fixed.shape, original["fixed"])
    world_disp = (_apply(original["moving"], coords) - fixed_points).astype(np.float32)
    to_original = {name: original[name] @ np.linalg.inv(image.affine)
                   for name, image in (("moving", moving), ("fixed", fixed))}
    ref_to_fixed = to_original["fixed"] @ ref_to_fixed
    ref_to_moving = to_original["moving"] @ ref_to_moving
    seconds["compose"] = time.perf_counter() - tic
    return NativeResult(
        coords=coords, world_disp=world_disp,
        fixed_to_moving=ref_to_moving @ np.linalg.inv(ref_to_fixed),
        reference_to_fixed=ref_to_fixed, reference_to_moving=ref_to_moving,
        domain_disp=disp, domain_moving=domain_moving, domain_fixed=domain_fixed,
        fixed_mask=fixed_mask, moving_mask=moving_mask, inverse_coords=inverse_coords,
        registration=result, seconds=seconds)


def _field(value: Any, domain: ModelDomain) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array.astype(np.float32).reshape(1, domain.ndim, *domain.shape)


def _through_domain(target: io.Image, source: io.Image, ref_to_target: np.ndarray,
                    ref_to_source: np.ndarray, disp: np.ndarray, domain: ModelDomain
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each voxel of ``target``'s grid, the ``source`` voxel it shows (``(ndim, *shape)``)
    and the world displacement (RAS mm): into the domain through ``ref_to_target``, by ``disp``
    (domain voxels, zero outside the domain grid), out through ``ref_to_source``."""
    points = _grid_points(target.shape, target.affine)
    in_domain = _to_voxels(_apply(np.linalg.inv(ref_to_target), points), domain.affine,
                           domain.ndim).astype(np.float32)
    field = T.sample(torch.from_numpy(disp), torch.from_numpy(in_domain)[None])[0].numpy()
    source_points = _apply(ref_to_source, _apply(domain.affine, in_domain + field))
    coords = _to_voxels(source_points, source.affine, domain.ndim).astype(np.float32)
    return coords, (source_points - points).astype(np.float32)
