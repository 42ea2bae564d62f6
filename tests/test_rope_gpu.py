"""GPU tests of the YaRN RoPE kernel (alone and with the KV-cache write) against the reference: strided
qkv views, GQA ratios, long positions, argument errors."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import D, DEV, make_cache, rand

pytestmark = pytest.mark.gpu


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


@pytest.mark.parametrize("T", [1, 20, 300])
def test_rope_kv_write_fused_equals_rope_then_kv_write(T):
    """One launch (rope_kv_) == rope_ then kv_write, bit for bit: q and k rotated in place, the
    rotated k and the untouched v in the cache rows of the slots, invalid slots skipped."""
    g = torch.Generator(device=DEV).manual_seed(T)
    B, L, Hkv = 3, 200, 8
    qkv = rand((T, (64 + 2 * Hkv) * D), g)
    pos = torch.randint(0, 100000, (T,), device=DEV, generator=g)
    slots = torch.randperm(B * L, device=DEV, generator=g)[:T]
    if T > 1:
        slots[0] = -1                                           # skipped
        slots[-1] = B * L + 7                                   # out of range: skipped
    kc, vc = make_cache(B, L, Hkv, g, poison=False)
    outs = []
    for fused in (True, False):
        buf, kc_, vc_ = qkv.clone(), kc.clone(), vc.clone()
        q = buf[:, :64 * D].view(T, 64, D)
        k = buf[:, 64 * D:(64 + Hkv) * D].view(T, Hkv, D)
        v = buf[:, (64 + Hkv) * D:].view(T, Hkv, D)
        if fused:
            ops.rope_kv_write(q, k, v, pos, kc_, vc_, slots)
        else:
            ops.rope(q, k, pos)
            ops.kv_write(k, v, kc_, vc_, slots)
        outs.append((buf, kc_, vc_))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][1], kc)                    # something was written


def test_rope_kv_write_rejects_bad_shapes():
    g = torch.Generator(device=DEV).manual_seed(0)
    T, Hkv = 4, 8
    qkv = rand((T, (64 + 2 * Hkv) * D), g)
    q = qkv[:, :64 * D].view(T, 64, D)
    k = qkv[:, 64 * D:(64 + Hkv) * D].view(T, Hkv, D)
    kc, vc = make_cache(2, 16, Hkv, g, poison=False)
    pos = torch.arange(T, device=DEV)
    with pytest.raises(RuntimeError, match="rope_kv_.*'v'"):
        ops.rope_kv_write(q, k, k[:, :4], pos, kc, vc, torch.arange(T, device=DEV))
    with pytest.raises(RuntimeError, match="rope_kv_.*slots"):
        ops.rope_kv_write(q, k, k, pos, kc, vc, torch.arange(T + 1, device=DEV))
