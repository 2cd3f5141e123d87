"""Application layer: file-level pipelines (files in, files out) and the recipes of the shipped
models and the tutorial. Nothing below this package imports it; the ``voxreg`` command is a thin
layer above it: each command parses its options, calls one function here and prints.

File-level API (one function per command):

==========================================  ====================  ==============================
function                                    command               module
==========================================  ====================  ==============================
:func:`register.register_files`             ``voxreg register``   :mod:`voxreg.apps.register`
:func:`warp.warp_file`                      ``voxreg warp``       :mod:`voxreg.apps.warp`
:func:`evaluate.evaluate_pairs`             ``voxreg eval``       :mod:`voxreg.apps.evaluate`
:func:`affine.affine_files`                 ``voxreg affine``     :mod:`voxreg.apps.affine`
:func:`train.train_from_files`              ``voxreg train``      :mod:`voxreg.apps.train`
:func:`template.template_from_files`        ``voxreg template``   :mod:`voxreg.apps.template`
:func:`demo.run_demo`                       ``voxreg demo``       :mod:`voxreg.apps.demo`
:func:`models.list_model_info`              ``voxreg models``     :mod:`voxreg.apps.models`
==========================================  ====================  ==============================

:mod:`voxreg.apps.files` holds what they share (reading inputs, grid checks, the normalised
pair, lists of files, pairs CSVs, result tables). Recipes: :mod:`voxreg.apps.brain2d`,
:mod:`voxreg.apps.brain3d`, :mod:`voxreg.apps.tutorial`. The submodules are imported on demand
(``import voxreg.apps.register``); ``voxreg.register_files`` is re-exported at the top.
"""
