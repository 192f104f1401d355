"""Benchmarks behind `make bench`: each module measures one question and renders a BENCHMARKS.md section."""
