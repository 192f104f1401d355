"""What every stage builds on: errors, config sections, the stage context and registry, the run directory, data,
models, the measurement cache and progress. It imports nothing of export, stages or pipeline (tests/test_layering.py).
"""
