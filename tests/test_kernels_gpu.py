"""GPU tests of what the kernels share: ops captured together in a CUDA graph replay as eager, every
out-variant op has a generated fake and passes opcheck, the kernels' limits come from the extension."""

import pytest
import torch

from gptoss_ext import ops
from gpu_helpers import DEV

pytestmark = pytest.mark.gpu


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
    inv, conc = ops.rope_tables(q.device, 64)
    torch.library.opcheck(torch.ops.gptoss_ext.rope_.default, (q, k, torch.arange(3, device=DEV), inv, conc))


def test_every_out_variant_op_has_a_generated_fake():
    """The fakes come from the schemas: every op that writes its outputs into arguments has one, so
    it traces (and a new op needs no hand-written entry)."""
    names = [n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("gptoss_ext::")]
    out_variants = [n for n in names if not getattr(torch.ops.gptoss_ext, n).default._schema.returns]
    assert len(out_variants) >= 15
    for n in out_variants:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gptoss_ext::{n}", "Meta"), n


def test_limits_come_from_the_extension():
    lim = ops.limits()
    assert lim["attention_head_dim"] == 64 and lim["moe_router_max_top_k"] == 8
    assert lim["moe_experts_max_experts"] == lim["moe_router_max_experts"] == 256
    assert lim["linear_skinny_max_rows"] == 8 and lim["moe_gate_router_max_hidden"] >= 2880
