"""Shipped models give the same displacements as when they were recorded (regression across
refactors): tests/data/shipped_outputs.json holds, per shipped model, the displacement at 64 fixed
voxels for a seeded random input pair, written by the code before the layered redesign."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from voxreg.checkpoint import list_models, load_model

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "shipped_outputs.json").read_text())


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_shipped_model_outputs_unchanged(name, one_thread):
    assert name in list_models()
    ref = REFERENCE[name]
    model = load_model(name, device="cpu")
    assert type(model).__name__ == ref["class"]
    shape = tuple(ref["shape"])
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, *shape, generator=g)
    b = torch.rand(1, 1, *shape, generator=g)
    with torch.no_grad():
        if ref["class"] == "VxmDense":
            disp = model(a, b, registration=True)[1]
        else:
            attributes = torch.zeros(1, model.n_attributes) if hasattr(model, "n_attributes") else None
            disp = model(a, attributes).disp
    got = np.array([[float(disp[0, c][tuple(v)]) for c in range(len(shape))] for v in ref["voxels"]])
    np.testing.assert_allclose(got, np.array(ref["disp"]), rtol=0, atol=1e-5)
