"""A/B of the MoE expert kernels by name (the `kernel` argument of the ops, the plan's vocabulary):
8 routings rotated so the experts' weights stream from DRAM, timing as bench/common.py does, mlp1
and mlp2 together as moe_experts, against the bandwidth floor. With --profile it instead runs each
named kernel a few times for a profiler, e.g.

    python bench/experiments/moe_kernels.py --tokens 1,8,64 [--experts 32,128] [kernel names...]
    ncu -k regex:moe_ --launch-skip 4 --launch-count 2 python bench/experiments/moe_kernels.py --profile --tokens 1 decode_tiles_splitk
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import measure_ceilings, time_cuda  # noqa: E402
from moe_bench import BYTES_PER_EXPERT, H, I, make, routing  # noqa: E402

from gptoss_ext import ops  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,8")
    p.add_argument("--experts", default="32,128")
    p.add_argument("--profile", action="store_true")
    p.add_argument("kernels", nargs="*", help="kernel names (default: the plan's and every other that serves)")
    args = p.parse_args()
    names = ops.moe_kernel_names()
    copy_bw = None if args.profile else measure_ceilings()["copy_tbps"] * 1e12
    for E in (int(e) for e in args.experts.split(",")):
        w = make(E)
        for T in (int(t) for t in args.tokens.split(",")):
            n = 8
            xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
            rts = [routing(w, x) for x in xs]
            hs = [torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            ys = [torch.empty(T * 4, H, device="cuda") for _ in range(n)]
            plan = ops.moe_experts_plan(T * 4, E, 2 * I, H, w["k1"].max_scale)
            for kernel in args.kernels or names:
                kid = names.index(kernel)

                def run(i, kid=kid):
                    wt, ids, counts, offsets, perm = rts[i]
                    torch.ops.gptoss_ext.moe_experts(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                                     w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702,
                                                     7.0, hs[i], ys[i], w["k1"].max_scale, w["k2"].max_scale, kid)
                try:
                    run(0)
                except RuntimeError as e:       # a kernel that cannot serve the shape says why
                    print(f"E={E} T={T} {kernel}: {str(e).splitlines()[0]}")
                    continue
                if args.profile:
                    for i in range(6):
                        run(i % n)
                    torch.cuda.synchronize()
                    continue
                distinct = sum(int((r[2] > 0).sum()) for r in rts) / n
                floor_us = distinct * BYTES_PER_EXPERT / copy_bw * 1e6
                us = time_cuda(run, n)[0] * 1000
                mark = "  <- the plan" if kernel == plan else ""
                print(f"E={E} T={T} {kernel:22s} {us:8.1f} us  {us / floor_us:5.2f}x the bandwidth floor "
                      f"({floor_us:.1f} us){mark}", flush=True)
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
