"""GPU tests of the MoE combine: alone and fused into the next residual add + RMSNorm."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import DEV, bf16_ulps

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("T,k", [(1, 4), (7, 4), (300, 2)])
def test_moe_combine_fused_into_add_rms_norm(T, k):
    """residual + sum_j y[:, j] (fp32) rounded once, then the norm: equal to the fp32 reference
    rounded the same way, and within bf16 rounding of the unfused combine + add_rms_norm."""
    H = 2880
    g = torch.Generator(device=DEV).manual_seed(T)
    y = torch.randn(T, k, H, device=DEV, generator=g)
    res = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    scale = (1 + 0.1 * torch.randn(H, device=DEV, generator=g)).bfloat16()
    out, r = ops.moe_combine_add_rms_norm(y, res, scale, 1e-5)
    exact = res.double() + y.double().sum(1)                             # one rounding of the fp32 sum
    assert ((r.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    rf = r.double()
    want = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + 1e-5) * scale.double()
    assert bf16_ulps(out, want) <= 1.0
    out2, r2 = ops.add_rms_norm(y.sum(1).bfloat16(), res, scale, 1e-5)        # the unfused path
    assert (r.float() - r2.float()).abs().max().item() <= 2 ** -6 * r2.float().abs().max().item()
    with pytest.raises(RuntimeError, match="moe_combine_add_rms_norm.*'y'"):
        torch.ops.gptoss_ext.moe_combine_add_rms_norm(y[:, :, :64], res, scale, 1e-5, out, r)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("T,k,H", [(1, 4, 2880), (9, 4, 2880), (300, 2, 64)])
def test_moe_combine_matches_reference(T, k, H, with_residual):
    """The sum of each token's k rows (+ residual), rounded once to bf16: the reference's bits up to
    the order of the fp32 additions (one bf16 ulp)."""
    g = torch.Generator(device=DEV).manual_seed(T * k + H)
    y = torch.randn(T, k, H, device=DEV, generator=g)
    res = torch.randn(T, H, device=DEV, generator=g).bfloat16() if with_residual else None
    got = ops.moe_combine(y, res)
    assert got.dtype == torch.bfloat16 and got.shape == (T, H)
    exact = y.double().sum(1) + (res.double() if with_residual else 0)
    assert bf16_ulps(got, exact) <= 1.0
    assert bf16_ulps(got, ref.moe_combine(y, res).double()) <= 1.0
    with pytest.raises(RuntimeError, match="moe_combine: 'y' must be"):
        torch.ops.gptoss_ext.moe_combine(y.reshape(T * k, H)[:, :H - 4].contiguous(), res, k, got)
