"""Runs the MoE decode kernels a few times at T = 1 (20b shapes) for an ncu capture:
    ncu -k regex:moe_ --metrics ... python bench/ncu_decode_probe.py [GPTOSS_MOE_DECODE variant]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_bench import H, I, make, routing  # noqa: E402

if len(sys.argv) > 1:
    os.environ["GPTOSS_MOE_DECODE"] = sys.argv[1]
w = make(32)
xs = [torch.randn(1, H, device="cuda").bfloat16() for _ in range(8)]
rts = [routing(w, x) for x in xs]
h = torch.empty(4, I, dtype=torch.bfloat16, device="cuda")
y = torch.empty(4, H, device="cuda")
for it in range(6):
    wt, ids, counts, offsets, perm = rts[it % 8]
    torch.ops.gptoss_ext.moe_experts(xs[it % 8], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                     w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702, 7.0, h, y,
                                     w["k1"].max_scale, w["k2"].max_scale)
torch.cuda.synchronize()
