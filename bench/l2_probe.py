"""Skinny linear (M = 1) with its weight L2-resident vs streamed from DRAM: is it bandwidth- or latency-bound?"""
import torch, gptoss_ext as g
from gptoss_ext import ops
x = torch.randn(1, 2880, device="cuda").bfloat16()
for N, K in ((5120, 2880), (2880, 4096)):
    ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(8)]
    b = torch.randn(N, device="cuda").bfloat16()
    xx = torch.randn(1, K, device="cuda").bfloat16()
    for label, sel in (("same weight (L2)", lambda i: ws[0]), ("rotating 8 (DRAM)", lambda i: ws[i % 8])):
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for i in range(40):
                ops.linear(xx, sel(i), b, weight_constant=True)
        for _ in range(3): gr.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
        e0.record()
        for _ in range(10): gr.replay()
        e1.record(); torch.cuda.synchronize()
        print(f"linear {K}->{N} {label}: {e0.elapsed_time(e1) / 400 * 1000:.2f} us")
