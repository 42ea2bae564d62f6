"""Run the skinny decode linear a few times at the 20b qkv / out shapes, for a profiler:
    ncu --clock-control none -k regex:linear_skinny --launch-skip 4 --launch-count 2 python3 bench/experiments/profile_linear.py"""

import torch

from gptoss_ext import ops

x = torch.randn(1, 2880, device="cuda").bfloat16()
w = (torch.randn(5120, 2880, device="cuda") * 0.02).bfloat16()
b = torch.zeros(5120, device="cuda").bfloat16()
x2 = torch.randn(1, 4096, device="cuda").bfloat16()
w2 = (torch.randn(2880, 4096, device="cuda") * 0.02).bfloat16()
for _ in range(4):
    ops.linear(x, w, b, weight_constant=True)
    ops.linear(x2, w2, None, weight_constant=True)
torch.cuda.synchronize()
print("ok")
