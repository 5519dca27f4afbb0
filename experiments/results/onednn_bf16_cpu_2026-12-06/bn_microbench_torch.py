"""torch's BatchNorm2d + ReLU, forward and forward + backward, on the activation bn_microbench.py
times (400 x 48 x 32 x 32, channels-last), float32 and bfloat16. Run with the original's venv."""

import time

import torch

for dt in (torch.float32, torch.bfloat16):
    x = torch.rand(400, 48, 32, 32).to(memory_format=torch.channels_last).to(dt).requires_grad_()
    bn = torch.nn.BatchNorm2d(48).to(dt)
    c = torch.rand_like(x)
    for name in ("fwd", "fwd+bwd"):
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            y = torch.relu(bn(x))
            if name == "fwd+bwd":
                (y * c).float().sum().backward()
            ts.append(time.perf_counter() - t)
        print("torch", dt, name, round(min(ts) * 1000, 1), "ms")
