"""GPU tests of the fused residual RMSNorm and YaRN RoPE kernels against the reference ops:
fresh random inputs, poisoned outputs, awkward sizes, strided views, CUDA-graph capture and replay,
torch.library.opcheck, and argument errors."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref

pytestmark = pytest.mark.gpu
DEV = "cuda"


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in units of bf16 ulp of want (want in fp32/fp64)."""
    want = want.double()
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return ((got.double() - want).abs() / ulp).max().item()


def rope_close(got: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """got (bf16) vs the fp64 rotation of x: within one bf16 ulp of the result plus fp32 rounding of
    the operands (x1 c and x2 s can cancel, so the result alone sets no scale)."""
    xd = x.double()
    x1, x2 = xd.chunk(2, -1)
    c, s = cos[:, None, :].double(), sin[:, None, :].double()
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    scale = torch.cat(((x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()), -1)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return bool(((got.double() - want).abs() <= ulp * 0.5 + 4e-7 * scale).all())


def poisoned(shape, dtype=torch.bfloat16):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


# ---- add_rms_norm / rms_norm --------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 64, 257, 4096])
@pytest.mark.parametrize("H", [8, 256, 2880, 4104])
def test_add_rms_norm_matches_reference(T, H):
    g = torch.Generator(device=DEV).manual_seed(T * 7 + H)
    x = (torch.randn(T, H, device=DEV, generator=g) * 3).bfloat16()
    r = (torch.randn(T, H, device=DEV, generator=g) * 3).bfloat16()
    scale = (torch.rand(H, device=DEV, generator=g) + 0.5).bfloat16()
    out, res_out = poisoned((T, H)), poisoned((T, H))
    torch.ops.gptoss_ext.add_rms_norm(x, r, scale, 1e-5, out, res_out)
    want_r = (r.float() + x.float()).bfloat16()
    assert torch.equal(res_out, want_r)
    rf = want_r.double()
    want = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
    assert not out.isnan().any()
    assert bf16_ulps(out, want) <= 1.0
    # the ops.py face gives the same tensors
    o2, r2 = ops.add_rms_norm(x, r, scale, 1e-5)
    assert torch.equal(o2, out) and torch.equal(r2, res_out)


@pytest.mark.parametrize("T,H", [(1, 2880), (33, 256), (4096, 2880)])
def test_rms_norm_matches_reference(T, H):
    x = (torch.randn(T, H, device=DEV) * 5).bfloat16()
    scale = (torch.rand(H, device=DEV) + 0.5).bfloat16()
    out = poisoned((T, H))
    torch.ops.gptoss_ext.rms_norm(x, scale, 1e-5, out)
    xf = x.double()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
    assert bf16_ulps(out, want) <= 1.0
    assert torch.equal(ops.rms_norm(x, scale), out)
    with ops.reference_mode():
        assert bf16_ulps(ops.rms_norm(x, scale), want) <= 1.0


@pytest.mark.parametrize("T,k", [(1, 4), (7, 4), (300, 2)])
def test_moe_combine_fused_into_add_rms_norm(T, k):
    """residual + sum_j y[:, j] (fp32) rounded once, then the norm: equal to the fp32 reference
    rounded the same way, and within bf16 rounding of the unfused combine + add_rms_norm."""
    H = 2880
    g = torch.Generator(device=DEV).manual_seed(T)
    y = torch.randn(T, k, H, device=DEV, generator=g)
    res = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    scale = (1 + 0.1 * torch.randn(H, device=DEV, generator=g)).bfloat16()
    out, r = ops.add_rms_norm(y, res, scale, 1e-5)
    exact = res.double() + y.double().sum(1)                             # one rounding of the fp32 sum
    assert ((r.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    rf = r.double()
    want = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
    assert bf16_ulps(out, want) <= 1.0
    out2, r2 = ops.add_rms_norm(y.sum(1).bfloat16(), res, scale, 1e-5)        # the unfused path
    assert (r.float() - r2.float()).abs().max().item() <= 2 ** -6 * r2.float().abs().max().item()
    with pytest.raises(RuntimeError, match="moe_combine_add_rms_norm.*'y'"):
        torch.ops.gptoss_ext.moe_combine_add_rms_norm(y[:, :, :64], res, scale, 1e-5, out, r)


def test_rms_norm_errors_name_the_argument():
    x = torch.randn(4, 64, device=DEV).bfloat16()
    s = torch.ones(64, device=DEV).bfloat16()
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="'x' must be a CUDA tensor"):
        torch.ops.gptoss_ext.rms_norm(x.cpu(), s, 1e-5, out)
    with pytest.raises(RuntimeError, match="'scale' must have dtype BFloat16, got Float"):
        torch.ops.gptoss_ext.rms_norm(x, s.float(), 1e-5, out)
    with pytest.raises(RuntimeError, match=r"'scale' dim 0 must be 64 \(hidden size\), got shape \[32\]"):
        torch.ops.gptoss_ext.rms_norm(x, s[:32].contiguous(), 1e-5, out)
    with pytest.raises(RuntimeError, match="'x' must be contiguous"):
        torch.ops.gptoss_ext.rms_norm(torch.randn(64, 4, device=DEV).bfloat16().t(), s, 1e-5, out)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        y = torch.randn(4, 60, device=DEV).bfloat16()
        torch.ops.gptoss_ext.rms_norm(y, torch.ones(60, device=DEV).bfloat16(), 1e-5, torch.empty_like(y))
    with pytest.raises(RuntimeError, match="'residual_out' has shape"):
        torch.ops.gptoss_ext.add_rms_norm(x, x, s, 1e-5, out, torch.empty(3, 64, device=DEV).bfloat16())


# ---- RoPE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 129, 4096])
@pytest.mark.parametrize("start", [0, 1000, 131072 - 4096])
def test_rope_on_qkv_views_matches_reference(T, start):
    Hq, Hkv, D = 64, 8, 64
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEV).bfloat16()
    before = qkv.clone()
    q = qkv[:, :Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    pos = torch.arange(start, start + T, device=DEV)
    ops.rope(q, k, pos)
    cos, sin = ref.rope_cos_sin(pos, D)
    q0 = before[:, :Hq * D].view(T, Hq, D).float()
    k0 = before[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D).float()
    assert rope_close(q, q0, cos, sin) and rope_close(k, k0, cos, sin)
    assert torch.equal(qkv[:, (Hq + Hkv) * D:], before[:, (Hq + Hkv) * D:])  # v untouched


@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 1), (16, 2)])
def test_rope_contiguous_and_gqa_ratios(Hq, Hkv):
    T, D = 37, 64
    q = torch.randn(T, Hq, D, device=DEV).bfloat16()
    k = torch.randn(T, Hkv, D, device=DEV).bfloat16()
    pos = torch.randint(0, 131072, (T,), device=DEV)
    cos, sin = ref.rope_cos_sin(pos, D)
    q0, k0 = q.clone(), k.clone()
    ops.rope(q, k, pos)
    assert rope_close(q, q0, cos, sin) and rope_close(k, k0, cos, sin)
    # and the reference op (fp32 math, one bf16 rounding) meets the same bound
    assert rope_close(ref.apply_rope(q0, cos, sin), q0, cos, sin)


def test_rope_errors_name_the_argument():
    q = torch.randn(4, 8, 64, device=DEV).bfloat16()
    k = torch.randn(4, 2, 64, device=DEV).bfloat16()
    pos = torch.arange(4, device=DEV)
    inv = torch.ones(32, device=DEV, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="'positions' must have dtype Long, got Int"):
        torch.ops.gptoss_ext.rope_(q, k, pos.int(), inv, 1.0)
    with pytest.raises(RuntimeError, match=r"'k' dim 0 must be 4 \(tokens of q\)"):
        torch.ops.gptoss_ext.rope_(q, k[:3], pos, inv, 1.0)
    with pytest.raises(RuntimeError, match="'inv_freq' must have dtype Double"):
        torch.ops.gptoss_ext.rope_(q, k, pos, inv.float(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous heads"):
        torch.ops.gptoss_ext.rope_(q.transpose(0, 1), k, pos, inv, 1.0)


# ---- graphs and opcheck -------------------------------------------------------------------------

def test_cuda_graph_capture_and_replay_equals_eager():
    T, H, Hq, Hkv, D = 5, 2880, 64, 8, 64
    x = torch.randn(T, H, device=DEV).bfloat16()
    r = torch.randn(T, H, device=DEV).bfloat16()
    s = (torch.rand(H, device=DEV) + 0.5).bfloat16()
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, device=DEV).bfloat16()
    pos = torch.arange(T, device=DEV)

    def step():
        out, res = ops.add_rms_norm(x, r, s)
        q = qkv[:, :Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
        ops.rope(q, k, pos)
        return out, res

    qkv0 = qkv.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                      # warm-up (builds the inv_freq cache) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    qkv.copy_(qkv0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_res = step()
    for trial in range(3):
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
        fresh = torch.randn_like(qkv)
        pos.copy_(torch.arange(T, device=DEV) + 100 * trial)
        qkv.copy_(fresh)
        graph.replay()
        replayed_qkv = qkv.clone()
        qkv.copy_(fresh)
        e_out, e_res = step()
        torch.cuda.synchronize()
        assert torch.equal(g_out, e_out) and torch.equal(g_res, e_res) and torch.equal(replayed_qkv, qkv)


def test_opcheck():
    x = torch.randn(3, 64, device=DEV).bfloat16()
    r = torch.randn(3, 64, device=DEV).bfloat16()
    s = torch.ones(64, device=DEV).bfloat16()
    torch.library.opcheck(torch.ops.gptoss_ext.rms_norm.default, (x, s, 1e-5, torch.empty_like(x)))
    torch.library.opcheck(torch.ops.gptoss_ext.add_rms_norm.default,
                          (x, r, s, 1e-5, torch.empty_like(x), torch.empty_like(x)))
    q = torch.randn(3, 8, 64, device=DEV).bfloat16()
    k = torch.randn(3, 2, 64, device=DEV).bfloat16()
    inv, conc = ops._inv_freq(q.device, 64, 150000.0, 32.0, 4096, 1.0, 32.0)
    torch.library.opcheck(torch.ops.gptoss_ext.rope_.default, (q, k, torch.arange(3, device=DEV), inv, conc))


def test_float32_on_cuda_warns_and_uses_reference():
    ops._warned.clear()
    x = torch.randn(3, 64, device=DEV)
    s = torch.ones(64, device=DEV)
    with pytest.warns(RuntimeWarning, match="takes bfloat16"):
        out = ops.rms_norm(x, s)
    assert torch.allclose(out, ref.rms_norm(x, s))


def test_decode_prep_matches_torch():
    """One launch == seq_lens += active; positions = seq_lens - 1; slots = where(active, row0 + pos, -1)."""
    from gptoss_ext import ops

    B, L = 37, 1000
    g = torch.Generator(device="cuda").manual_seed(3)
    seq = torch.randint(1, L - 1, (B,), device="cuda", generator=g, dtype=torch.int32)
    act = (torch.rand(B, device="cuda", generator=g) > 0.3).int()
    row0 = torch.arange(B, device="cuda") * L
    pos, slots = torch.empty(B, dtype=torch.int64, device="cuda"), torch.empty(B, dtype=torch.int64, device="cuda")
    want_seq = seq + act
    want_pos = (want_seq - 1).long()
    want_slots = torch.where(act > 0, row0 + want_pos, torch.full_like(want_pos, -1))
    ops.decode_prep(seq, act, row0, pos, slots)
    assert torch.equal(seq, want_seq) and torch.equal(pos, want_pos) and torch.equal(slots, want_slots)
    with pytest.raises(RuntimeError, match="decode_prep: 'active'"):
        torch.ops.gptoss_ext.decode_prep(seq, act[:5], row0, pos, slots)
    with pytest.raises(RuntimeError, match="decode_prep: 'slots'"):
        torch.ops.gptoss_ext.decode_prep(seq, act, row0, pos, slots.int())
