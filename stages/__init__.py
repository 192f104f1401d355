"""The pipeline's stages, each registering itself in core.context.STAGES; PIPELINE is their order."""

from core.context import STAGES
from core.registry import PIPELINE
from stages import calibrate, export, filter_prune, finetune, layer_truncate, load, train, validate  # noqa: F401

if sorted(STAGES) != sorted(PIPELINE):  # a stage registered but not in the order, or ordered but not registered
    raise RuntimeError(f"core.registry.PIPELINE {PIPELINE} and the registered stages {sorted(STAGES)} differ")
