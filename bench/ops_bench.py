"""Microbenchmarks: fused residual add + RMSNorm and YaRN RoPE at T = 1, 64, 4096 tokens
(hidden 2880; 64 query + 8 key heads of 64, the q/k slices of the fused qkv buffer), against the
plain-PyTorch reference and torch's own RMSNorm on the same GPU."""

from __future__ import annotations

import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref

from common import Row, count_launches, rotation_count, time_cuda

H, HQ, HKV, D = 2880, 64, 8, 64


def bench_rmsnorm(l2: int) -> list[Row]:
    rows = []
    scale = (torch.rand(H, device="cuda") + 0.5).bfloat16()
    for T in (1, 64, 4096):
        nbytes = 4 * T * H * 2                          # read x, residual; write out, residual_out
        n = rotation_count(nbytes, l2)
        xs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
        rs = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(n)]
        outs = [torch.empty(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        routs = [torch.empty(T, H, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
        case = f"T={T} H={H}"
        target = ">=80% copy BW" if T == 4096 else ("1 launch" if T == 1 else "")

        def ours(i):
            torch.ops.gptoss_ext.add_rms_norm(xs[i], rs[i], scale, 1e-5, outs[i], routs[i])

        def reference(i):
            with ops.reference_mode():
                ref.add_rms_norm(xs[i], rs[i], scale, 1e-5)

        def torch_rms(i):
            r = rs[i] + xs[i]
            torch.nn.functional.rms_norm(r, (H,), scale, 1e-5)

        for impl, fn in (("gptoss_ext", ours), ("torch reference (eager)", reference),
                         ("torch add + F.rms_norm", torch_rms)):
            ms, p10, p90, mode = time_cuda(fn, n)
            rows.append(Row("rms_norm", case, impl, ms, p10, p90, bytes=nbytes, timing=mode,
                            launches=count_launches(lambda: fn(0)), target=target if impl == "gptoss_ext" else ""))
    return rows


def bench_rope(l2: int) -> list[Row]:
    rows = []
    inv, conc = ops.rope_tables(torch.device("cuda"), D)
    for T in (1, 64, 4096):
        nbytes = 2 * T * (HQ + HKV) * D * 2              # read and write q and k
        n = rotation_count(nbytes * 10 // 8, l2)
        qkvs = [torch.randn(T, (HQ + 2 * HKV) * D, device="cuda").bfloat16() for _ in range(n)]
        pos = torch.arange(1000, 1000 + T, device="cuda")
        qs = [x[:, :HQ * D].view(T, HQ, D) for x in qkvs]
        ks = [x[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D) for x in qkvs]
        case = f"T={T} 64+8 heads"
        target = ">=80% copy BW" if T == 4096 else ("1 launch" if T == 1 else "")

        def ours(i):
            torch.ops.gptoss_ext.rope_(qs[i], ks[i], pos, inv, conc)

        def reference(i):
            with ops.reference_mode():
                cos, sin = ref.rope_cos_sin(pos, D)
                ref.apply_rope(qs[i], cos, sin)
                ref.apply_rope(ks[i], cos, sin)

        table = ref.rope_cos_sin(torch.arange(0, 8192, device="cuda"), D)

        def torch_table(i):   # a peer with a cached cos/sin table, torch eager ops
            c, s = table[0][pos].unsqueeze(1), table[1][pos].unsqueeze(1)
            for x in (qs[i], ks[i]):
                x1, x2 = x.float().chunk(2, -1)
                x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1))

        for impl, fn in (("gptoss_ext", ours), ("torch reference (eager)", reference),
                         ("torch eager, cached table", torch_table)):
            # the reference forms its angles on the host in fp64: not capturable in a graph
            ms, p10, p90, mode = time_cuda(fn, n, graph=fn is not reference)
            rows.append(Row("rope", case, impl, ms, p10, p90, bytes=nbytes, timing=mode,
                            launches=count_launches(lambda: fn(0)), target=target if impl == "gptoss_ext" else ""))
    return rows


def bench_linear(l2: int) -> list[Row]:
    """Decode projections (1 row): the skinny kernel against cuBLAS (F.linear)."""
    rows = []
    for name, N, K in (("qkv 2880->5120", 5120, 2880), ("out 4096->2880", 2880, 4096), ("gate 2880->32", 32, 2880)):
        nbytes = N * K * 2
        n = rotation_count(nbytes, l2)
        ws = [torch.randn(N, K, device="cuda").bfloat16() for _ in range(n)]
        b = torch.randn(N, device="cuda").bfloat16()
        x = torch.randn(1, K, device="cuda").bfloat16()
        out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
        for impl, fn in (("gptoss_ext linear_skinny", lambda i: torch.ops.gptoss_ext.linear_skinny(x, ws[i], b, out)),
                         ("cuBLAS (F.linear)", lambda i: torch.nn.functional.linear(x, ws[i], b))):
            ms, p10, p90, mode = time_cuda(fn, n)
            rows.append(Row("linear", f"M=1 {name}", impl, ms, p10, p90, bytes=nbytes, timing=mode,
                            target=">=80% copy BW" if impl.startswith("gptoss") and N > 32 else ""))
    return rows


def run(l2: int) -> list[Row]:
    return bench_rmsnorm(l2) + bench_rope(l2) + bench_linear(l2)
