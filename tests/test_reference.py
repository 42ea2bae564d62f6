"""Each reference op against straightforward, independent math."""

import math

import pytest
import torch

from gptoss_ext import reference as ref
from gptoss_ext.synthetic import random_mxfp4


# ---- MXFP4 ----------------------------------------------------------------------------------

def fp4_from_bits(code: int) -> float:
    """E2M1 by its definition: sign | 2 exponent bits (bias 1) | 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    mag = (m * 0.5) if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return sign * mag


def test_fp4_table_matches_e2m1_definition():
    for code in range(16):
        assert ref.FP4_VALUES[code] == fp4_from_bits(code), code
    assert math.copysign(1, ref.FP4_VALUES[8]) == -1  # code 8 is -0


def test_mxfp4_dequantize_nibble_order_and_scale():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8, generator=g)
    out = ref.mxfp4_dequantize(blocks, scales)
    assert out.shape == (3, 5, 128)
    for idx in [(0, 0, 0), (2, 4, 3), (1, 2, 1)]:
        i, j, grp = idx
        for byte in range(16):
            b = int(blocks[i, j, grp, byte])
            s = 2.0 ** (int(scales[i, j, grp]) - 127)
            assert out[i, j, grp * 32 + 2 * byte].item() == fp4_from_bits(b & 15) * s      # low nibble first
            assert out[i, j, grp * 32 + 2 * byte + 1].item() == fp4_from_bits(b >> 4) * s  # then high


def test_mxfp4_rejects_bad_inputs():
    with pytest.raises(TypeError, match="uint8"):
        ref.mxfp4_dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shapes"):
        ref.mxfp4_dequantize(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))


# ---- RMSNorm ----------------------------------------------------------------------------------

def test_rms_norm_matches_formula():
    x = torch.randn(7, 96, dtype=torch.float64)
    scale = torch.rand(96, dtype=torch.float64) + 0.5
    want = torch.stack([row / math.sqrt(sum(v * v for v in row.tolist()) / 96 + 1e-5) for row in x]) * scale
    got = ref.rms_norm(x.float(), scale.float(), 1e-5)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def test_add_rms_norm_rounds_the_residual_like_an_unfused_model():
    x = torch.randn(5, 64).bfloat16()
    r = torch.randn(5, 64).bfloat16()
    scale = torch.rand(64).bfloat16() + 0.5
    normed, new_r = ref.add_rms_norm(x, r, scale)
    assert torch.equal(new_r, r + x)  # bf16 add rounds the same way
    assert torch.equal(normed, ref.rms_norm(r + x, scale))


# ---- YaRN RoPE ---------------------------------------------------------------------------------

def yarn_scalar(d: int, theta=150000.0, s=32.0, ctx=4096, alpha=1.0, beta=32.0, dim=64) -> float:
    """inv_d exactly as GPT-OSS.md writes it, one dim at a time."""
    f = theta ** (2 * d / dim)
    low = (dim / 2) * math.log(ctx / (beta * 2 * math.pi)) / math.log(theta)
    high = (dim / 2) * math.log(ctx / (alpha * 2 * math.pi)) / math.log(theta)
    r = min(max((d - low) / (high - low), 0.0), 1.0)
    return (1 / (s * f)) * r + (1 / f) * (1 - r)


def test_yarn_inv_freq_matches_sheet():
    inv, conc = ref.yarn_inv_freq(64)
    assert conc == pytest.approx(0.1 * math.log(32) + 1)
    for d in range(32):
        assert inv[d].item() == pytest.approx(yarn_scalar(d), rel=1e-12)
    # the fastest dims keep their frequency, the slowest are divided by the factor
    assert inv[0].item() == pytest.approx(1.0)
    assert inv[31].item() == pytest.approx(1 / (32 * 150000 ** (62 / 64)))


def test_yarn_matches_transformers():
    mru = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import GptOssConfig

    cfg = GptOssConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=256, num_attention_heads=8,
                       num_key_value_heads=2, num_local_experts=8)
    inv_hf, att = mru.ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    inv, conc = ref.yarn_inv_freq(64)
    assert att == pytest.approx(conc)
    assert torch.allclose(inv_hf.double(), inv, rtol=1e-6)


def test_apply_rope_is_a_complex_rotation():
    T, H, D = 6, 3, 64
    x = torch.randn(T, H, D)
    pos = torch.tensor([0, 1, 5, 100, 4097, 131071])
    cos, sin = ref.rope_cos_sin(pos, D)
    got = ref.apply_rope(x, cos, sin)
    inv, conc = ref.yarn_inv_freq(D)
    z = torch.complex(x[..., :32].double(), x[..., 32:].double())
    rot = z * torch.polar(torch.full((T, 32), conc, dtype=torch.float64), pos[:, None].double() * inv)[:, None, :]
    want = torch.cat([rot.real, rot.imag], dim=-1)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # norms grow by the concentration factor
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1) * conc, rtol=1e-5)


# ---- attention -------------------------------------------------------------------------------

def naive_attention(q, k, v, sinks, start, window):
    """Loops, float64, the sink as an explicit extra softmax column."""
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    out = torch.zeros(T, Hq, D, dtype=torch.float64)
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        for t in range(T):
            i = start + t
            keys = [j for j in range(S) if j <= i and (window == 0 or i - j < window)]
            logits = [float(q[t, h].double() @ k[j, kv].double()) / math.sqrt(D) for j in keys]
            logits.append(float(sinks[h]))
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            for w, j in zip(e[:-1], keys):
                out[t, h] += (w / z) * v[j, kv].double()
    return out


@pytest.mark.parametrize("T,start,window,Hq,Hkv", [(5, 0, 0, 4, 2), (6, 7, 0, 4, 1), (9, 3, 4, 4, 4), (12, 0, 5, 8, 2)])
def test_attention_matches_naive(T, start, window, Hq, Hkv):
    g = torch.Generator().manual_seed(T + start)
    D = 16
    S = start + T
    q, k, v = (torch.randn(n, h, D, generator=g) for n, h in ((T, Hq), (S, Hkv), (S, Hkv)))
    sinks = torch.randn(Hq, generator=g)
    got = ref.attention(q, k, v, sinks, start=start, sliding_window=window)
    want = naive_attention(q, k, v, sinks, start, window)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)


def test_attention_sinks_limits():
    T, H, D = 8, 2, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, H, D), torch.randn(T, H, D)
    no_sink = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)
    very_negative = ref.attention(q, k, v, torch.full((H,), -1e4))
    assert torch.allclose(very_negative, no_sink, atol=1e-6)
    large = ref.attention(q, k, v, torch.full((H,), 60.0))
    assert large.abs().max() < 1e-12 * 1e6  # all mass on the sink
    a = ref.attention(q, k, v, torch.tensor([0.0, 0.0]))
    b = ref.attention(q, k, v, torch.tensor([0.0, 2.0]))
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.allclose(a[:, 1], b[:, 1])


def test_attention_window_longer_than_sequence_is_full():
    q, k, v = torch.randn(10, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    s = torch.randn(2)
    assert torch.equal(ref.attention(q, k, v, s, sliding_window=128), ref.attention(q, k, v, s))
    assert not torch.allclose(ref.attention(q, k, v, s, sliding_window=3), ref.attention(q, k, v, s))


def test_attention_checks_key_coverage():
    with pytest.raises(ValueError, match="keys cover"):
        ref.attention(torch.randn(4, 2, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.zeros(2))


# ---- router ---------------------------------------------------------------------------------

def test_cache_attention_ops_on_cpu():
    """The varlen prefill / decode / kv_write ops (CPU path = reference) agree with per-sequence attention."""
    from gptoss_ext import ops

    g = torch.Generator().manual_seed(0)
    B, L, Hq, Hkv, D = 3, 40, 8, 2, 16
    kc, vc = torch.randn(B, L, Hkv, D, generator=g), torch.randn(B, L, Hkv, D, generator=g)
    sinks = torch.randn(Hq, generator=g)
    lens, starts = [5, 0, 12], [3, 7, 20]
    cu = [0, 5, 5, 17]
    q = torch.randn(17, Hq, D, generator=g)
    out = ops.attention_prefill(q, kc, vc, sinks, cu, starts, sliding_window=6)
    for b in (0, 2):
        want = ref.attention(q[cu[b]:cu[b + 1]], kc[b, :starts[b] + lens[b]], vc[b, :starts[b] + lens[b]], sinks,
                             start=starts[b], sliding_window=6)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], want)
    dec = ops.attention_decode(q[:3], kc, vc, sinks, [1, 40, 9])
    torch.testing.assert_close(dec[1:2], ref.attention(q[1:2], kc[1], vc[1], sinks, start=39))
    with pytest.raises(ValueError, match="do not fit the cache"):
        ops.attention_prefill(q, kc, vc, sinks, cu, [3, 7, 30])
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        ops.attention_prefill(q, kc, vc, sinks, [0, 5, 4, 17], starts)
    with pytest.raises(ValueError, match="seq_lens must be in"):
        ops.attention_decode(q[:3], kc, vc, sinks, [1, 41, 9])
    with pytest.raises(ValueError, match="q must be"):
        ops.attention_prefill(q[0], kc, vc, sinks, cu, starts)
    with pytest.raises(ValueError, match="does not fit the cache"):
        ops.attention_decode(q[:3, :3], kc, vc, sinks, [1, 2, 3])
    k, v = torch.randn(2, Hkv, D, generator=g), torch.randn(2, Hkv, D, generator=g)
    ops.kv_write(k, v, kc, vc, torch.tensor([L + 4, 2 * L - 1]))
    assert torch.equal(kc[1, 4], k[0]) and torch.equal(vc[1, L - 1], v[1])


def test_route_topk_softmax_and_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0, 3.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    w, ids = ref.route(logits, 4)
    assert ids.tolist() == [[1, 3, 5, 4], [0, 1, 2, 3]]  # ties go to the lower id
    e = [math.exp(x) for x in (3.0, 3.0, 3.0, 2.0)]
    assert w[0].tolist() == pytest.approx([x / sum(e) for x in e])
    assert w[1].tolist() == pytest.approx([0.25] * 4)


def test_group_by_expert():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    counts, offsets, perm = ref.group_by_expert(ids, 4)
    assert counts.tolist() == [2, 1, 3, 0]
    assert offsets.tolist() == [0, 2, 3, 6, 6]
    assert perm.tolist() == [1, 4, 3, 0, 2, 5]  # flat (token*k + slot), grouped by expert, stable


# ---- experts -------------------------------------------------------------------------------

def test_swiglu_clamps_and_interleaves():
    u = torch.tensor([[10.0, 10.0, -3.0, -10.0, 1.0, 0.5]])
    got = ref.swiglu(u, 1.702, 7.0)
    def one(g, l):
        g, l = min(g, 7.0), max(min(l, 7.0), -7.0)
        return g / (1 + math.exp(-1.702 * g)) * (l + 1)
    assert got[0].tolist() == pytest.approx([one(10, 10), one(-3, -10), one(1, 0.5)], rel=1e-6)


def test_moe_matches_per_token_loop():
    g = torch.Generator().manual_seed(3)
    T, H, I, E, k = 5, 64, 32, 6, 4
    x = torch.randn(T, H, generator=g)
    gw, gb = torch.randn(E, H, generator=g), torch.randn(E, generator=g)
    b1, s1 = random_mxfp4((E, 2 * I), H, seed=3, name="mlp1", scale_bytes=(120, 124))
    b2, s2 = random_mxfp4((E, H), I, seed=3, name="mlp2", scale_bytes=(120, 124))
    bias1, bias2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    got = ref.moe(x, gw, gb, (b1, s1), bias1, (b2, s2), bias2, experts_per_token=k)
    W1, W2 = ref.mxfp4_dequantize(b1, s1).double(), ref.mxfp4_dequantize(b2, s2).double()
    for t in range(T):
        logits = (gw.double() @ x[t].double() + gb.double()).tolist()
        top = sorted(range(E), key=lambda e: (-logits[e], e))[:k]
        z = sum(math.exp(logits[e] - logits[top[0]]) for e in top)
        y = torch.zeros(H, dtype=torch.float64)
        for e in top:
            u = W1[e] @ x[t].double() + bias1[e].double()
            gate, lin = u[0::2].clamp(max=7), u[1::2].clamp(-7, 7)
            h = gate * torch.sigmoid(1.702 * gate) * (lin + 1)
            y += math.exp(logits[e] - logits[top[0]]) / z * (W2[e] @ h + bias2[e].double())
        assert torch.allclose(got[t].double(), y, rtol=1e-4, atol=1e-4)
    # dense expert weights give the same result as their MXFP4 form
    dense = ref.moe(x, gw, gb, W1.float(), bias1, W2.float(), bias2, experts_per_token=k)
    assert torch.allclose(dense, got, rtol=1e-6, atol=1e-6)
