"""Diagnostic: MoE decode GEMMs with weights streaming from DRAM (8 rotated routings) vs L2-hot (one
routing repeated), 20b shapes. Tells whether a kernel is bound by memory or by its own issue rate."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_cuda  # noqa: E402
from moe_bench import H, I, make, routing  # noqa: E402

w = make(32)
for T in (1, 8):
    n = 8
    xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
    rts = [routing(w, x) for x in xs]
    hs = [torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
    ys = [torch.empty(T * 4, H, device="cuda") for _ in range(n)]

    def m1(i):
        wt, ids, counts, offsets, perm = rts[i]
        torch.ops.gptoss_ext.moe_mlp1(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0,
                                      hs[i], w["k1"].max_scale)

    def m2(i):
        wt, ids, counts, offsets, perm = rts[i]
        torch.ops.gptoss_ext.moe_mlp2(hs[i], w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1),
                                      ys[i], w["k2"].max_scale)

    for name, f in (("mlp1", m1), ("mlp2", m2)):
        cold = time_cuda(f, n)[0] * 1000
        hot = time_cuda(f, 1)[0] * 1000
        print(f"20b T={T} {name}: DRAM {cold:6.1f} us  L2-hot {hot:6.1f} us", flush=True)
