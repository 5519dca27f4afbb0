"""Reading results: aggregate statistics over tasks and seeds (``stats``), the benchmark report
(``report``), the implicit-action probe (``probe``), the world-model transfer diagnostic
(``transfer``), the diagnostics' tables (``diagnostics_report``) and the pre-training evaluation
that combines them (``pretrain_eval``).

The submodules are imported on demand (``from prelar_jax.analysis import report``) so that importing
the package does not pull in matplotlib and rliable for code that only needs one of them.
"""
