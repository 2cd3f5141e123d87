"""Record each shipped model's domain in its file, and write the reference image of the 3D brain
models (maintenance script; run once after training a shipped model).

    .venv/bin/python scripts/model_domains.py

* ``voxreg/models/ixi-t1-mni2mm.nii.gz``: the learned template of the shipped ``template3d``
  model (IXI T1 brains, affinely aligned to MNI152 at 2 mm), uint8 0..255 on the MNI 2 mm grid;
* ``voxreg/models/ixi-t1-mni2mm-mask.nii.gz``: its brain mask (template smoothed by 1 voxel > 0.1,
  holes filled);
* ``metadata["domain"]`` of every shipped model (:class:`voxreg.domain.ModelDomain`), and the
  module paths its description names; weights, config, counters and the rest of the metadata
  are kept as they are.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from voxreg import io
from voxreg._runtime import MODELS_DIR
from voxreg.checkpoint import list_models, load_checkpoint, save_model
from voxreg.domain import ModelDomain

MNI_2MM = np.array([[2, 0, 0, -94], [0, 2, 0, -128], [0, 0, 2, -90], [0, 0, 0, 1]], dtype=float)
# the 2D IXI models: the axial slice k = 47 (z = +4 mm) of that grid
MNI_2MM_AXIAL = np.array([[2, 0, 0, -94], [0, 2, 0, -128], [0, 0, 2, 4], [0, 0, 0, 1]], dtype=float)
SPACE = "MNI152 ICBM 2009a nonlinear symmetric (affine alignment)"
PERCENTILE = {"method": "percentile", "upper": 99.5, "within": "brain mask", "clip": [0.0, 1.0]}
REFERENCE, MASK = "ixi-t1-mni2mm", "ixi-t1-mni2mm-mask"
# module paths named in the models' descriptions, as the layered package spells them now
RENAMED = {"voxreg.template.TemplateCreation": "voxreg.nn.template.TemplateCreation",
           "voxreg.template.load_template_model": "voxreg.load_model",
           "voxreg.tutorials.mnist_tutorial": "voxreg.apps.tutorial.mnist_tutorial"}


def domains() -> dict[str, ModelDomain]:
    brain3d = dict(ndim=3, shape=(96, 112, 96), affine=MNI_2MM, space=SPACE, skull_stripped=True,
                   normalize=PERCENTILE, reference=REFERENCE, mask=MASK)
    brain2d = dict(ndim=2, shape=(96, 112), affine=MNI_2MM_AXIAL,
                   space=SPACE + ", axial slice z = +4 mm", skull_stripped=True,
                   normalize=PERCENTILE)
    return {
        "brain3d": ModelDomain(**brain3d, contrast="T1"),
        "brain3d-diff": ModelDomain(**brain3d, contrast="T1"),
        "synth3d": ModelDomain(**brain3d, contrast="any"),
        "template3d": ModelDomain(**brain3d, contrast="T1", purpose="template"),
        "brain2d-smooth": ModelDomain(**brain2d, contrast="T1"),
        "brain2d-nosmooth": ModelDomain(**brain2d, contrast="T1"),
        "synth2d": ModelDomain(**brain2d, contrast="any"),
        "template2d": ModelDomain(**brain2d, contrast="T1", purpose="template"),
        "mnist": ModelDomain(ndim=2, shape=(32, 32), affine=np.eye(4),
                             space="MNIST digits padded to 32x32", contrast="digits",
                             normalize={"method": "minmax"}),
    }


def write_reference() -> None:
    template = load_checkpoint("template3d").model.template_image()
    image = np.round(np.clip(template, 0, 1) * 255).astype(np.uint8)
    mask = ndimage.binary_fill_holes(ndimage.gaussian_filter(template, 1.0) > 0.1)
    io.save_image(MODELS_DIR / f"{REFERENCE}.nii.gz", image, affine=MNI_2MM)
    io.save_image(MODELS_DIR / f"{MASK}.nii.gz", mask.astype(np.uint8), affine=MNI_2MM)


def main() -> None:
    write_reference()
    table = domains()
    for name in list_models():
        ckpt = load_checkpoint(name)
        meta = dict(ckpt.metadata or {})
        meta["domain"] = table[name].to_metadata()
        if isinstance(meta.get("description"), str):
            for old, new in RENAMED.items():
                meta["description"] = meta["description"].replace(old, new)
        model = ckpt.model
        save_model(model, MODELS_DIR / f"{name}.safetensors", metadata=meta, step=ckpt.step,
                   epoch=ckpt.epoch, history=ckpt.history)
        print(f"{name}: {table[name].describe()}")


if __name__ == "__main__":
    main()
