"""IDAP++ compression pipeline: config, stage registry, runner, run directory and CLI."""

__version__ = "0.1.0"
