"""Launching many runs: the subprocess scheduler (``runner``), sweep expansion (``sweep``) and the
committed results archive the benchmark accumulates into (``archive``).
"""
