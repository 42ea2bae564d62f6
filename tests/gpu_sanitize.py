"""Every kernel of the library once on small shapes, for compute-sanitizer (memcheck, racecheck,
synccheck): each expert kernel by name, each attention decode CTA shape, both router forms, both
prefill block heights. Run by bench/gpu_run.sh as

    compute-sanitizer --tool memcheck python tests/gpu_sanitize.py

It checks nothing itself beyond finishing (the pytest suite checks the values); it prints the kernels
it launched so the log shows the coverage."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gptoss_ext import ops  # noqa: E402
from gpu_helpers import DEV, random_experts  # noqa: E402

covered = []


def run(name, fn):
    fn()
    torch.cuda.synchronize()
    covered.append(name)


def main() -> int:
    g = torch.Generator(device=DEV).manual_seed(0)
    bf = lambda *s: torch.randn(*s, device=DEV, generator=g).bfloat16()   # noqa: E731
    # rms_norm
    x, r, s = bf(3, 2880), bf(3, 2880), bf(2880)
    run("rms_norm", lambda: ops.rms_norm(x, s))
    run("add_rms_norm", lambda: ops.add_rms_norm(x, r, s))
    # rope, kv_cache
    T, Hq, Hkv, D = 5, 64, 8, 64
    qkv = bf(T, (Hq + 2 * Hkv) * D)
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    pos = torch.arange(T, device=DEV)
    kc = torch.zeros(2, 300, Hkv, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([0, 1, 2, 300 + 3, -1], device=DEV)
    run("rope_", lambda: ops.rope(q, k, pos))
    run("rope_kv_", lambda: ops.rope_kv_write(q, k, v, pos, kc, vc, slots))
    run("kv_write", lambda: ops.kv_write(k, v, kc, vc, slots))
    # attention: prefill with both block heights (window / full), decode with every CTA shape
    kc.copy_(torch.randn_like(kc, dtype=torch.float32).bfloat16())
    vc.copy_(torch.randn_like(vc, dtype=torch.float32).bfloat16())
    sinks = torch.randn(Hq, device=DEV)
    qp = bf(150, Hq, D)
    for window in (0, 128):
        run(f"attention_prefill window={window}",
            lambda w=window: ops.attention_prefill(qp, kc, vc, sinks, [0, 70, 150], [10, 100], sliding_window=w))
    qd = bf(2, Hq, D)
    lens = torch.tensor([300, 77], dtype=torch.int32, device=DEV)
    out = torch.empty(2, Hq, D, device=DEV, dtype=torch.bfloat16)
    tickets = torch.zeros(64, dtype=torch.int32, device=DEV)
    for warps, chunk in ((1, 64), (1, 320), (4, 256), (4, 512), (8, 256), (8, 512)):
        S = -(-300 // chunk)
        ws_o = torch.empty(2, Hq, S, D, device=DEV)
        ws_ml = torch.empty(2, Hq, S, 2, device=DEV)
        run(f"attention_decode warps={warps} splits={S}",
            lambda w=warps, c=chunk, a=ws_o, b=ws_ml: torch.ops.gptoss_ext.attention_decode(
                qd, kc, vc, sinks, lens, 0, D ** -0.5, c, w, a, b, tickets, out, False))
    run("attention_decode window (plan)", lambda: ops.attention_decode(qd, kc, vc, sinks, lens, sliding_window=128))
    # the same kernels over a paged pool: 6 blocks of 128 rows, the sequences' blocks out of order
    # (a key tile of the decode crossing a block boundary; a window table whose first block is gone)
    kp = torch.randn(6 * 128, Hkv, D, device=DEV, generator=g).bfloat16()
    vp = torch.randn(6 * 128, Hkv, D, device=DEV, generator=g).bfloat16()
    table = torch.tensor([[4, 1, 5], [0, 3, 2]], dtype=torch.int32, device=DEV)
    wtable = torch.tensor([[-1, 1, 5], [0, 3, 2]], dtype=torch.int32, device=DEV)
    for window, tab in ((0, table), (128, wtable)):
        run(f"attention_prefill paged window={window}", lambda w=window, t=tab: ops.attention_prefill(
            qp, kp, vp, sinks, [0, 70, 150], [300, 100], sliding_window=w, max_q_len=80, block_table=t,
            block_size=128))
        run(f"attention_decode paged window={window}", lambda w=window, t=tab: ops.attention_decode(
            qd, kp, vp, sinks, lens, sliding_window=w, block_table=t, block_size=128))
    # linear
    for M in (1, 3, 8):
        xs, w = bf(M, 2880), bf(640, 2880)
        run(f"linear_skinny M={M}", lambda xs=xs, w=w: ops.linear(xs, w, None, weight_constant=True))
    wqkv, bqkv = bf((Hq + 2 * Hkv) * D, 2880), bf((Hq + 2 * Hkv) * D)
    run("linear_rope_kv", lambda: ops.linear_rope_kv(bf(2, 2880), wqkv, bqkv, pos[:2], kc, vc, slots[:2], Hq, Hkv))
    # moe_router: one CTA, several CTAs, the fused forms
    E = 32
    run("moe_router T=3", lambda: ops.moe_router(bf(3, E), 4))
    run("moe_router T=100", lambda: ops.moe_router(bf(100, E), 4))
    gw, gb = bf(E, 2880), bf(E)
    forms = ["ticket"] + (["cluster"] if torch.cuda.get_device_capability()[0] == 9 else [])
    for form in forms:
        run(f"moe_gate_router {form}", lambda f=form: ops.moe_gate_router(bf(2, 2880), gw, gb, 4, form=f))
        run(f"moe_add_norm_gate_router {form}",
            lambda f=form: ops.moe_add_norm_gate_router(bf(2, 2880), bf(2, 2880), s, 1e-5, gw, gb, 4, form=f))
    # moe_experts: every kernel that serves here, on a small and a batch routing; moe_combine
    w = random_experts(8, seed=1, H=256, I=256)
    wgmma = ops.moe_experts_plan(4096, 8, 512, 256, 128).startswith("prefill_wgmma")
    for Tm in (1, 3, 40):
        xm = bf(Tm, 256)
        routing = ops.moe_router(torch.randn(Tm, 8, device=DEV, generator=g), 4)
        for kernel in ops.moe_kernel_names():
            if kernel.startswith("prefill_wgmma") and not wgmma:
                continue
            run(f"moe_experts {kernel} T={Tm}", lambda k=kernel, xm=xm, rt=routing: ops.moe_experts(
                xm, rt, w["k1"], w["bias1"], w["k2"], w["bias2"], kernel=k))
        y = ops.moe_experts(xm, routing, w["k1"], w["bias1"], w["k2"], w["bias2"])
        run(f"moe_combine T={Tm}", lambda y=y: ops.moe_combine(y, None))
        run(f"moe_combine_add_rms_norm T={Tm}",
            lambda y=y, Tm=Tm: ops.moe_combine_add_rms_norm(y, bf(Tm, 256), bf(256)))
    print(f"gpu_sanitize: {len(covered)} launches finished: " + "; ".join(covered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
