"""GPU tests of the MoE kernels (router, MXFP4 mlp1 + SwiGLU, mlp2 + combine) against the
reference MoE on the same MXFP4 weights (fp32), with the error budget set by a plain bf16 PyTorch
MoE on the same inputs."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gptoss_ext.mxfp4 import KernelMXFP4

pytestmark = pytest.mark.gpu
DEV = "cuda"
H = I = 2880


def experts(E, seed, H=H, I=I):
    g = torch.Generator(device=DEV).manual_seed(seed)
    b1 = torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, device=DEV, generator=g)
    s1 = torch.randint(118, 122, (E, 2 * I, H // 32), dtype=torch.uint8, device=DEV, generator=g)
    b2 = torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, device=DEV, generator=g)
    s2 = torch.randint(118, 122, (E, H, I // 32), dtype=torch.uint8, device=DEV, generator=g)
    bias1 = (torch.randn(E, 2 * I, device=DEV, generator=g) * 0.1).bfloat16()
    bias2 = (torch.randn(E, H, device=DEV, generator=g) * 0.1).bfloat16()
    gw = (torch.randn(E, H, device=DEV, generator=g) * H ** -0.5).bfloat16()
    gb = (torch.randn(E, device=DEV, generator=g) * 0.1).bfloat16()
    return dict(b1=b1, s1=s1, b2=b2, s2=s2, bias1=bias1, bias2=bias2, gw=gw, gb=gb,
                k1=KernelMXFP4.from_checkpoint(b1, s1, swiglu=True), k2=KernelMXFP4.from_checkpoint(b2, s2, swiglu=False))


_CACHE = {}


def get_experts(E):
    if E not in _CACHE:
        _CACHE.clear()
        _CACHE[E] = experts(E, seed=E)
    return _CACHE[E]


def bf16_moe(x, w, ids, weights):
    """A plain bf16 PyTorch MoE (weights dequantised to bf16, bf16 matmuls) for the error budget."""
    out = torch.zeros(x.shape[0], H, dtype=torch.bfloat16, device=DEV)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        W1 = ref.mxfp4_dequantize(w["b1"][e], w["s1"][e], torch.bfloat16)
        W2 = ref.mxfp4_dequantize(w["b2"][e], w["s2"][e], torch.bfloat16)
        u = x[tok] @ W1.T + w["bias1"][e]
        hh = ref.swiglu(u).bfloat16()
        y = hh @ W2.T + w["bias2"][e]
        out.index_add_(0, tok, (y * weights[tok, slot, None].bfloat16()))
    return out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- router ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("E", [32, 128, 256])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 32])
def test_fused_gate_router_equals_linear_then_route(T, E):
    """One launch (gate linear + router) == ops.linear then ops.route. Small-integer inputs make every
    logit an exact fp32 sum, so both paths see the same bf16 logits (ties included)."""
    g = torch.Generator(device=DEV).manual_seed(T * E)
    H = 2880
    x = torch.randint(-3, 4, (T, H), device=DEV, generator=g).bfloat16()
    w = (torch.randint(-3, 4, (E, H), device=DEV, generator=g) / 8).bfloat16()
    b = (torch.randint(-8, 9, (E,), device=DEV, generator=g) / 4).bfloat16()
    def fused():   # the op itself (ops.gate_route takes it up to 8 tokens; the kernel up to 32)
        ids = torch.empty(T, 4, dtype=torch.int32, device=DEV)
        wts = torch.empty(T, 4, device=DEV)
        counts = torch.empty(E, dtype=torch.int32, device=DEV)
        offs = torch.empty(E + 1, dtype=torch.int32, device=DEV)
        perm = torch.empty(T * 4, dtype=torch.int32, device=DEV)
        torch.ops.gptoss_ext.moe_gate_router(x, w, b, 4, ids, wts, counts, offs, perm, scratch)
        return wts, ids, counts, offs, perm

    scratch = torch.zeros(1 + T * E, dtype=torch.int32, device=DEV)
    got = fused()
    plain = ops.route(ops.linear(x, w, b), 4)
    for a, c in zip(got, plain):
        assert torch.equal(a, c)
    assert scratch[0].item() == 0                             # the ticket was left clean
    assert all(torch.equal(a, c) for a, c in zip(fused(), got))
    if T <= 2:
        assert all(torch.equal(a, c) for a, c in zip(ops.gate_route(x, w, b, 4), got))


def test_fused_gate_router_rejects_bad_input():
    x = torch.zeros(2, 2880, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(32, 2880, device=DEV, dtype=torch.bfloat16)
    ids = torch.empty(2, 4, dtype=torch.int32, device=DEV)
    wts = torch.empty(2, 4, device=DEV)
    counts, offs = torch.empty(32, dtype=torch.int32, device=DEV), torch.empty(33, dtype=torch.int32, device=DEV)
    perm, scratch = torch.empty(8, dtype=torch.int32, device=DEV), torch.zeros(1000, dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="moe_gate_router.*'weight'"):
        torch.ops.gptoss_ext.moe_gate_router(x, w[:, :64], None, 4, ids, wts, counts, offs, perm, scratch)
    with pytest.raises(RuntimeError, match="moe_gate_router.*'scratch' needs"):
        torch.ops.gptoss_ext.moe_gate_router(x, w, None, 4, ids, wts, counts, offs, perm, scratch[:10])
    with pytest.raises(RuntimeError, match="moe_gate_router: takes 1 to 32 tokens"):
        torch.ops.gptoss_ext.moe_gate_router(torch.zeros(33, 2880, device=DEV, dtype=torch.bfloat16), w, None, 4,
                                             ids, wts, counts, offs, perm, scratch)


@pytest.mark.parametrize("cluster", ["1", "0"])
@pytest.mark.parametrize("H", [2880, 512])
@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("T", [1, 2])
def test_add_norm_gate_router_equals_add_rms_norm_then_gate_route(T, E, H, cluster, monkeypatch):
    """One launch (residual add + RMSNorm + gate linear + router) == ops.add_rms_norm then
    ops.gate_route, bit for bit (H = 2880: two vectors a thread in the norm, 512: one), with the
    logits handed to the router CTA through a thread-block cluster (sm_90) or the atomic ticket
    (GPTOSS_GATE_CLUSTER=0)."""
    monkeypatch.setenv("GPTOSS_GATE_CLUSTER", cluster)
    g = torch.Generator(device=DEV).manual_seed(T * E + H)
    x = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    r = (4 * torch.randn(T, H, device=DEV, generator=g)).bfloat16()
    scale = (1 + 0.2 * torch.randn(H, device=DEV, generator=g)).bfloat16()
    w = (0.05 * torch.randn(E, H, device=DEV, generator=g)).bfloat16()
    b = (0.1 * torch.randn(E, device=DEV, generator=g)).bfloat16()
    t, r2, routing = ops.add_rms_norm_route(x, r, scale, 1e-5, w, b, 4)
    t_ref, r_ref = ops.add_rms_norm(x, r, scale, 1e-5)
    assert torch.equal(t, t_ref) and torch.equal(r2, r_ref)
    for a, c in zip(routing, ops.gate_route(t_ref, w, b, 4)):
        assert torch.equal(a, c)
    assert all(torch.equal(a, c) for a, c in zip(ops.add_rms_norm_route(x, r, scale, 1e-5, w, b, 4)[2], routing))


def test_add_norm_gate_router_rejects_bad_input():
    T, H, E = 2, 2880, 32
    x = torch.zeros(T, H, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(E, H, device=DEV, dtype=torch.bfloat16)
    scale = torch.ones(H, device=DEV, dtype=torch.bfloat16)
    ids, wts = torch.empty(T, 4, dtype=torch.int32, device=DEV), torch.empty(T, 4, device=DEV)
    counts, offs = torch.empty(E, dtype=torch.int32, device=DEV), torch.empty(E + 1, dtype=torch.int32, device=DEV)
    perm, scratch = torch.empty(T * 4, dtype=torch.int32, device=DEV), torch.zeros(1000, dtype=torch.int32, device=DEV)
    op = torch.ops.gptoss_ext.moe_add_norm_gate_router

    def call(x=x, residual=x, scale=scale, out=None, residual_out=None, w=w):
        out = torch.empty_like(x) if out is None else out
        residual_out = torch.empty_like(x) if residual_out is None else residual_out
        op(x, residual, scale, 1e-5, out, residual_out, w, None, 4, ids, wts, counts, offs, perm, scratch)

    call()
    with pytest.raises(RuntimeError, match="moe_add_norm_gate_router: 'residual' has shape"):
        call(residual=x[:1])
    with pytest.raises(RuntimeError, match="moe_add_norm_gate_router: 'norm_scale' dim 0"):
        call(scale=scale[:64])
    with pytest.raises(RuntimeError, match="moe_add_norm_gate_router: 'out'"):
        call(out=torch.empty(T, H, device=DEV))
    with pytest.raises(RuntimeError, match="moe_add_norm_gate_router: takes 1 to 2 tokens, got 3"):
        big = torch.zeros(3, H, device=DEV, dtype=torch.bfloat16)
        call(x=big, residual=big)
    with pytest.raises(RuntimeError, match="moe_add_norm_gate_router.*'weight'"):
        call(w=w[:, :64])


@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("T", [1, 3, 8, 64, 257, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_router_exact(E, T, dtype):
    logits = torch.randn(T, E, device=DEV).to(dtype)
    if T >= 8:  # ties: many equal values (small integer set), resolved towards the lower id
        logits[: T // 2] = torch.randint(0, 4, (T // 2, E), device=DEV).to(dtype)
    w, ids, counts, offsets, perm = ops.route(logits, 4)
    rw, rids = ref.route(logits.float(), 4)
    rc, ro, rp = ref.group_by_expert(rids, E)
    assert torch.equal(ids.long(), rids)
    assert torch.allclose(w, rw, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, rc) and torch.equal(offsets, ro) and torch.equal(perm, rp)
    again = ops.route(logits, 4)
    assert all(torch.equal(a, b) for a, b in zip(again, (w, ids, counts, offsets, perm)))   # deterministic


def test_router_all_tokens_one_expert_set_and_empty_experts():
    E, T = 32, 300
    logits = torch.randn(T, E, device=DEV)
    logits[:, [3, 5, 7, 9]] += 100
    w, ids, counts, offsets, perm = ops.route(logits, 4)
    assert set(torch.nonzero(counts).flatten().tolist()) == {3, 5, 7, 9}
    assert counts[[3, 5, 7, 9]].tolist() == [T] * 4 and offsets[-1].item() == 4 * T
    rc, ro, rp = ref.group_by_expert(ref.route(logits, 4)[1], E)
    assert torch.equal(perm, rp)


def test_router_rejects_bad_input():
    x = torch.randn(4, 32, device=DEV)
    o = [torch.empty(16, dtype=torch.int32, device=DEV), torch.empty(16, device=DEV),
         torch.empty(32, dtype=torch.int32, device=DEV), torch.empty(33, dtype=torch.int32, device=DEV),
         torch.empty(16, dtype=torch.int32, device=DEV), torch.zeros(64, dtype=torch.int32, device=DEV)]
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.gptoss_ext.moe_router(x, 9, *o)
    with pytest.raises(RuntimeError, match="'logits' must be bfloat16 or float32"):
        torch.ops.gptoss_ext.moe_router(x.half(), 4, *o)
    with pytest.raises(RuntimeError, match="'offsets' must have 33 elements"):
        torch.ops.gptoss_ext.moe_router(x, 4, o[0], o[1], o[2], o[3][:30], o[4], o[5])
    with pytest.raises(RuntimeError, match="'scratch' needs 33"):
        torch.ops.gptoss_ext.moe_router(x, 4, *o[:5], o[5][:8])


# ---- the MoE block ---------------------------------------------------------------------------------

def run_moe(x, w, residual=None):
    return ops.moe(x, w["gw"], w["gb"], w["k1"], w["bias1"], w["k2"], w["bias2"], experts_per_token=4,
                   residual=residual)


@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("T", [1, 3, 8, 64, 257, 4096])
def test_moe_matches_reference(E, T):
    w = get_experts(E)
    x = torch.randn(T, H, device=DEV).bfloat16()
    out = run_moe(x, w)
    assert not out.isnan().any()
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"])
    weights, ids = ref.route(logits, 4)
    # The kernel path forms its own bf16 gate logits (a different summation order than cuBLAS's), so
    # at a near-tie between a token's 4th and 5th logit it may pick the other expert. Such tokens
    # (and only at a near-tie: within two bf16 steps) are checked with the kernel's routing.
    kw, kid = ops.gate_route(x, w["gw"], w["gb"], 4)[:2]
    flipped = (kid.sort(1).values != ids.int().sort(1).values).any(1)
    if flipped.any():
        top = logits.float().sort(1, descending=True).values
        step = torch.exp2(torch.floor(torch.log2(top[:, 3].abs().clamp_min(2 ** -100))) - 7)
        assert ((top[:, 3] - top[:, 4])[flipped] <= 2 * step[flipped]).all(), "routing differs away from a tie"
        print(f"E={E} T={T}: {int(flipped.sum())} token(s) routed differently at a near-tie")
        ids = torch.where(flipped[:, None], kid.long(), ids)
        weights = torch.where(flipped[:, None], kw, weights)
    want = ref.experts(x, weights, ids, (w["b1"], w["s1"]), w["bias1"], (w["b2"], w["s2"]), w["bias2"])
    budget = rel(bf16_moe(x, w, ids, weights), want)
    err = rel(out, want)
    print(f"E={E} T={T}: kernel rel err {err:.2e}, bf16 torch {budget:.2e}")
    assert err <= 2 * budget + 1e-4


@pytest.mark.parametrize("mlp", [1, 2])
def test_prefill_kernels_agree(mlp):
    """The scale-folding prefill kernel (max_scale <= 128) against the per-group-partials kernel
    (max_scale unknown) on the same routed pairs, and both against the fp32 reference."""
    w = get_experts(32)
    T, k = 1024, 4
    x = torch.randn(T, H, device=DEV).bfloat16()
    wts, ids, counts, offsets, perm = ops.route(torch.nn.functional.linear(x, w["gw"], w["gb"]), k)
    assert w["k1"].max_scale <= 128
    if mlp == 1:
        outs = []
        for ms in (w["k1"].max_scale, 255):
            h = torch.full((T * k, I), float("nan"), dtype=torch.bfloat16, device=DEV)
            torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, k, 1.702, 7.0,
                                          h, ms)
            outs.append(h)
        e = 5
        rows = perm[offsets[e]:offsets[e + 1]].long()
        u = x[rows // k].float() @ ref.mxfp4_dequantize(w["b1"][e], w["s1"][e]).T + w["bias1"][e].float()
        want = ref.swiglu(u)
    else:
        hh = (torch.randn(T * k, I, device=DEV) * 3).bfloat16()
        outs = []
        for ms in (w["k2"].max_scale, 255):
            y = torch.full((T * k, H), float("nan"), device=DEV)
            torch.ops.gptoss_ext.moe_mlp2(hh, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets,
                                          wts.view(-1), y, ms)
            outs.append(y)
        e = 5
        rows = perm[offsets[e]:offsets[e + 1]].long()
        want = (hh[rows].float() @ ref.mxfp4_dequantize(w["b2"][e], w["s2"][e]).T + w["bias2"][e].float()) \
            * wts.view(-1)[rows, None]
    assert not outs[0].isnan().any() and not outs[1].isnan().any()
    assert rel(outs[0][rows], want) < 1e-2 and rel(outs[1][rows], want) < 1e-2
    assert rel(outs[0], outs[1]) < 1e-2


def _sm90_wgmma():
    from gptoss_ext import _extension
    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
            and "moe_mxfp4_sm90" in (_extension.build_info() or {}).get("kernels", []))


@pytest.mark.skipif(not _sm90_wgmma(), reason="the wgmma prefill kernel needs an sm_90 GPU and a build with sm_90a")
@pytest.mark.parametrize("bn", ["64", "128", "256"])
@pytest.mark.parametrize("mlp", [1, 2])
def test_wgmma_prefill_matches_reference_and_mma(mlp, bn, monkeypatch):
    """The Hopper prefill kernel at each token tile, every routed pair against the fp32 reference and
    against the mma.sync prefill kernel (GPTOSS_MOE_PREFILL=mma). An uneven routing: experts with
    one token, with none, and with more than one tile."""
    w = get_experts(32)
    T, k = 700, 4
    x = (torch.randn(T, H, device=DEV) * 2).bfloat16()
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"]).float()
    logits[:, 6] -= 100                                     # expert 6: no tokens
    logits[:, 7] -= 100
    logits[0, 7] += 200                                     # expert 7: one token
    logits[: T // 2, 9] += 50                               # expert 9: 350 tokens
    wts, ids, counts, offsets, perm = ops.route(logits, k)
    assert counts[6] == 0 and counts[7] == 1 and counts[9] >= 350
    P = T * k
    if mlp == 1:
        inp = x
        want = torch.empty(P, I, device=DEV)
    else:
        inp = (torch.randn(P, I, device=DEV) * 3).bfloat16()
        want = torch.empty(P, H, device=DEV)
    kw, bias = (w["k1"], w["bias1"]) if mlp == 1 else (w["k2"], w["bias2"])
    b, s = (w["b1"], w["s1"]) if mlp == 1 else (w["b2"], w["s2"])
    for e in range(32):
        rows = perm[offsets[e]:offsets[e + 1]].long()
        if rows.numel() == 0:
            continue
        Wd = ref.mxfp4_dequantize(b[e], s[e])
        if mlp == 1:
            want[rows] = ref.swiglu(x[rows // k].float() @ Wd.T + bias[e].float())
        else:
            want[rows] = (inp[rows].float() @ Wd.T + bias[e].float()) * wts.view(-1)[rows, None]

    def run(env):
        for key in ("GPTOSS_MOE_PREFILL", "GPTOSS_MOE_WGMMA_BN"):
            monkeypatch.delenv(key, raising=False)
        for key, v in env.items():
            monkeypatch.setenv(key, v)
        if mlp == 1:
            o = torch.full((P, I), float("nan"), dtype=torch.bfloat16, device=DEV)
            torch.ops.gptoss_ext.moe_mlp1(x, kw.codes, kw.scales, bias, perm, offsets, k, 1.702, 7.0, o, kw.max_scale)
        else:
            o = torch.full((P, H), float("nan"), device=DEV)
            torch.ops.gptoss_ext.moe_mlp2(inp, kw.codes, kw.scales, bias, perm, offsets, wts.view(-1), o, kw.max_scale)
        torch.cuda.synchronize()
        return o

    wg = run({"GPTOSS_MOE_WGMMA_BN": bn})
    mm = run({"GPTOSS_MOE_PREFILL": "mma"})
    assert not wg.isnan().any()
    err_wg, err_mm = rel(wg, want), rel(mm, want)
    print(f"mlp{mlp} bn={bn}: wgmma rel err {err_wg:.2e}, mma.sync {err_mm:.2e}")
    assert err_wg < 5e-3 and err_wg <= 1.5 * err_mm + 1e-4
    # Both kernels multiply exact operands into fp32 sums in the same k order, so their outputs are
    # (nearly) the same bits; which one ran shows in the benchmarks' timings, not here.


def routed_reference(w, x, hin, perm, offsets, wts, k):
    """fp32 mlp1 (+ SwiGLU) of x and mlp2 (+ routing weight) of hin for every routed pair."""
    P = perm.numel()
    want1 = torch.empty(P, w["k1"].shape[0] // 2, device=DEV)
    want2 = torch.empty(P, w["k2"].shape[0], device=DEV)
    for e in range(offsets.numel() - 1):
        rows = perm[offsets[e]:offsets[e + 1]].long()
        if rows.numel() == 0:
            continue
        W1 = ref.mxfp4_dequantize(w["b1"][e], w["s1"][e])
        W2 = ref.mxfp4_dequantize(w["b2"][e], w["s2"][e])
        want1[rows] = ref.swiglu(x[rows // k].float() @ W1.T + w["bias1"][e].float())
        want2[rows] = (hin[rows].float() @ W2.T + w["bias2"][e].float()) * wts.view(-1)[rows, None]
    return want1, want2


def mlp1_then_mlp2(w, x, perm, offsets, wts, k, hin=None):
    """moe_mlp1 of x, then moe_mlp2 of hin (default: mlp1's output), into NaN-filled outputs."""
    P = perm.numel()
    h = torch.full((P, w["k1"].shape[0] // 2), float("nan"), dtype=torch.bfloat16, device=DEV)
    y = torch.full((P, w["k2"].shape[0]), float("nan"), device=DEV)
    torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, k, 1.702, 7.0, h,
                                  w["k1"].max_scale)
    torch.ops.gptoss_ext.moe_mlp2(h if hin is None else hin, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets,
                                  wts.view(-1), y, w["k2"].max_scale)
    torch.cuda.synchronize()
    return h, y


@pytest.mark.parametrize("variant", ["p", "q", "r", "h", "b"])
@pytest.mark.parametrize("T,E,HI", [(1, 32, 2880), (5, 32, 2880), (16, 32, 2880), (8, 128, 2880), (7, 8, 128)])
def test_decode_kernels_match_reference(variant, T, E, HI, monkeypatch):
    """The decode kernels (GPTOSS_MOE_DECODE: p/q/r the persistent one at 24/16/32 warps, h/b the
    grid-of-tiles one) on every routed pair against the fp32 reference, twice (the same bits: the
    split tiles are summed in a fixed order). Uneven routing: an expert with more than 8 pairs
    (several work items), one with a single pair, empty ones; (7, 8, 128) has fewer chunks a CTA
    than warps."""
    w = get_experts(E) if HI == H else experts(E, seed=11, H=HI, I=HI)
    k = 4
    x = (torch.randn(T, HI, device=DEV) * 2).bfloat16()
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"]).float()
    logits[:, 2] += 100                                          # expert 2: every token
    if T > 1:
        logits[:, 3] -= 100
        logits[0, 3] += 200                                      # expert 3: one token
    wts, ids, counts, offsets, perm = ops.route(logits, k)
    P = T * k
    hin = (torch.randn(P, HI, device=DEV) * 3).bfloat16()
    want1, want2 = routed_reference(w, x, hin, perm, offsets, wts, k)
    monkeypatch.setenv("GPTOSS_MOE_DECODE", variant)
    outs = []
    for _ in range(2):
        outs.append(mlp1_then_mlp2(w, x, perm, offsets, wts, k, hin))
    h, y = outs[0]
    assert not h.isnan().any() and not y.isnan().any()
    e1, e2 = rel(h, want1), rel(y, want2)
    print(f"decode {variant} T={T} E={E}: mlp1 rel err {e1:.2e}, mlp2 {e2:.2e}")
    assert e1 < 5e-3 and e2 < 5e-3
    assert torch.equal(outs[1][0], h) and torch.equal(outs[1][1], y)


@pytest.mark.parametrize("variant", ["p", "q", "r", "b", "h"])
@pytest.mark.parametrize("T,E,HI", [(1, 32, 2880), (8, 32, 2880), (8, 128, 2880), (7, 8, 128)])
def test_decode_fast_batches_same_bits(variant, T, E, HI, monkeypatch):
    """The decode kernels' branch-free path for full batches (persistent kernel: inside one tile;
    grid of tiles: before the slab's end; GPTOSS_MOE_FAST_BATCH=0 sends every batch through the
    per-chunk path instead): the same operations in the same order, so the same bits."""
    w = get_experts(E) if HI == H else experts(E, seed=11, H=HI, I=HI)
    k = 4
    x = (torch.randn(T, HI, device=DEV) * 2).bfloat16()
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"]).float()
    logits[:, 2] += 100
    wts, ids, counts, offsets, perm = ops.route(logits, k)
    hin = (torch.randn(T * k, HI, device=DEV) * 3).bfloat16()
    monkeypatch.setenv("GPTOSS_MOE_DECODE", variant)
    h_fast, y_fast = mlp1_then_mlp2(w, x, perm, offsets, wts, k, hin)
    monkeypatch.setenv("GPTOSS_MOE_FAST_BATCH", "0")
    h_slow, y_slow = mlp1_then_mlp2(w, x, perm, offsets, wts, k, hin)
    assert not h_fast.isnan().any() and not y_fast.isnan().any()
    assert torch.equal(h_fast, h_slow) and torch.equal(y_fast, y_slow)
    want1, want2 = routed_reference(w, x, hin, perm, offsets, wts, k)
    assert rel(h_fast, want1) < 5e-3 and rel(y_fast, want2) < 5e-3


@pytest.mark.parametrize("T,E,HI", [(1, 32, 2880), (2, 128, 2880), (8, 32, 2880), (16, 32, 2880), (7, 8, 128),
                                    (64, 32, 2880)])
def test_moe_experts_matches_reference(T, E, HI):
    """moe_experts (mlp1 then mlp2 in one op) on every routed pair against the fp32 reference; twice
    with the same bits, and the same bits as the two ops one after the other."""
    w = get_experts(E) if HI == H else experts(E, seed=11, H=HI, I=HI)
    k = 4
    x = (torch.randn(T, HI, device=DEV) * 2).bfloat16()
    logits = torch.nn.functional.linear(x, w["gw"], w["gb"]).float()
    logits[:, 2] += 100                                          # expert 2: every token
    wts, ids, counts, offsets, perm = ops.route(logits, k)
    P = T * k
    outs = []
    for _ in range(2):
        h = torch.full((P, HI), float("nan"), dtype=torch.bfloat16, device=DEV)
        y = torch.full((P, HI), float("nan"), device=DEV)
        torch.ops.gptoss_ext.moe_experts(x, w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes, w["k2"].scales,
                                         w["bias2"], perm, offsets, wts.view(-1), k, 1.702, 7.0, h, y,
                                         w["k1"].max_scale, w["k2"].max_scale)
        torch.cuda.synchronize()
        outs.append((h, y))
    h, y = outs[0]
    h2, y2 = mlp1_then_mlp2(w, x, perm, offsets, wts, k)
    want1, want2 = routed_reference(w, x, h, perm, offsets, wts, k)
    assert not h.isnan().any() and not y.isnan().any()
    e1, e2 = rel(h, want1), rel(y, want2)
    print(f"moe_experts T={T} E={E}: mlp1 rel err {e1:.2e}, mlp2 {e2:.2e}")
    assert e1 < 5e-3 and e2 < 5e-3
    assert torch.equal(outs[1][0], h) and torch.equal(outs[1][1], y)
    assert torch.equal(h2, h) and torch.equal(y2, y)


def test_moe_experts_errors_name_the_argument():
    w = experts(4, seed=2, H=128, I=64)
    x = torch.randn(2, 128, device=DEV).bfloat16()
    wts, ids, counts, offsets, perm = ops.route(torch.randn(2, 4, device=DEV), 2)
    h = torch.empty(4, 64, dtype=torch.bfloat16, device=DEV)
    y = torch.empty(4, 128, device=DEV)
    args = (x, w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets,
            wts.view(-1), 2, 1.702, 7.0)
    with pytest.raises(RuntimeError, match="moe_experts: 'h' dim 1 must be 64"):
        torch.ops.gptoss_ext.moe_experts(*args, torch.empty(4, 32, dtype=torch.bfloat16, device=DEV), y)
    with pytest.raises(RuntimeError, match="moe_experts: 'y' must be"):
        torch.ops.gptoss_ext.moe_experts(*args, h, torch.empty(4, 64, device=DEV))
    with pytest.raises(RuntimeError, match="moe_experts: 'scales2' must be"):
        torch.ops.gptoss_ext.moe_experts(*args[:5], w["k1"].scales, *args[6:], h, y)
    with pytest.raises(RuntimeError, match="moe_experts: 'bias1' dim 1 must be 128"):
        torch.ops.gptoss_ext.moe_experts(*args[:3], w["bias1"][:, :64].contiguous(), *args[4:], h, y)


def test_prefill_with_large_scales_uses_the_exact_kernel():
    """Scales above 128 (weights beyond fp16 when folded) take the per-group kernel: still right."""
    E, Hs = 4, 256
    g = torch.Generator(device=DEV).manual_seed(5)
    b1 = torch.randint(0, 256, (E, 2 * Hs, Hs // 32, 16), dtype=torch.uint8, device=DEV, generator=g)
    s1 = torch.randint(126, 134, (E, 2 * Hs, Hs // 32), dtype=torch.uint8, device=DEV, generator=g)
    k1 = KernelMXFP4.from_checkpoint(b1, s1, swiglu=True)
    assert k1.max_scale > 128
    T = 512
    x = (torch.randn(T, Hs, device=DEV) * 1e-3).bfloat16()
    wts, ids, counts, offsets, perm = ops.route(torch.randn(T, E, device=DEV), 4)
    bias = torch.zeros(E, 2 * Hs, dtype=torch.bfloat16, device=DEV)
    h = torch.empty(T * 4, Hs, dtype=torch.bfloat16, device=DEV)
    torch.ops.gptoss_ext.moe_mlp1(x, k1.codes, k1.scales, bias, perm, offsets, 4, 1.702, 7.0, h, k1.max_scale)
    e = 2
    rows = perm[offsets[e]:offsets[e + 1]].long()
    want = ref.swiglu(x[rows // 4].float() @ ref.mxfp4_dequantize(b1[e], s1[e]).T)
    assert rel(h[rows], want) < 1e-2


def test_moe_all_tokens_one_expert_set_and_clamp():
    w = get_experts(32)
    x = (torch.randn(300, H, device=DEV) * 8).bfloat16()        # large: the SwiGLU clamp engages
    w2 = dict(w, gb=w["gb"].clone())
    w2["gb"][[3, 5, 7, 9]] += 1000
    out = run_moe(x, w2)
    logits = torch.nn.functional.linear(x, w2["gw"], w2["gb"])
    weights, ids = ref.route(logits, 4)
    assert set(ids.flatten().tolist()) == {3, 5, 7, 9}
    u = x[:1].float() @ ref.mxfp4_dequantize(w["b1"][3], w["s1"][3]).T
    assert u.abs().max() > 7                                       # the clamp is exercised
    want = ref.experts(x, weights, ids, (w["b1"], w["s1"]), w["bias1"], (w["b2"], w["s2"]), w["bias2"])
    assert rel(out, want) <= 2 * rel(bf16_moe(x, w2, ids, weights), want) + 1e-4


def test_moe_residual_and_reference_mode():
    w = get_experts(32)
    g = torch.Generator(device=DEV).manual_seed(6)
    x = torch.randn(16, H, device=DEV, generator=g).bfloat16()
    r = torch.randn(16, H, device=DEV, generator=g).bfloat16()
    a = run_moe(x, w)
    b = run_moe(x, w, residual=r)
    assert rel(b, (a.float() + r.float())) < 1e-2
    with ops.reference_mode():
        c = run_moe(x, w)                                           # the reference reads the kernel layout too
    # The kernel path routes on bf16 logits (like a bf16 model), the reference on fp32 ones: compare
    # the tokens whose top-4 sets agree (a near-tie may send a token elsewhere).
    ids_bf16 = torch.topk(torch.nn.functional.linear(x, w["gw"], w["gb"]).float(), 4).indices.sort(-1).values
    ids_fp32 = ref.route(ref.router_logits(x, w["gw"], w["gb"]), 4)[1].sort(-1).values
    same = (ids_bf16 == ids_fp32).all(-1)
    assert same.sum() >= 12
    assert rel(a[same], c[same]) < 2e-2


def test_moe_cuda_graph_replay_equals_eager():
    w = get_experts(32)
    x = torch.randn(4, H, device=DEV).bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run_moe(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = run_moe(x, w)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(gout, run_moe(x, w))


def test_opcheck_moe_ops():
    E, T, k = 8, 3, 4
    w = experts(E, seed=1, H=128, I=64)
    x = torch.randn(T, 128, device=DEV).bfloat16()
    logits = torch.randn(T, E, device=DEV)
    ids = torch.empty(T, k, dtype=torch.int32, device=DEV)
    wts = torch.empty(T, k, device=DEV)
    counts = torch.empty(E, dtype=torch.int32, device=DEV)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=DEV)
    perm = torch.empty(T * k, dtype=torch.int32, device=DEV)
    scratch = torch.zeros(E + 1, dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.gptoss_ext.moe_router.default, (logits, k, ids, wts, counts, offsets, perm, scratch))
    # opcheck runs on copies: fill the routing tensors for the GEMM checks with a real routing
    wts, ids, counts, offsets, perm = ops.route(logits, k)
    h = torch.empty(T * k, 64, dtype=torch.bfloat16, device=DEV)
    torch.library.opcheck(torch.ops.gptoss_ext.moe_mlp1.default,
                          (x, w["k1"].codes, w["k1"].scales, w["bias1"], perm, offsets, k, 1.702, 7.0, h))
    y = torch.empty(T * k, 128, device=DEV)
    torch.library.opcheck(torch.ops.gptoss_ext.moe_mlp2.default,
                          (h, w["k2"].codes, w["k2"].scales, w["bias2"], perm, offsets, wts.view(-1), y))
    out = torch.empty(T, 128, dtype=torch.bfloat16, device=DEV)
    torch.library.opcheck(torch.ops.gptoss_ext.moe_combine.default, (y, None, k, out))
    torch.library.opcheck(torch.ops.gptoss_ext.moe_experts.default,
                          (x, w["k1"].codes, w["k1"].scales, w["bias1"], w["k2"].codes, w["k2"].scales, w["bias2"],
                           perm, offsets, wts.view(-1), k, 1.702, 7.0, h, y))


def test_moe_small_model_shapes_match_reference():
    """The tiny preset's widths (256) through the whole block."""
    E, Hs = 8, 256
    w = experts(E, seed=3, H=Hs, I=Hs)
    x = torch.randn(7, Hs, device=DEV).bfloat16()
    out = ops.moe(x, w["gw"], w["gb"], w["k1"], w["bias1"], w["k2"], w["bias2"])
    want = ref.moe(x.float(), w["gw"], w["gb"], (w["b1"], w["s1"]), w["bias1"], (w["b2"], w["s2"]), w["bias2"])
    assert rel(out, want) < 2e-2


def test_mlp_errors_name_the_argument():
    w = experts(4, seed=2, H=128, I=64)
    x = torch.randn(2, 128, device=DEV).bfloat16()
    perm = torch.zeros(8, dtype=torch.int32, device=DEV)
    offs = torch.zeros(5, dtype=torch.int32, device=DEV)
    h = torch.empty(8, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(RuntimeError, match="kernel layout"):
        torch.ops.gptoss_ext.moe_mlp1(x, w["b1"], w["k1"].scales, w["bias1"], perm, offs, 4, 1.702, 7.0, h)
    with pytest.raises(RuntimeError, match=r"'x' dim 1 must be 128"):
        torch.ops.gptoss_ext.moe_mlp1(x[:, :64].contiguous(), w["k1"].codes, w["k1"].scales, w["bias1"], perm, offs,
                                      4, 1.702, 7.0, h)
    with pytest.raises(RuntimeError, match="'perm' must have 8 elements"):
        torch.ops.gptoss_ext.moe_mlp1(x, w["k1"].codes, w["k1"].scales, w["bias1"], perm[:5], offs, 4, 1.702, 7.0, h)
