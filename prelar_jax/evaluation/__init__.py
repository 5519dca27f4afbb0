"""Benchmark evaluation: aggregate statistics over tasks and seeds (``stats``) and the report (``report``).

The submodules are imported on demand (``from prelar_jax.evaluation import report``) so that importing
the package does not pull in matplotlib and rliable for code that only needs one of them.
"""
