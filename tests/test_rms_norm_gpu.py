"""GPU tests of the fused residual add + RMSNorm kernel against the reference: fresh random inputs,
poisoned outputs, awkward sizes, opcheck, argument errors, the float32 fallback warning."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import DEV, bf16_ulps, poisoned

pytestmark = pytest.mark.gpu


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


def test_float32_on_cuda_warns_and_uses_reference():
    ops._warned.clear()
    x = torch.randn(3, 64, device=DEV)
    s = torch.ones(64, device=DEV)
    with pytest.warns(RuntimeWarning, match="takes bfloat16"):
        out = ops.rms_norm(x, s)
    assert torch.allclose(out, ref.rms_norm(x, s))
