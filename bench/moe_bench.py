"""MoE benchmarks: router, decode (T = 1, 8) and prefill (T = 4096) for the 20b (32 experts) and
120b (128 experts) shapes, against the measured copy bandwidth and the torch peers (gather + einsum
on bf16 weights, as the reference implementation does; torch._grouped_mm on bf16 weights)."""

from __future__ import annotations

import torch

from gptoss_ext import ops
from gptoss_ext.mxfp4 import KernelMXFP4
from gptoss_ext.synthetic import random_mxfp4

from common import Row, time_cuda

H = I = 2880
BYTES_PER_EXPERT = (2 * I * H + H * I) * 17 // 32 + 2 * (2 * I + H)     # MXFP4 codes + scales + biases


def make(E, seed=0):
    b1, s1 = random_mxfp4((E, 2 * I), H, seed=seed, name="mlp1", device="cuda", scale_bytes=(118, 122))
    b2, s2 = random_mxfp4((E, H), I, seed=seed, name="mlp2", device="cuda", scale_bytes=(118, 122))
    k1 = KernelMXFP4.from_checkpoint(b1, s1, swiglu=True)
    k2 = KernelMXFP4.from_checkpoint(b2, s2, swiglu=False)
    del b1, s1, b2, s2
    return dict(k1=k1, k2=k2, bias1=(torch.randn(E, 2 * I, device="cuda") * 0.1).bfloat16(),
                bias2=(torch.randn(E, H, device="cuda") * 0.1).bfloat16(),
                gw=(torch.randn(E, H, device="cuda") * H ** -0.5).bfloat16(),
                gb=torch.zeros(E, device="cuda").bfloat16())


def bf16_weights(E, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W1 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02).bfloat16()
    W2 = (torch.randn(E, H, I, device="cuda", generator=g) * 0.02).bfloat16()
    return W1, W2


def routing(w, x, k=4):
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"])
    return ops.moe_router(logits, k)


def run(l2: int) -> list[Row]:
    rows = []
    for name, E in (("20b", 32), ("120b", 128)):
        w = make(E)
        # router alone
        for T in (1, 4096):
            logits = torch.randn(T, E, device="cuda").bfloat16()
            ms, p10, p90, mode = time_cuda(lambda i: ops.moe_router(logits, 4))
            rows.append(Row("moe_router", f"{name} E={E} T={T}", "gptoss_ext", ms, p10, p90, timing=mode,
                            target="<=10 us, 1 launch" if T == 1 else "1 launch"))
        # gate linear + router: one fused launch (decode) against the two launches
        for T in (1, 8):
            xg = torch.randn(T, H, device="cuda").bfloat16()
            bufs = (torch.empty(T, 4, dtype=torch.int32, device="cuda"), torch.empty(T, 4, device="cuda"),
                    torch.empty(E, dtype=torch.int32, device="cuda"), torch.empty(E + 1, dtype=torch.int32, device="cuda"),
                    torch.empty(T * 4, dtype=torch.int32, device="cuda"),
                    torch.zeros(1 + T * E, dtype=torch.int32, device="cuda"))
            # the fused op itself (ops.moe_gate_router dispatches to it for 1-2 tokens only)
            for impl, fn in (("gptoss_ext fused gate+router",
                              lambda i: torch.ops.gptoss_ext.moe_gate_router(xg, w["gw"], w["gb"], 4, *bufs)),
                             ("gptoss_ext linear + router", lambda i: ops.moe_router(ops.linear(xg, w["gw"], w["gb"]), 4))):
                ms, p10, p90, mode = time_cuda(fn)
                rows.append(Row("moe_router", f"gate+router {name} E={E} T={T}", impl, ms, p10, p90, timing=mode))
        W1, W2 = bf16_weights(E)
        for T in (1, 8):
            n = 8   # different routings rotate the expert weights far beyond L2
            xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
            rts = [routing(w, x) for x in xs]
            hs = [torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            ys = [torch.empty(T * 4, H, device="cuda") for _ in range(n)]
            distinct = sum(int((r[2] > 0).sum()) for r in rts) / n
            nbytes = distinct * BYTES_PER_EXPERT

            def ours(i):   # what ops.moe runs: mlp1 then mlp2 in one op
                wt, ids, counts, offsets, perm = rts[i]
                torch.ops.gptoss_ext.moe_experts(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                                 w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702,
                                                 7.0, hs[i], ys[i], w["k1"].max_scale, w["k2"].max_scale)

            ids_l = [r[1].long() for r in rts]
            wts = [r[0] for r in rts]

            def torch_einsum(i):   # the reference implementation's gather + einsum, bf16 weights
                ids = ids_l[i]
                u = torch.einsum("beck,bk->bec", W1[ids], xs[i])
                gate, lin = u[..., ::2].clamp(max=7), u[..., 1::2].clamp(-7, 7)
                hh = gate * torch.sigmoid(1.702 * gate) * (lin + 1)
                y = torch.einsum("beck,bek->bec", W2[ids], hh)
                torch.einsum("bec,be->bc", y, wts[i].bfloat16())

            case = f"{name} decode T={T}"
            ms, p10, p90, mode = time_cuda(ours, n)
            plan = ops.moe_experts_plan(T * 4, E, 2 * I, H, w["k1"].max_scale)
            rows.append(Row("moe_experts", case, f"gptoss_ext ({plan})", ms, p10, p90, bytes=nbytes, timing=mode,
                            flops=2 * T * 4 * 3 * H * I, target="<=1.25x MXFP4 bytes / copy BW",
                            extra={"distinct_experts": distinct}))
            ms, p10, p90, mode = time_cuda(torch_einsum, n)
            rows.append(Row("moe_experts", case, "torch gather+einsum (bf16 weights)", ms, p10, p90, bytes=nbytes,
                            timing=mode, flops=2 * T * 4 * 3 * H * I))
        # The middle regime a busy server runs in: 64..512 tokens a step. A row's floor is the larger of
        # its bandwidth floor and its tensor-core floor, so its % of that floor is the larger of its
        # "% copy BW" and "% matmul" columns.
        for T in (64, 128, 256, 512):
            n = 4
            xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
            rts = [routing(w, x) for x in xs]
            hs = [torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda") for _ in range(n)]
            ys = [torch.empty(T * 4, H, device="cuda") for _ in range(n)]
            distinct = sum(int((r[2] > 0).sum()) for r in rts) / n
            nbytes, flops = distinct * BYTES_PER_EXPERT, 2 * T * 4 * 3 * H * I

            def ours_mid(i):
                wt, ids, counts, offsets, perm = rts[i]
                torch.ops.gptoss_ext.moe_experts(xs[i], w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes,
                                                 w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), 4, 1.702,
                                                 7.0, hs[i], ys[i], w["k1"].max_scale, w["k2"].max_scale)

            case = f"{name} batch T={T}"
            plan = ops.moe_experts_plan(T * 4, E, 2 * I, H, w["k1"].max_scale)
            ms, p10, p90, mode = time_cuda(ours_mid, n)
            rows.append(Row("moe_experts", case, f"gptoss_ext ({plan})", ms, p10, p90, bytes=nbytes, flops=flops,
                            timing=mode, target=">=70% of the larger floor (max of the two % columns)",
                            extra={"distinct_experts": distinct}))
            sorted_x = [xs[i][(rts[i][4] // 4).long()] for i in range(n)]
            ends = [rts[i][3][1:].contiguous() for i in range(n)]
            hb = [torch.randn(T * 4, I, device="cuda").bfloat16() for _ in range(n)]
            try:
                W1t, W2t = W1.transpose(1, 2), W2.transpose(1, 2)

                def grouped(i):
                    torch._grouped_mm(sorted_x[i], W1t, offs=ends[i])
                    torch._grouped_mm(hb[i], W2t, offs=ends[i])
                grouped(0)
                ms, p10, p90, mode = time_cuda(grouped, n)
                rows.append(Row("moe_experts", case, "torch._grouped_mm x2 (bf16 weights, no SwiGLU)", ms, p10, p90,
                                bytes=distinct * (3 * H * I * 2), flops=flops, timing=mode))
            except Exception as e:  # a missing peer is reported, not skipped silently
                rows.append(Row("moe_experts", case, f"torch._grouped_mm unavailable: {type(e).__name__}", 0.0, 0.0, 0.0))
        if name == "20b":
            T = 4096
            x = torch.randn(T, H, device="cuda").bfloat16()
            wt, ids, counts, offsets, perm = routing(w, x)
            h = torch.empty(T * 4, I, dtype=torch.bfloat16, device="cuda")
            flops = 2 * T * 4 * 2 * I * H
            # warm the clocks up before the first timed prefill row (the first row ran slow otherwise)
            for _ in range(20):
                torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702,
                                              7.0, h, w["k1"].max_scale)
            ms, p10, p90, mode = time_cuda(lambda i: torch.ops.gptoss_ext.moe_mlp1(
                x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0, h, w["k1"].max_scale))
            rows.append(Row("moe_experts", "mlp1 20b prefill T=4096", f"gptoss_ext ({ops.moe_experts_plan(T * 4, E, 2 * I, H, w['k1'].max_scale)})", ms, p10, p90, flops=flops, timing=mode,
                            bytes=E * BYTES_PER_EXPERT * 2 / 3, target="<=1.5x torch._grouped_mm"))
            for kernel in ("prefill_mma", "prefill_exact"):     # the other prefill kernels, named (off Hopper: mma)
                kid = ops.moe_kernel_names().index(kernel)
                ms, p10, p90, mode = time_cuda(lambda i: torch.ops.gptoss_ext.moe_mlp1(
                    x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, 4, 1.702, 7.0, h, w["k1"].max_scale,
                    kid))
                rows.append(Row("moe_experts", "mlp1 20b prefill T=4096", f"gptoss_ext, kernel {kernel}", ms, p10, p90,
                                flops=flops, timing=mode))
            xs_sorted = x[(perm // 4).long()]
            ends = offsets[1:].contiguous()
            try:
                W1t = W1.transpose(1, 2)
                torch._grouped_mm(xs_sorted, W1t, offs=ends)
                ms, p10, p90, mode = time_cuda(lambda i: torch._grouped_mm(xs_sorted, W1t, offs=ends))
                rows.append(Row("moe_experts", "mlp1 20b prefill T=4096", "torch._grouped_mm (bf16 weights)", ms, p10, p90,
                                flops=flops, timing=mode, bytes=E * 2 * I * H * 2))
            except Exception as e:  # a missing peer is reported, not skipped silently
                rows.append(Row("moe_experts", "mlp1 20b prefill T=4096", f"torch._grouped_mm unavailable: {type(e).__name__}",
                                0.0, 0.0, 0.0))
            y = torch.empty(T * 4, H, device="cuda")
            ms, p10, p90, mode = time_cuda(lambda i: torch.ops.gptoss_ext.moe_mlp2(
                h, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets, wt.view(-1), y, w["k2"].max_scale))
            rows.append(Row("moe_experts", "mlp2 20b prefill T=4096", "gptoss_ext", ms, p10, p90, flops=flops / 2, timing=mode))
            try:
                W2t = W2.transpose(1, 2)
                hs_ = torch.randn(T * 4, I, device="cuda").bfloat16()
                torch._grouped_mm(hs_, W2t, offs=ends)
                ms, p10, p90, mode = time_cuda(lambda i: torch._grouped_mm(hs_, W2t, offs=ends))
                rows.append(Row("moe_experts", "mlp2 20b prefill T=4096", "torch._grouped_mm (bf16 weights)", ms, p10, p90,
                                flops=flops / 2, timing=mode))
            except Exception as e:
                rows.append(Row("moe_experts", "mlp2 20b prefill T=4096", f"torch._grouped_mm unavailable: {type(e).__name__}",
                                0.0, 0.0, 0.0))
        del w, W1, W2
        torch.cuda.empty_cache()
    return rows
