"""Application layer: file-level pipelines (files in, files out) and the recipes of the shipped
models and the tutorial. Nothing below this package imports it; the ``voxreg`` command is a thin
layer above it."""
