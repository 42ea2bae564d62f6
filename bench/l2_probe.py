"""Skinny linear (M = 1) on the decode projections: the sm_90 bulk-copy streaming kernel vs the
register-streaming one (GPTOSS_LINEAR_STREAM=0), with the weight L2-resident (the same weight 40
times) and streamed from DRAM (8 weights in turn), in CUDA graphs of 40 dependent launches."""
import os

import torch

import gptoss_ext  # noqa: F401
from gptoss_ext import ops

for N, K in ((5120, 2880), (2880, 4096)):
    ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(8)]
    b = torch.randn(N, device="cuda").bfloat16()
    xx = torch.randn(1, K, device="cuda").bfloat16()
    for kernel in ("1", "0"):
        os.environ["GPTOSS_LINEAR_STREAM"] = kernel
        for label, sel in (("L2", lambda i: ws[0]), ("DRAM", lambda i: ws[i % 8])):
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                for i in range(40):
                    ops.linear(xx, sel(i), b, weight_constant=True)
            for _ in range(3):
                gr.replay()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
            e0.record()
            for _ in range(10):
                gr.replay()
            e1.record()
            torch.cuda.synchronize()
            us = e0.elapsed_time(e1) / 400 * 1000
            print(f"linear {K}->{N} {'stream' if kernel == '1' else 'registers'} {label}: {us:.2f} us "
                  f"({N * K * 2 / us / 1e6:.2f} TB/s)")
os.environ.pop("GPTOSS_LINEAR_STREAM")
