"""A/B of the MoE decode kernel shapes (GPTOSS_MOE_DECODE) with the benchmark's method: 8 routings
rotated so the experts' weights stream from DRAM, CUDA-graph timing (bench/common.py), mlp1 and mlp2
alone and together, 20b (E = 32) and 120b (E = 128) shapes, T = 1 and 8.
Usage: python bench/moe_decode_ab.py [--tokens 1,8] [variants, default: auto p q r b h; auto = the
built-in choice; a variant with '=' sets GPTOSS_MOE_<KEY>=<VALUE> for each '+'-joined KEY=VALUE, e.g.
FAST_BATCH=0 or DECODE=p+FAST_BATCH=0]"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure_ceilings, time_cuda  # noqa: E402
from moe_bench import BYTES_PER_EXPERT, H, I, make, routing  # noqa: E402


def main():
    args = sys.argv[1:]
    tokens = [1, 8]
    if "--tokens" in args:
        i = args.index("--tokens")
        tokens = [int(t) for t in args[i + 1].split(",")]
        del args[i:i + 2]
    variants = args or ["auto", "p", "q", "r", "b", "h"]
    copy_bw = measure_ceilings()["copy_tbps"] * 1e12
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (bench/common.py measure_ceilings)", flush=True)
    for name, E in (("20b", 32), ("120b", 128)):
        w = make(E)
        for T in tokens:
            n = 8
            xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
            rts = [routing(w, x) for x in xs]
            hs = [torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            ys = [torch.empty(T * 4, H, device="cuda") for _ in range(n)]
            distinct = sum(int((r[2] > 0).sum()) for r in rts) / n
            floor_us = distinct * BYTES_PER_EXPERT / copy_bw * 1e6

            def m1(i):
                wt, ids, counts, offsets, perm = rts[i]
                torch.ops.gptoss_ext.moe_mlp1(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4,
                                              1.702, 7.0, hs[i], w["k1"].max_scale)

            def m2(i):
                wt, ids, counts, offsets, perm = rts[i]
                torch.ops.gptoss_ext.moe_mlp2(hs[i], w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets,
                                              wt.view(-1), ys[i], w["k2"].max_scale)

            def fused(i):
                wt, ids, counts, offsets, perm = rts[i]
                torch.ops.gptoss_ext.moe_experts(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                                 w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702,
                                                 7.0, hs[i], ys[i], w["k1"].max_scale, w["k2"].max_scale)

            tf = time_cuda(fused, n)[0] * 1000
            print(f"{name} T={T} moe_experts (default kernels, mlp2 routing_ready): {tf:6.1f} us "
                  f"({tf / floor_us:.2f}x the floor {floor_us:.1f} us at the measured copy bandwidth)", flush=True)
            for var in variants:
                envs = dict(kv.split("=", 1) for kv in var.split("+")) if "=" in var else {}
                for k, v in envs.items():
                    os.environ["GPTOSS_MOE_" + k] = v
                if var == "auto" or (envs and "DECODE" not in envs):
                    os.environ.pop("GPTOSS_MOE_DECODE", None)
                elif not envs:
                    os.environ["GPTOSS_MOE_DECODE"] = var
                t1 = time_cuda(m1, n)[0] * 1000
                t2 = time_cuda(m2, n)[0] * 1000
                tb = time_cuda(lambda i: (m1(i), m2(i)), n)[0] * 1000
                te = time_cuda(fused, n)[0] * 1000
                print(f"{name} T={T} variant={var}: mlp1 {t1:6.1f} us  mlp2 {t2:6.1f} us  both {tb:6.1f} us "
                      f"({tb / floor_us:.2f}x the floor {floor_us:.1f} us at the measured copy bandwidth); "
                      f"as moe_experts {te:6.1f} us ({te / floor_us:.2f}x)", flush=True)
                for k in envs:
                    os.environ.pop("GPTOSS_MOE_" + k, None)
            os.environ.pop("GPTOSS_MOE_DECODE", None)
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
