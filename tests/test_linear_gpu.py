"""GPU tests of the skinny decode linear (1..8 rows) against fp32 and cuBLAS bf16, and of its use by
ops.linear."""

import pytest
import torch

from gptoss_ext import ops

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,K", [(5120, 2880), (2880, 4096), (32, 2880), (33, 64), (1, 8)])
def test_linear_skinny_matches_fp32(M, N, K):
    g = torch.Generator(device=DEV).manual_seed(M * N + K)
    x = torch.randn(M, K, device=DEV, generator=g).bfloat16()
    w = (torch.randn(N, K, device=DEV, generator=g) * K ** -0.5).bfloat16()
    b = torch.randn(N, device=DEV, generator=g).bfloat16()
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    torch.ops.gptoss_ext.linear_skinny(x, w, b, out)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    err = (out.double() - want).abs().max().item()
    err_cublas = (torch.nn.functional.linear(x, w, b).double() - want).abs().max().item()
    assert err <= 2 * err_cublas + 1e-6
    assert torch.equal(ops.linear(x, w, b), out)                      # ops.linear takes the kernel


def test_linear_skinny_strided_rows_no_bias_and_graph():
    g = torch.Generator(device=DEV).manual_seed(1)
    big = torch.randn(4, 3000, device=DEV, generator=g).bfloat16()
    x = big[:, :2880]                                                   # rows strided by 3000
    w = torch.randn(100, 2880, device=DEV, generator=g).bfloat16()
    out = ops.linear(x, w)
    assert (out.float() - torch.nn.functional.linear(x.float(), w.float())).abs().max() < 0.5
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gout = ops.linear(x, w)
    graph.replay()
    assert torch.equal(gout, out)


def test_linear_falls_to_cublas_beyond_8_rows():
    x = torch.randn(9, 64, device=DEV).bfloat16()
    w = torch.randn(16, 64, device=DEV).bfloat16()
    assert torch.equal(ops.linear(x, w), torch.nn.functional.linear(x, w))


def test_linear_skinny_errors():
    x = torch.randn(9, 64, device=DEV).bfloat16()
    w = torch.randn(16, 64, device=DEV).bfloat16()
    with pytest.raises(RuntimeError, match="takes 1 to 8 rows"):
        torch.ops.gptoss_ext.linear_skinny(x, w, None, torch.empty(9, 16, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(RuntimeError, match="'weight' dim 1 must be 64"):
        torch.ops.gptoss_ext.linear_skinny(x[:2], w[:, :32].contiguous(), None,
                                           torch.empty(2, 16, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(RuntimeError, match="'weight' must have dtype BFloat16"):
        torch.ops.gptoss_ext.linear_skinny(x[:2], w.float(), None, torch.empty(2, 16, dtype=torch.bfloat16, device=DEV))


@pytest.mark.parametrize("M", [1, 2, 5])
def test_linear_rope_kv_equals_linear_then_rope_kv_write(M):
    """The decode qkv projection with RoPE and the KV-cache write in its epilogue == ops.linear, then
    ops.rope_kv_write, bit for bit (q, k rotated in the output; k, v in the cache; a slot of -1 skipped)."""
    g = torch.Generator(device=DEV).manual_seed(M)
    Hq, Hkv, D, K, B, L = 64, 8, 64, 2880, 8, 300
    x = torch.randn(M, K, device=DEV, generator=g).bfloat16()
    w = (torch.randn((Hq + 2 * Hkv) * D, K, device=DEV, generator=g) * K ** -0.5).bfloat16()
    b = torch.randn(w.shape[0], device=DEV, generator=g).bfloat16()
    positions = torch.randint(0, 130000, (M,), device=DEV, generator=g)
    slots = torch.randperm(B * L, device=DEV, generator=g)[:M]
    if M > 1:
        slots[1] = -1                                                   # skipped, as rope_kv_ skips it
    rope = dict(theta=150000.0, factor=32.0, original_context=4096, ntk_alpha=1.0, ntk_beta=32.0)
    caches = [torch.randn(B, L, Hkv, D, device=DEV, generator=g).bfloat16() for _ in range(2)]
    kc1, vc1 = (c.clone() for c in caches)
    kc2, vc2 = (c.clone() for c in caches)
    fused = ops.linear_rope_kv(x, w, b, positions, kc1, vc1, slots, Hq, Hkv, weight_constant=True, **rope)
    qkv = ops.linear(x, w, b)
    q, k, v = qkv[:, :Hq * D].view(M, Hq, D), qkv[:, Hq * D:(Hq + Hkv) * D].view(M, Hkv, D), qkv[:, (Hq + Hkv) * D:]
    ops.rope_kv_write(q, k, v.view(M, Hkv, D), positions, kc2, vc2, slots, **rope)
    assert torch.equal(fused, qkv)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)
    assert not torch.equal(kc1, caches[0])                               # it did write


def test_linear_rope_kv_rejects_bad_input():
    x = torch.randn(1, 2880, device=DEV).bfloat16()
    w = torch.randn(80 * 64, 2880, device=DEV).bfloat16()
    out = torch.empty(1, 80 * 64, device=DEV, dtype=torch.bfloat16)
    kc = torch.zeros(1, 16, 8, 64, device=DEV, dtype=torch.bfloat16)
    pos, slots = torch.zeros(1, dtype=torch.long, device=DEV), torch.zeros(1, dtype=torch.long, device=DEV)
    inv = torch.ones(32, dtype=torch.float64, device=DEV)
    op = torch.ops.gptoss_ext.linear_rope_kv
    op(x, w, None, out, pos, inv, 1.0, slots, kc, kc.clone())
    with pytest.raises(RuntimeError, match="linear_rope_kv: weight rows \\(5120\\) must be \\(Hq \\+ 2 x 40\\)"):
        big = torch.zeros(1, 16, 40, 64, device=DEV, dtype=torch.bfloat16)
        op(x, w, None, out, pos, inv, 1.0, slots, big, big.clone())
    with pytest.raises(RuntimeError, match="linear_rope_kv: 'positions'"):
        op(x, w, None, out, pos.int(), inv, 1.0, slots, kc, kc.clone())
    with pytest.raises(RuntimeError, match="linear_rope_kv: 'inv_freq'"):
        op(x, w, None, out, pos, inv[:16], 1.0, slots, kc, kc.clone())
    with pytest.raises(RuntimeError, match="linear_rope_kv: 'slots'"):
        op(x, w, None, out, pos, inv, 1.0, slots[:0], kc, kc.clone())
    with pytest.raises(RuntimeError, match="linear_rope_kv: 'out'"):
        op(x, w, None, out[:, :64], pos, inv, 1.0, slots, kc, kc.clone())
