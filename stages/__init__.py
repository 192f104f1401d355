"""The pipeline's stages, each registering itself in pipeline.context.STAGES; PIPELINE is their order."""

from pipeline.context import PIPELINE, STAGES
from stages import calibrate, export, filter_prune, finetune, layer_truncate, load, train, validate  # noqa: F401

if sorted(STAGES) != sorted(PIPELINE):  # a stage registered but not in the order, or ordered but not registered
    raise RuntimeError(f"pipeline.registry.PIPELINE {PIPELINE} and the registered stages {sorted(STAGES)} differ")
