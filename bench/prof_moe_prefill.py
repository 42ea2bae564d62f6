"""Run the MoE prefill mlp1 kernel (20b, T = 4096) three times, for a profiler:
    ncu -k regex:moe_wgmma --launch-skip 2 --launch-count 1 --section WarpStateStats --section SourceCounters python3 bench/prof_moe_prefill.py"""
import sys, torch
sys.path.insert(0, "bench")
from moe_bench import H, I, make, routing
w = make(32)
T = 4096
x = torch.randn(T, H, device="cuda").bfloat16()
wt, ids, counts, offsets, perm = routing(w, x)
h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
for _ in range(3):
    torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0, h, w["k1"].max_scale)
torch.cuda.synchronize()
print("ok")
