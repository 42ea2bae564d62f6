"""Helpers shared by the GPU tests: error measures, poisoned outputs, random MoE experts, greedy
tokens compared up to near-ties."""

import contextlib

import torch

from gptoss_ext import ops

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


def greedy_margins(model, prompt, new):
    """For each generated token: (max logit - the token's logit, top-1 minus top-2 gap, the smallest
    router gap over the layers: k-th minus (k+1)-th expert logit at the position that predicts it)
    from a whole-sequence forward of prompt + new (teacher forcing)."""
    router_gaps = []
    route = ops.moe_router

    def spy(logits, k):
        top = logits.float().topk(k + 1, dim=-1).values
        router_gaps.append(top[:, k - 1] - top[:, k])
        return route(logits, k)

    ops.moe_router = spy
    try:
        logits = model(torch.tensor(prompt + new, device=DEV))[len(prompt) - 1:-1].float()
    finally:
        ops.moe_router = route
    assert len(router_gaps) == model.config.num_hidden_layers
    rgap = torch.stack(router_gaps).min(0).values[len(prompt) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    chosen = logits.gather(1, torch.tensor(new, device=DEV)[:, None])[:, 0]
    return (top2[:, 0] - chosen).tolist(), (top2[:, 0] - top2[:, 1]).tolist(), rgap.tolist()


class Fp32Unembedding(torch.nn.Module):
    """The unembedding in fp32 (test instrument): bf16 logits are quantised to 0.0625 at |logit| in
    [8, 16), coarser than the kernel noise the batch test measures."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight32 = weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight32.T


@contextlib.contextmanager
def fp32_logits(model):
    saved = model.unembedding
    model.release_decode_state()               # graphs captured with the bf16 unembedding
    model.unembedding = Fp32Unembedding(saved.weight)
    try:
        yield model
    finally:
        model.unembedding = saved
        model.release_decode_state()


def assert_same_up_to_near_ties(model, prompt, a, b, tol=0.05, router_tol=0.01):
    """Two greedy continuations of prompt by paths with other kernel tilings: each is greedy under a
    whole-sequence forward at every step that is not a router near-tie (within tol), and where they
    first differ is a near-tie (a top-2 logit gap under 2 tol or a router gap under router_tol)."""
    for seq in (a, b):
        off, _, rgaps = greedy_margins(model, prompt, seq)
        bad = [(i, o, r) for i, (o, r) in enumerate(zip(off, rgaps)) if o > tol and r >= router_tol]
        assert not bad, f"steps (index, off-greedy by, router gap) {bad}"
    _, gaps, rgaps = greedy_margins(model, prompt, b)
    d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if d is not None:
        assert gaps[d] < 2 * tol or rgaps[d] < router_tol, (d, gaps[d], rgaps[d])
