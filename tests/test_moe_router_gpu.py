"""GPU tests of the MoE router (top-k + grouping: exact integer outputs, ties, empty experts) and its
fused forms (gate linear + router, residual add + RMSNorm + gate + router) in both gate forms."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import DEV

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("E", [32, 128, 256])
@pytest.mark.parametrize("T", [1, 2, 3, 8, 32])
def test_fused_gate_router_equals_linear_then_route(T, E):
    """One launch (gate linear + router) == ops.linear then ops.moe_router. Small-integer inputs make every
    logit an exact fp32 sum, so both paths see the same bf16 logits (ties included)."""
    g = torch.Generator(device=DEV).manual_seed(T * E)
    H = 2880
    x = torch.randint(-3, 4, (T, H), device=DEV, generator=g).bfloat16()
    w = (torch.randint(-3, 4, (E, H), device=DEV, generator=g) / 8).bfloat16()
    b = (torch.randint(-8, 9, (E,), device=DEV, generator=g) / 4).bfloat16()
    def fused():   # the op itself (ops.moe_gate_router takes it for 1-2 tokens; the kernel up to 32)
        ids = torch.empty(T, 4, dtype=torch.int32, device=DEV)
        wts = torch.empty(T, 4, device=DEV)
        counts = torch.empty(E, dtype=torch.int32, device=DEV)
        offs = torch.empty(E + 1, dtype=torch.int32, device=DEV)
        perm = torch.empty(T * 4, dtype=torch.int32, device=DEV)
        torch.ops.gptoss_ext.moe_gate_router(x, w, b, 4, ids, wts, counts, offs, perm, scratch)
        return wts, ids, counts, offs, perm

    scratch = torch.zeros(1 + T * E, dtype=torch.int32, device=DEV)
    got = fused()
    plain = ops.moe_router(ops.linear(x, w, b), 4)
    for a, c in zip(got, plain):
        assert torch.equal(a, c)
    assert scratch[0].item() == 0                             # the ticket was left clean
    assert all(torch.equal(a, c) for a, c in zip(fused(), got))
    if T <= 2:
        assert all(torch.equal(a, c) for a, c in zip(ops.moe_gate_router(x, w, b, 4), got))


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


def _sm90() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("form", ["cluster", "ticket", "plan"])
@pytest.mark.parametrize("H", [2880, 512])
@pytest.mark.parametrize("E", [32, 128])
@pytest.mark.parametrize("T", [1, 2])
def test_add_norm_gate_router_equals_add_rms_norm_then_gate_route(T, E, H, form):
    """One launch (residual add + RMSNorm + gate linear + router) == ops.add_rms_norm then
    ops.moe_gate_router, bit for bit (H = 2880: two vectors a thread in the norm, 512: one), with
    the logits handed to the router CTA through a thread-block cluster (sm_90) or the atomic ticket
    (any GPU), and in the form the plan picks."""
    if form == "cluster" and not _sm90():
        pytest.skip("the cluster form needs an sm_90 GPU")
    g = torch.Generator(device=DEV).manual_seed(T * E + H)
    x = torch.randn(T, H, device=DEV, generator=g).bfloat16()
    r = (4 * torch.randn(T, H, device=DEV, generator=g)).bfloat16()
    scale = (1 + 0.2 * torch.randn(H, device=DEV, generator=g)).bfloat16()
    w = (0.05 * torch.randn(E, H, device=DEV, generator=g)).bfloat16()
    b = (0.1 * torch.randn(E, device=DEV, generator=g)).bfloat16()
    t, r2, routing = ops.moe_add_norm_gate_router(x, r, scale, 1e-5, w, b, 4, form=form)
    t_ref, r_ref = ops.add_rms_norm(x, r, scale, 1e-5)
    assert torch.equal(t, t_ref) and torch.equal(r2, r_ref)
    for a, c in zip(routing, ops.moe_router(ops.linear(t_ref, w, b), 4)):
        assert torch.equal(a, c)
    assert all(torch.equal(a, c) for a, c in zip(ops.moe_add_norm_gate_router(x, r, scale, 1e-5, w, b, 4)[2], routing))


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
    w, ids, counts, offsets, perm = ops.moe_router(logits, 4)
    rw, rids = ref.route(logits.float(), 4)
    rc, ro, rp = ref.group_by_expert(rids, E)
    assert torch.equal(ids.long(), rids)
    assert torch.allclose(w, rw, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, rc) and torch.equal(offsets, ro) and torch.equal(perm, rp)
    again = ops.moe_router(logits, 4)
    assert all(torch.equal(a, b) for a, b in zip(again, (w, ids, counts, offsets, perm)))   # deterministic


def test_router_all_tokens_one_expert_set_and_empty_experts():
    E, T = 32, 300
    logits = torch.randn(T, E, device=DEV)
    logits[:, [3, 5, 7, 9]] += 100
    w, ids, counts, offsets, perm = ops.moe_router(logits, 4)
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


def test_gate_router_form_that_cannot_serve_is_an_error():
    """A named form that cannot serve the call fails with the reason (no silent switch of form)."""
    T, H, E = 1, 2880, 256
    x = torch.zeros(T, H, device=DEV, dtype=torch.bfloat16)
    w = torch.zeros(E, H, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="moe_gate_router: form 1 cannot serve 1 tokens and 256 experts"):
        ops.moe_gate_router(x, w, None, 4, form="cluster")
    with pytest.raises(KeyError):
        ops.moe_gate_router(x, w, None, 4, form="fast")
    routing = ops.moe_gate_router(x, w, None, 4, form="ticket")        # any GPU, any shape
    assert routing[3][-1].item() == 4
