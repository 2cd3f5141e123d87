"""Neural-network building blocks and models: layers, the VoxelMorph UNet and dense registration
model (and its fused decoder step), template models, the model registry and weight transfer.

Import the modules (``from voxreg.nn import networks``) or the names below.
"""

from voxreg.nn import fused, layers, networks, registry, template, weights
from voxreg.nn.layers import ResizeTransform, SpatialTransformer, VecInt
from voxreg.nn.networks import Transform, Unet, VxmDense, default_unet_features
from voxreg.nn.registry import MODEL_CLASSES, REGISTRATION_CLASSES, build_model
from voxreg.nn.template import ConditionalTemplate, TemplateCreation, TemplateModel, TemplateOutput
from voxreg.nn.weights import inflate_weights

__all__ = [
    "MODEL_CLASSES",
    "REGISTRATION_CLASSES",
    "ConditionalTemplate",
    "ResizeTransform",
    "SpatialTransformer",
    "TemplateCreation",
    "TemplateModel",
    "TemplateOutput",
    "Transform",
    "Unet",
    "VecInt",
    "VxmDense",
    "build_model",
    "default_unet_features",
    "fused",
    "inflate_weights",
    "layers",
    "networks",
    "registry",
    "template",
    "weights",
]
