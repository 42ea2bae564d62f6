"""The kernels' MXFP4 layout: a round trip, and a CPU emulation of exactly what the mma kernel
does with it (bit-trick fp16 decode of each lane's fragments, per-group scales on the partial
sums) must equal the plain dequantised matmul."""

import numpy as np
import pytest
import torch

from gptoss_ext import reference as ref
from gptoss_ext.mxfp4 import KernelMXFP4, expert_from_kernel_layout, expert_to_kernel_layout
from gptoss_ext.synthetic import random_mxfp4


def rand_expert(R, C, seed):
    return random_mxfp4((R,), C, seed=seed, scale_bytes=(112, 130))


@pytest.mark.parametrize("R,C,swiglu", [(32, 128, True), (48, 64, False), (64, 192, True)])
def test_round_trip(R, C, swiglu):
    b, s = rand_expert(R, C, R + C)
    codes, ks = expert_to_kernel_layout(b, s, swiglu)
    assert codes.shape == (R // 16, C // 64, 32, 16) and ks.shape == (R // 16, C // 64, 8, 4)
    assert codes.numel() + ks.numel() == b.numel() + s.numel()       # still 4.25 bits a weight
    b2, s2 = expert_from_kernel_layout(codes, ks, swiglu)
    assert torch.equal(b, b2) and torch.equal(s, s2)


def emulate_kernel(codes, ks, x):
    """x [C] -> y [R] (kernel row order) the way one warp per 16-row tile computes it."""
    codes = codes.numpy().view(np.uint32).reshape(codes.shape[0], codes.shape[1], 32, 4)
    ks = ks.numpy()
    T, Cc = codes.shape[:2]
    y = np.zeros(16 * T)
    for t in range(T):
        for L in range(32):
            g, q = L // 4, L % 4
            acc = np.zeros(2)                                      # rows g, g + 8 (token 0 only)
            for c in range(Cc):
                for grp in range(2):
                    part = np.zeros(2)
                    for s in (2 * grp, 2 * grp + 1):
                        w = int(codes[t, c, L, s])
                        regs = (((w << 9) & 0x0E000E00) | ((w << 2) & 0x80008000),   # the kernel's decode
                                ((w << 6) & 0x0E000E00) | ((w << 1) & 0x80008000),
                                (w << 3) & 0x8E008E00,
                                w & 0x8E008E00)
                        for h in range(4):
                            bits = regs[h] & 0xFFFFFFFF
                            lo, hi = np.array([bits & 0xFFFF, bits >> 16], dtype=np.uint16).view(np.float16)
                            k = c * 64 + 16 * s + 2 * q + 8 * (h // 2)
                            # this lane's partial product for its rows (the mma sums over the 4 lanes of a row)
                            part[h % 2] += float(lo) * x[k] + float(hi) * x[k + 1]
                    sc = ks[t, c, g]
                    acc[0] += part[0] * 2.0 ** (int(sc[2 * grp]) - 127)       # the kernel's fp32 2^(s-127)
                    acc[1] += part[1] * 2.0 ** (int(sc[2 * grp + 1]) - 127)
            acc *= 2.0 ** 14                                                # and the final 2^14
            y[16 * t + g] += acc[0]
            y[16 * t + g + 8] += acc[1]
    return y


@pytest.mark.parametrize("swiglu", [True, False])
def test_kernel_emulation_matches_dequantized_matmul(swiglu):
    R, C = 32, 128
    b, s = rand_expert(R, C, 7)
    b[0, 0, :4] = torch.tensor([0x00, 0x18, 0x91, 0x88], dtype=torch.uint8)   # zeros, +-0.5 (subnormal), -0
    x = np.random.default_rng(0).standard_normal(C)
    codes, ks = expert_to_kernel_layout(b, s, swiglu)
    got = emulate_kernel(codes, ks, x)
    W = ref.mxfp4_dequantize(b, s).double().numpy()
    want = W @ x
    if swiglu:  # kernel row i of tile t is checkpoint row 2(8t+i) (gate) or 2(8t+i-8)+1 (linear)
        order = [2 * (8 * (r // 16) + r % 16) if r % 16 < 8 else 2 * (8 * (r // 16) + r % 16 - 8) + 1 for r in range(R)]
        want = want[order]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_kernel_weights_reference_view():
    b, s = random_mxfp4((3, 32), 64, seed=1, scale_bytes=(100, 140))
    k = KernelMXFP4.from_checkpoint(b, s, swiglu=True)
    assert k.shape == (32, 64) and k.num_experts == 3
    for e in range(3):
        b2, s2 = k.checkpoint_expert(e)
        assert torch.equal(b2, b[e]) and torch.equal(s2, s[e])


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match="columns % 64"):
        expert_to_kernel_layout(torch.zeros(16, 1, 16, dtype=torch.uint8), torch.zeros(16, 1, dtype=torch.uint8), False)
    with pytest.raises(TypeError, match="uint8"):
        expert_to_kernel_layout(torch.zeros(16, 2, 16), torch.zeros(16, 2, dtype=torch.uint8), False)
