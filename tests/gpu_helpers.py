"""Helpers shared by the GPU tests: error measures, poisoned outputs, random MoE experts."""

import torch

from gptoss_ext.mxfp4 import KernelMXFP4
from gptoss_ext.synthetic import random_mxfp4

DEV = "cuda"
D = 64   # head_dim of the attention kernels


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in units of bf16 ulp of want (want in fp32/fp64)."""
    want = want.double()
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)
    return ((got.double() - want).abs() / ulp).max().item()


def rel(a, b):
    """Relative error ||a - b|| / ||b|| in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def poisoned(shape, dtype=torch.bfloat16):
    """An output buffer full of NaN: a kernel that leaves any of it unwritten fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def random_experts(E, seed, H=2880, I=2880, scale_bytes=(118, 122)):
    """E random MXFP4 experts of a MoE block [H -> 2I -> H] with biases and a gate, in both the
    checkpoint layout (b1, s1, b2, s2) and the kernels' (k1, k2), on the GPU."""
    b1, s1 = random_mxfp4((E, 2 * I), H, seed=seed, name="mlp1", device=DEV, scale_bytes=scale_bytes)
    b2, s2 = random_mxfp4((E, H), I, seed=seed, name="mlp2", device=DEV, scale_bytes=scale_bytes)
    g = torch.Generator(device=DEV).manual_seed(seed)
    bias1 = (torch.randn(E, 2 * I, device=DEV, generator=g) * 0.1).bfloat16()
    bias2 = (torch.randn(E, H, device=DEV, generator=g) * 0.1).bfloat16()
    gw = (torch.randn(E, H, device=DEV, generator=g) * H ** -0.5).bfloat16()
    gb = (torch.randn(E, device=DEV, generator=g) * 0.1).bfloat16()
    return dict(b1=b1, s1=s1, b2=b2, s2=s2, bias1=bias1, bias2=bias2, gw=gw, gb=gb,
                k1=KernelMXFP4.from_checkpoint(b1, s1, swiglu=True), k2=KernelMXFP4.from_checkpoint(b2, s2, swiglu=False))


def rand(shape, g, scale=1.0):
    return (torch.randn(shape, device=DEV, generator=g) * scale).bfloat16()


def make_cache(B, L, Hkv, g, poison=True):
    """A cache [B, L, Hkv, D]; with poison, NaN everywhere (rows the kernels must never read)."""
    if poison:
        kc = torch.full((B, L, Hkv, D), float("nan"), dtype=torch.bfloat16, device=DEV)
        return kc, kc.clone()
    return rand((B, L, Hkv, D), g), rand((B, L, Hkv, D), g)
