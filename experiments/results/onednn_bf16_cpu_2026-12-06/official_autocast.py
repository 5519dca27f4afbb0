"""Runs ../../../../shared/bench/official_pretrain_step.py (the original PyTorch code's pre-training
step) under torch's CPU autocast in bfloat16: the original's own mixed precision is
torch.cuda.amp (CUDA only), so on a CPU this is the closest like-for-like to prelar-jax's
``model.compute_dtype=bfloat16``. Usage (from the folder holding official_pretrain_step.py):

    TORCH_PY official_autocast.py official_pretrain_step.py REF full 16 25 3
"""

import os
import runpy
import sys

import torch

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # its gym_stub
with torch.autocast("cpu", dtype=torch.bfloat16):
    runpy.run_path(script, run_name="__main__")
