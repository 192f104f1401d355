"""The pipeline's stages, registered in pipeline.runner.STAGES; PIPELINE is their order."""

from stages import calibrate, export, filter_prune, finetune, layer_truncate, load, train, validate  # noqa: F401

PIPELINE: list[str] = ["load", "train", "calibrate", "filter_prune", "layer_truncate", "finetune", "export", "validate"]
