"""A/B timing of the MoE kernels (CUDA graphs of 20 calls): decode variants (GPTOSS_MOE_DECODE) and
programmatic launch on/off. Usage: python bench/moe_ab.py"""
import os, sys, torch
sys.path.insert(0, "bench")
from moe_bench import H, I, make, routing
from gptoss_ext import ops
w = make(32)
def timeit(fn, n=20):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn(); torch.cuda.synchronize()
        with torch.cuda.graph(g):
            for _ in range(n): fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(5):
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1) * 1000 / n)
    return min(ts)
for T in (1, 8, 4096):
    x = torch.randn(T, H, device="cuda").bfloat16()
    wt, ids, counts, offsets, perm = routing(w, x)
    h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(T * 4, H, device="cuda")
    m1 = lambda: torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0, h, w["k1"].max_scale)
    m2 = lambda: torch.ops.gptoss_ext.moe_mlp2(h, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), y, w["k2"].max_scale)
    for var in (("a", "b") if T <= 8 else ("a",)):
        os.environ["GPTOSS_MOE_DECODE"] = var
        for pdl in (True, False):
            ops.set_pdl(pdl)
            print(f"T={T} variant={var} pdl={pdl} mlp1 {timeit(m1):.1f} us  mlp2 {timeit(m2):.1f} us  "
                  f"both {timeit(lambda: (m1(), m2())):.1f} us", flush=True)
ops.set_pdl(True)
