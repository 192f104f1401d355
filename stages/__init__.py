"""The pipeline's stages, each registering itself in pipeline.context.STAGES; PIPELINE is their order."""

from pipeline.context import PIPELINE  # noqa: F401
from stages import calibrate, export, filter_prune, finetune, layer_truncate, load, train, validate  # noqa: F401
