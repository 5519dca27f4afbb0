"""Measurement libraries used by the benchmark scripts in ``experiments/`` (throughput, steady state)."""
