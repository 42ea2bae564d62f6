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
