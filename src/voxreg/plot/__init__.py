"""Pictures of images, displacement fields, label maps and training curves.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (so nothing is
registered with pyplot's figure manager and nothing leaks; show it in a notebook by leaving it as
the cell's value, or call ``fig.savefig``). Every function takes ``save=PATH`` to also write a PNG
(atomically: a temporary file in the same folder, then ``os.replace``; the folder is created).

Inputs may be numpy arrays or torch tensors (detached and moved to the CPU here). Images follow
voxreg's conventions: a 2D image is ``(H, W)``; a 3D volume ``(D, H, W)`` is shown by a slice
(``axis``/``index``, the middle one by default). Leading axes of size 1 (``(1, 1, H, W)`` from a
``(B, C, *spatial)`` batch) are dropped. A displacement is ``(ndim, *spatial)`` or
``(B, ndim, *spatial)`` in voxels, channel ``k`` along array axis ``k`` (``ij`` indexing), and
warping pulls back: ``moved(x) = moving(x + disp(x))``. Pictures use ``imshow``'s frame
(``origin="upper"``): column index to the right, row index downwards.

Bad input raises :class:`ValueError` naming the argument.

The package: :mod:`~voxreg.plot.images` (:func:`slices`, :func:`volume_slices`),
:mod:`~voxreg.plot.fields` (:func:`flow`, :func:`grid`, :func:`jacobian`),
:mod:`~voxreg.plot.labels` (:func:`label_colormap`, :func:`overlay`), :mod:`~voxreg.plot.curves`
(:func:`history`) and :mod:`~voxreg.plot.figures` (what they share, e.g. :func:`save_figure`).
Import the names from ``voxreg.plot``.

>>> import numpy as np
>>> fig = slices([np.zeros((4, 6)), np.ones((4, 6))], titles=["zeros", "ones"])
>>> [ax.get_title() for ax in fig.axes]
['zeros', 'ones']
"""

from voxreg.plot.curves import history
from voxreg.plot.fields import flow, grid, jacobian
from voxreg.plot.figures import save_figure
from voxreg.plot.images import slices, volume_slices
from voxreg.plot.labels import label_colormap, overlay

__all__ = [
    "flow",
    "grid",
    "history",
    "jacobian",
    "label_colormap",
    "overlay",
    "save_figure",
    "slices",
    "volume_slices",
]

# The name voxreg.apps.tutorial calls; save_figure is the public one.
