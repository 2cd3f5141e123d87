"""Weight transfer between models: 2D -> 3D inflation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["inflate_weights"]


def inflate_weights(model: nn.Module, source: nn.Module) -> int:
    """Start a 3D model from a 2D one of the same architecture (I3D-style inflation).

    Every 2D kernel ``(out, in, kh, kw)`` of ``source`` becomes the 3D kernel
    ``(out, in, kd, kh, kw)`` of ``model`` by repeating it ``kd`` times along the new first axis
    and dividing by ``kd``; biases are copied. A volume that is constant along axis 0 then gives,
    away from its first and last slices, the 2D network's features on every slice. The 2D flow
    head's two output channels (the 2D axes 0 and 1) become the 3D channels 1 and 2; channel 0
    (the new axis) starts as VoxelMorph initialises a flow head (``Normal(0, 1e-5)``, zero bias).

    Args:
        model: the 3D model (e.g. a 3D :class:`VxmDense`), changed in place.
        source: the 2D model with the same layer names and channel counts.

    Returns:
        The number of tensors copied.

    Raises:
        ValueError: when a layer of ``model`` has no 2D counterpart of matching shape.
    """
    mine = model.state_dict()
    theirs = source.state_dict()
    update: dict[str, Tensor] = {}
    for name, target in mine.items():
        if name not in theirs:
            if not torch.is_floating_point(target) or name.endswith(("weight", "bias")):
                raise ValueError(f"inflate: {name!r} of the 3D model is not in the 2D model")
            continue  # buffers such as pre-built grids
        value = theirs[name].to(target.dtype)
        flow = name in ("flow.weight", "flow.bias")
        if target.dim() == 5 and value.dim() == 4:  # a conv kernel
            depth = target.shape[2]
            value = value.unsqueeze(2).expand(-1, -1, depth, -1, -1) / depth
            if flow:
                head = torch.empty_like(target).normal_(0.0, 1e-5)
                head[1:] = value
                value = head
        elif flow and target.dim() == 1:
            value = torch.cat([torch.zeros(1, dtype=target.dtype), value])
        if value.shape != target.shape:
            raise ValueError(f"inflate: {name!r} has shape {tuple(theirs[name].shape)} in the 2D "
                             f"model, which does not inflate to {tuple(target.shape)}")
        update[name] = value.contiguous()
    mine.update(update)
    model.load_state_dict(mine)
    return len(update)
