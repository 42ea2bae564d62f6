"""Diagnostics of the fused MoE decode kernel: per-CTA timestamps (GPTOSS_MOE_FUSED_TRACE=1) at its
phases, 20b shapes, T = 1. Usage: python bench/diag_fused.py [T]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_bench import H, I, make, routing  # noqa: E402

NAMES = {0: "start (after wait)", 1: "phase A loop end", 2: "phase A barrier", 3: "own h staged",
         7: "round 1 end", 4: "import staged", 5: "round 2 end", 6: "counted + reduced"}


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    os.environ["GPTOSS_MOE_FUSED"] = "1"
    os.environ["GPTOSS_MOE_FUSED_TRACE"] = "1"
    w = make(32)
    xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(8)]
    rts = [routing(w, x) for x in xs]
    need = T * 4 * (I // 64) + 2
    off = (need + 1) // 2 * 2
    scratch = torch.zeros(off + 2 * 8 * 32 * 1024, dtype=torch.int32, device="cuda")
    h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(T * 4, H, device="cuda")
    G = torch.cuda.get_device_properties(0).multi_processor_count
    for it in range(12):
        wt, ids, counts, offsets, perm = rts[it % 8]
        scratch[off:].zero_()
        torch.cuda.synchronize()
        torch.ops.gptoss_ext.moe_experts(xs[it % 8], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                         w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702, 7.0, h, y,
                                         w["k1"].max_scale, w["k2"].max_scale, scratch)
        torch.cuda.synchronize()
    tr = scratch[off:off + 2 * G * 8 * 32].view(torch.int64).view(G, 8, 32).cpu().double()
    t0 = tr[:, 0, :][tr[:, 0, :] > 0].min()
    rel = (tr - t0) / 1000.0
    print(f"T={T}, {G} CTAs; microseconds from the first CTA's start (min / median / max over CTAs; warp "
          f"points: over all warps)")
    for k in (0, 1, 2, 3, 7, 4, 5, 6):
        v = rel[:, k, :][tr[:, k, :] > 0]
        if v.numel() == 0:
            continue
        print(f"  {NAMES[k]:22s} {v.min():7.2f} {v.median():7.2f} {v.max():7.2f}  (n={v.numel()})")
    end = rel[:, 6, 0]
    slow = torch.argsort(end, descending=True)[:5]
    for b in slow.tolist():
        pts = " ".join(f"{NAMES[k].split()[0]}={rel[b, k, 0]:.1f}" for k in (0, 1, 2, 3, 7, 4, 5, 6) if tr[b, k, 0] > 0)
        print(f"  slowest CTA {b}: {pts}")


if __name__ == "__main__":
    main()
