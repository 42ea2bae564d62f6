import os, sys, torch
sys.path.insert(0, "bench")
from moe_bench import H, I, make, routing
w = make(32)
T = 1
xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(8)]
rts = [routing(w, x) for x in xs]
scratch = torch.zeros(T * 4 * (I // 64) + 2, dtype=torch.int32, device="cuda")
h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
y = torch.empty(T * 4, H, device="cuda")
for it in range(6):
    wt, ids, counts, offsets, perm = rts[it % 8]
    torch.ops.gptoss_ext.moe_experts(xs[it % 8], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                     w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702, 7.0, h, y,
                                     w["k1"].max_scale, w["k2"].max_scale, scratch if os.environ.get("FUSED") else None)
torch.cuda.synchronize()
