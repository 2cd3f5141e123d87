"""Register images with a trained model: any array type, any leading axes, any size.

:func:`register` accepts numpy arrays or tensors of shape ``(*spatial)``, ``(C, *spatial)`` or
``(B, C, *spatial)``; the number of spatial axes is the model's (2 or 3), so a 2D model reads
``(H, W)``, ``(C, H, W)`` and ``(B, C, H, W)``. Outputs come back with the input's type, device,
and leading axes.

Beyond the forward pass:

* **Inverse and bidirectional outputs** (``register(..., inverse=True, moved_fixed=True)``): the
  inverse displacement (on the moving grid, mapping moving voxels to fixed voxels, so that
  ``compose(disp, inverse_disp)`` is about zero) and the fixed image warped onto the moving grid.
  For a diffeomorphic model (``int_steps > 0``) the inverse is ``exp(-velocity)``, integrated
  exactly as the model integrates its own field (conventions rules 7 and 8); for a plain
  displacement model it is the fixed-point inverse of :func:`voxreg.transforms.invert`, which
  is approximate (and not defined where the field folds), so a :class:`InverseApproximationWarning`
  says so with the residual.
* **Instance-specific optimisation** (:func:`finetune`): starting from the network's prediction,
  a few steps of Adam on this pair alone with the image loss and the smoothness penalty.

The package: :mod:`~voxreg.registration.model` (what a model says about itself),
:mod:`~voxreg.registration.pairs` (inputs and outputs in the caller's layout),
:mod:`~voxreg.registration.predict` (:func:`register` and the inverse) and
:mod:`~voxreg.registration.finetuning` (:func:`finetune`). Import the names below from
``voxreg.registration``.

>>> import torch
>>> from voxreg.nn.networks import VxmDense
>>> model = VxmDense((16, 16), nb_features=[[4, 4], [4, 4, 4]])
>>> moved, disp = register(model, torch.rand(16, 16), torch.rand(16, 16))   # (H, W) in
>>> tuple(moved.shape), tuple(disp.shape)                                   # (H, W), (ndim, H, W)
((16, 16), (2, 16, 16))
"""

from voxreg.registration.finetuning import (
    DEFAULT_FINETUNE_STEPS,
    DEFAULT_LR,
    FinetuneResult,
    finetune,
)
from voxreg.registration.model import loss_settings, model_ndim
from voxreg.registration.pairs import InputRangeWarning
from voxreg.registration.predict import InverseApproximationWarning, RegistrationResult, register

__all__ = [
    "DEFAULT_FINETUNE_STEPS",
    "InputRangeWarning",
    "DEFAULT_LR",
    "FinetuneResult",
    "InverseApproximationWarning",
    "RegistrationResult",
    "finetune",
    "loss_settings",
    "model_ndim",
    "register",
]

