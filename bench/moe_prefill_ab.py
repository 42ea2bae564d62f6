"""A/B of the MoE prefill kernels at T = 4096 (CUDA events, median of 20): the mma.sync kernel
(GPTOSS_MOE_PREFILL=mma), the wgmma kernel at each token tile (GPTOSS_MOE_WGMMA_BN) and
torch._grouped_mm on bf16 weights with the same routing; max relative difference to the mma.sync
output. Usage: python bench/moe_prefill_ab.py [--out results.json]"""
import json, os, sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_bench import H, I, bf16_weights, make, routing  # noqa: E402


def median_us(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
        e0.record(); fn(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000)
    return sorted(ts)[n // 2]


def main():
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    rows = []
    for name, E in (("20b", 32), ("120b", 128)):
        w = make(E)
        W1, W2 = bf16_weights(E)
        T = 4096
        x = torch.randn(T, H, device="cuda").bfloat16()
        wt, ids, counts, offsets, perm = routing(w, x)
        h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
        hin = (torch.randn(T * 4, I, device="cuda") * 2).bfloat16()
        y = torch.empty(T * 4, H, device="cuda")
        f1 = 2 * T * 4 * 2 * I * H
        m1 = lambda: torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4,
                                                   1.702, 7.0, h, w["k1"].max_scale)
        m2 = lambda: torch.ops.gptoss_ext.moe_mlp2(hin, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets,
                                                   wt.view(-1), y, w["k2"].max_scale)
        base = {}
        for var in ("mma", "wgmma64", "wgmma128", "wgmma256", "default"):
            os.environ.pop("GPTOSS_MOE_PREFILL", None)
            os.environ.pop("GPTOSS_MOE_WGMMA_BN", None)
            if var == "mma":
                os.environ["GPTOSS_MOE_PREFILL"] = "mma"
            elif var.startswith("wgmma"):
                os.environ["GPTOSS_MOE_WGMMA_BN"] = var[5:]
            for mlp, fn, fl in (("mlp1", m1, f1), ("mlp2", m2, f1 / 2)):
                us = median_us(fn)
                o = (h if mlp == "mlp1" else y).float().clone()
                if var == "mma":
                    base[mlp] = o
                d = ((o - base[mlp]).norm() / base[mlp].norm()).item()
                rows.append(dict(shape=name, mlp=mlp, impl=var, us=round(us, 1), tflops=round(fl / us / 1e6, 1),
                                 rel_diff_to_mma=d))
        os.environ.pop("GPTOSS_MOE_PREFILL", None)
        os.environ.pop("GPTOSS_MOE_WGMMA_BN", None)
        xs_sorted = x[(perm // 4).long()]
        ends = offsets[1:].contiguous()
        for mlp, A, B, fl in (("mlp1", xs_sorted, W1.transpose(1, 2), f1), ("mlp2", hin, W2.transpose(1, 2), f1 / 2)):
            us = median_us(lambda: torch._grouped_mm(A, B, offs=ends))
            rows.append(dict(shape=name, mlp=mlp, impl="torch._grouped_mm bf16", us=round(us, 1),
                             tflops=round(fl / us / 1e6, 1), rel_diff_to_mma=None))
        del w, W1, W2
        torch.cuda.empty_cache()
    for r in rows:
        d = "" if r["rel_diff_to_mma"] is None else f"  diff {r['rel_diff_to_mma']:.2e}"
        print(f"{r['shape']:5s} {r['mlp']} {r['impl']:24s} {r['us']:9.1f} us {r['tflops']:7.1f} TFLOP/s{d}")
    if out:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
