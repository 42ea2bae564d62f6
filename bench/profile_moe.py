"""Run the MoE decode kernels a few times (20b shapes, T = 1), for a profiler:
    ncu --clock-control none -k regex:moe_gemm --launch-skip 4 --launch-count 2 python3 bench/profile_moe.py"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_bench import H, I, make, routing  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
w = make(32)
x = torch.randn(T, H, device="cuda").bfloat16()
wt, ids, counts, offsets, perm = routing(w, x)
h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
y = torch.empty(T * 4, H, device="cuda")
for _ in range(4):
    torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0, h)
    torch.ops.gptoss_ext.moe_mlp2(h, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), y)
torch.cuda.synchronize()
print("ok")
