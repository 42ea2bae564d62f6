"""Plain-PyTorch version of every op: the oracle for the CUDA kernels and the CPU path.

Each op of `gptoss_ext.ops` that has a kernel has its reference here under the same name (the
roads: rms_norm, rope, kv_cache, attention, linear, moe_router, moe_experts, moe_combine).
Written for clarity, not speed. Every op computes in float32 (float64 where cheap and it matters,
e.g. RoPE angles) and returns the input's dtype, so on bf16 inputs the only error is the final
rounding. Shapes use T = tokens, H = hidden, E = experts, Hq / Hkv = query / key-value heads,
D = head_dim, S = key positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# FP4 E2M1 code -> value. Codes 8..15 are the negatives of 0..7 (8 is -0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127

# An expert weight is passed either as MXFP4 (blocks [E, rows, cols/32, 16] uint8, scales
# [E, rows, cols/32] uint8) tuple, or as a dense floating tensor [E, rows, cols].


# ---- rms_norm -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * scale, statistics in fp32."""
    xf = x.float()
    t = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (t * scale.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: r = residual + x (rounded to residual's dtype),
    returns (rms_norm(r) * scale, r). The norm sees the rounded r, as an unfused model would."""
    r = (residual.float() + x.float()).to(residual.dtype)
    return rms_norm(r, scale, eps), r


# ---- rope: YaRN rotary embedding ----------------------------------------------------------------

# gpt-oss's YaRN parameters: the one definition of the defaults (ModelConfig's rope fields, every
# rope function here and in ops take them from this dict).
ROPE_DEFAULTS = {"theta": 150000.0, "factor": 32.0, "original_context": 4096, "ntk_alpha": 1.0, "ntk_beta": 32.0}


def rope_params(**rope) -> dict:
    """ROPE_DEFAULTS with the given overrides; an unknown name is an error."""
    bad = sorted(set(rope) - set(ROPE_DEFAULTS))
    if bad:
        raise TypeError(f"unknown RoPE parameter(s) {bad}; known: {sorted(ROPE_DEFAULTS)}")
    return {**ROPE_DEFAULTS, **rope}


def yarn_inv_freq(head_dim: int, **rope) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies [head_dim/2] (float64) and the concentration factor.

    Dims faster than beta rotations per original context keep their frequency (extrapolation);
    dims slower than alpha rotations are divided by `factor` (interpolation); a linear ramp
    blends the ones between. cos/sin are then scaled by 0.1*ln(factor) + 1. `rope`: overrides
    of ROPE_DEFAULTS (theta, factor, original_context, ntk_alpha, ntk_beta)."""
    r = rope_params(**rope)
    theta, factor, original_context = r["theta"], r["factor"], r["original_context"]
    ntk_alpha, ntk_beta = r["ntk_alpha"], r["ntk_beta"]
    half = head_dim // 2
    freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if factor <= 1.0:
        return 1.0 / freq, 1.0
    concentration = 0.1 * math.log(factor) + 1.0
    low = half * math.log(original_context / (ntk_beta * 2 * math.pi)) / math.log(theta)
    high = half * math.log(original_context / (ntk_alpha * 2 * math.pi)) / math.log(theta)
    ramp = ((torch.arange(half, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = (1.0 / (factor * freq)) * ramp + (1.0 / freq) * (1 - ramp)
    return inv_freq, concentration


def rope_cos_sin(positions: torch.Tensor, head_dim: int, **rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim/2] float32 for integer positions [T], concentration included.
    Angles are formed in float64 so long positions stay exact."""
    inv_freq, conc = yarn_inv_freq(head_dim, **rope)
    angles = positions.to(torch.float64).reshape(-1, 1).cpu() * inv_freq
    cos = (angles.cos() * conc).to(torch.float32)
    sin = (angles.sin() * conc).to(torch.float32)
    return cos.to(positions.device), sin.to(positions.device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves: x [T, heads, D]; cos/sin [T, D/2]. x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, **rope_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """YaRN RoPE of q [T, Hq, D] and k [T, Hkv, D] at positions [T] (new tensors)."""
    cos, sin = rope_cos_sin(positions, q.shape[-1], **rope_kw)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rope_kv_write(q, k, v, positions, k_cache, v_cache, slots, **rope_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope` then `kv_write` of the rotated k and v; returns the rotated (q, k)."""
    q, k = rope(q, k, positions, **rope_kw)
    kv_write(k, v, k_cache, v_cache, slots)
    return q, k


# ---- attention ----------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, *,
              start: int = 0, sliding_window: int = 0, sm_scale: float | None = None,
              key_offset: int = 0) -> torch.Tensor:
    """Causal GQA attention with a learned sink logit per query head.

    q [T, Hq, D]: queries at positions start .. start+T-1.
    k, v [S, Hkv, D]: keys / values at positions key_offset .. key_offset+S-1 (they must reach
    position start + T - 1; later keys are masked; earlier positions, absent, are masked too).
    sinks [Hq]: the sink joins each softmax denominator and contributes no value (None: no sinks).
    sliding_window > 0: query i sees keys j with i - window < j <= i.
    Returns [T, Hq, D] in q's dtype.
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if key_offset + S < start + T:
        raise ValueError(f"keys cover positions up to {key_offset + S - 1} but queries reach position {start + T - 1}")
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    kf, vf = k.float(), v.float()
    sink = None if sinks is None else sinks.float().view(Hkv, G, 1, 1)
    kpos = key_offset + torch.arange(S, device=q.device)
    out = torch.empty(T, Hq, D, dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 24) // max(1, Hq * S))       # bound the [chunk, Hq, S] score tensor
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        qf = q[t0:t1].float().view(t1 - t0, Hkv, G, D)
        scores = torch.einsum("tkgd,skd->kgts", qf, kf) * scale          # [Hkv, G, t, S]
        qpos = start + torch.arange(t0, t1, device=q.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if sliding_window > 0:
            allowed &= (qpos[:, None] - kpos[None, :]) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sink is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            logits = torch.cat([scores, sink.expand(Hkv, G, t1 - t0, 1)], dim=-1)
            probs = torch.softmax(logits, dim=-1)[..., :-1]             # drop the sink column
        o = torch.einsum("kgts,skd->tkgd", probs, vf)
        out[t0:t1] = o.reshape(t1 - t0, Hq, D)
    return out.to(q.dtype)


def paged_rows(table_row, lo: int, end: int, block_size: int) -> list[int]:
    """Pool rows of positions [lo, end) of a sequence whose block table is table_row."""
    return [int(table_row[p // block_size]) * block_size + p % block_size for p in range(lo, end)]


def _keys(cache: torch.Tensor, b: int, lo: int, end: int, block_table, block_size: int | None) -> torch.Tensor:
    """Keys (or values) of sequence b at positions [lo, end): rows of batch row b of a contiguous
    cache [B, max_len, Hkv, D], or pool rows [rows, Hkv, D] through its block table."""
    if block_table is None:
        return cache[b, lo:end]
    return cache[torch.tensor(paged_rows(block_table[b], lo, end, block_size), device=cache.device)]


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                      cu_seqlens, starts, *, sliding_window: int = 0, sm_scale: float | None = None,
                      block_table=None, block_size: int | None = None) -> torch.Tensor:
    """Varlen prefill over a KV cache: sequence b's queries q[cu_seqlens[b]:cu_seqlens[b+1]] (at
    positions starts[b] ..) attend to its positions 0 .. starts[b] + q_len - 1 (within the window):
    rows of k_cache[b] / v_cache[b] ([B, max_len, Hkv, D]), or with block_table [B, max_blocks] the
    pool rows [rows, Hkv, D] of its blocks (`block_size` positions a block). Returns [Ttot, Hq, D]."""
    cu = [int(x) for x in cu_seqlens]
    st = [int(x) for x in starts]
    out = torch.zeros_like(q)
    for b, start in enumerate(st):
        t0, t1 = cu[b], cu[b + 1]
        if t1 > t0:
            end = start + t1 - t0
            lo = max(0, start - sliding_window + 1) if sliding_window > 0 else 0
            out[t0:t1] = attention(q[t0:t1], _keys(k_cache, b, lo, end, block_table, block_size),
                                   _keys(v_cache, b, lo, end, block_table, block_size), sinks, start=start,
                                   sliding_window=sliding_window, sm_scale=sm_scale, key_offset=lo)
    return out


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor,
                     seq_lens, *, sliding_window: int = 0, sm_scale: float | None = None,
                     block_table=None, block_size: int | None = None) -> torch.Tensor:
    """One query per sequence, q [B, Hq, D], at position seq_lens[b] - 1 over its positions
    0 .. seq_lens[b] - 1 (within the window; a length of 0 gives zeros), in a contiguous cache or a
    paged pool as attention_prefill reads them. Returns [B, Hq, D]."""
    out = torch.zeros_like(q)
    for b, n in enumerate(int(x) for x in seq_lens):
        if n > 0:
            lo = max(0, n - sliding_window) if sliding_window > 0 else 0
            out[b:b + 1] = attention(q[b:b + 1], _keys(k_cache, b, lo, n, block_table, block_size),
                                     _keys(v_cache, b, lo, n, block_table, block_size), sinks, start=n - 1,
                                     sliding_window=sliding_window, sm_scale=sm_scale, key_offset=lo)
    return out


# ---- kv_cache ----------------------------------------------------------------------------------

def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Cache rows slots[t] (= b * max_len + pos) of k_cache / v_cache [B, max_len, Hkv, D] <- k[t], v[t];
    slots outside the cache (e.g. -1 for an idle sequence) are skipped."""
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    slots = slots.to(k_cache.device).long()
    keep = (slots >= 0) & (slots < k_cache.shape[0] * k_cache.shape[1])
    kf, vf = k_cache.view(-1, Hkv, D), v_cache.view(-1, Hkv, D)
    kf.index_copy_(0, slots[keep], k[keep].to(k_cache.dtype))
    vf.index_copy_(0, slots[keep], v[keep].to(v_cache.dtype))


# ---- moe_router ---------------------------------------------------------------------------------

def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[T, H] x [E, H] + [E] -> [T, E] float32."""
    return F.linear(x.float(), weight.float(), bias.float())


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of logits [T, E] (descending; ties to the lower expert id) and the
    softmax over those k logits. Returns (weights [T, k] float32, ids [T, k] int64)."""
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    top, ids = order.values[:, :k], order.indices[:, :k]
    return torch.softmax(top, dim=-1), ids


def group_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a grouped GEMM needs from routing ids [T, k]:
    counts [E] (pairs per expert), offsets [E+1] (exclusive prefix sum), and perm [T*k]: the flat
    (token*k + slot) indices sorted by expert, ties kept in (token, slot) order. All int32."""
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    perm = torch.sort(flat, stable=True).indices
    return counts.int(), offsets.int(), perm.int()


def moe_router(logits: torch.Tensor, k: int):
    """Top-k routing of logits [T, E] and the grouping by expert, as the kernel returns it:
    (weights [T, k] fp32, ids [T, k] int32, counts [E], offsets [E + 1], perm [T * k]) int32."""
    weights, ids = route(logits, k)
    counts, offsets, perm = group_by_expert(ids, logits.shape[-1])
    return weights, ids.int(), counts, offsets, perm


def moe_gate_router(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int):
    """`moe_router` of the gate linear's logits (rounded to x's dtype, as a linear in that dtype gives them)."""
    return moe_router(linear(x, gate_weight, gate_bias), k)


def moe_add_norm_gate_router(x, residual, scale, eps, gate_weight, gate_bias, k):
    """`add_rms_norm` then `moe_gate_router` on its output: (normed, new residual, routing)."""
    t, r = add_rms_norm(x, residual, scale, eps)
    return t, r, moe_gate_router(t, gate_weight, gate_bias, k)


# ---- moe_experts: MXFP4 and the expert MLP --------------------------------------------------------

def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] uint8 (two FP4 E2M1 codes a byte, low nibble first) and scales
    [..., G] uint8 (E8M0, value 2^(s-127)) -> values [..., G*32]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).reshape(*blocks.shape[:-1], 32)
    scale = torch.exp2(scales.float() - E8M0_BIAS)
    return (vals * scale[..., None]).reshape(*blocks.shape[:-2], -1).to(dtype)


def expert_weight(weight, e: int) -> torch.Tensor:
    """Expert e's weight [rows, cols] in float32, from MXFP4 (blocks, scales), MXFP4 in the
    kernels' layout (anything with `checkpoint_expert(e)`), or dense [E, rows, cols]."""
    if isinstance(weight, tuple):
        blocks, scales = weight
        return mxfp4_dequantize(blocks[e], scales[e])
    if hasattr(weight, "checkpoint_expert"):
        return mxfp4_dequantize(*weight.checkpoint_expert(e))
    return weight[e].float()


def swiglu(u: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """u [..., 2I] with interleaved (gate, linear) columns -> [..., I]:
    g = min(gate, limit), l = clamp(linear, -limit, limit), g * sigmoid(alpha g) * (l + 1)."""
    gate, lin = u[..., 0::2], u[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, mlp1_weight, mlp1_bias: torch.Tensor,
                mlp2_weight, mlp2_bias: torch.Tensor, *, swiglu_alpha: float = 1.702,
                swiglu_limit: float = 7.0, combine: bool = True,
                experts: tuple[int, int] | None = None) -> torch.Tensor:
    """Each token's chosen experts' mlp2(swiglu(mlp1(x))) times its routing weight, summed over the
    token's experts (combine=False: uncombined, [T, k, H], as the kernels return them).
    x [T, H]; weights [T, k] float32; ids [T, k]; biases [E, 2I] and [E, H]. Returns float32 [T, H].
    Each used expert is dequantized once, transiently. experts: (first, count) when the weights
    and biases hold only experts first .. first + count - 1 (the pairs of others give zeros)."""
    T, H = x.shape
    first, n = experts if experts is not None else (0, None)
    y = torch.zeros(T, ids.shape[1], H, dtype=torch.float32, device=x.device) if not combine else None
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device) if combine else None
    xf = x.float()
    for g in torch.unique(ids).tolist():
        e = g - first                                                            # index into the held experts
        if e < 0 or (n is not None and e >= n):
            continue
        tok, slot = torch.nonzero(ids == g, as_tuple=True)
        u = xf[tok] @ expert_weight(mlp1_weight, e).T + mlp1_bias[e].float()     # [n, 2I]
        h = swiglu(u, swiglu_alpha, swiglu_limit)                                # [n, I]
        o = (h @ expert_weight(mlp2_weight, e).T + mlp2_bias[e].float()) * weights[tok, slot, None]   # [n, H]
        if combine:
            out.index_add_(0, tok, o)
        else:
            y[tok, slot] = o
    return out if combine else y


def moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, mlp1_weight,
        mlp1_bias: torch.Tensor, mlp2_weight, mlp2_bias: torch.Tensor, *, experts_per_token: int = 4,
        swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
        experts: tuple[int, int] | None = None) -> torch.Tensor:
    """The MoE block on normed activations x [T, H]: router, top-k softmax, experts (only the held
    ones when `experts` is given, see moe_experts). Returns x's dtype."""
    weights, ids = route(router_logits(x, gate_weight, gate_bias), experts_per_token)
    out = moe_experts(x, weights, ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias,
                      swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit, experts=experts)
    return out.to(x.dtype)


# ---- moe_combine --------------------------------------------------------------------------------

def moe_combine(y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's expert outputs summed: y [T, k, H] (fp32, already weighted) -> [T, H], plus
    residual when given, rounded once to the residual's dtype (bf16 without one)."""
    s = y.float().sum(1)
    if residual is None:
        return s.to(torch.bfloat16)
    return (residual.float() + s).to(residual.dtype)


def moe_combine_add_rms_norm(y: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """r = moe_combine(y, residual); returns (rms_norm(r) * scale, r)."""
    r = moe_combine(y, residual)
    return rms_norm(r, scale, eps), r


# ---- linear -------------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in x's dtype (PyTorch accumulates in fp32)."""
    return F.linear(x, weight, bias)


def linear_rope_kv(x, weight, bias, positions, k_cache, v_cache, slots, n_heads: int, n_kv_heads: int,
                   **rope_kw) -> torch.Tensor:
    """The fused qkv projection of decode: qkv = linear(x, weight, bias) [T, (Hq + 2 Hkv) D], its q
    and k heads rotated (in the returned tensor) and the rotated k and v written to cache rows slots."""
    T = x.shape[0]
    D = k_cache.shape[-1]
    qkv = linear(x, weight, bias)
    q = qkv[:, :n_heads * D].view(T, n_heads, D)
    k = qkv[:, n_heads * D:(n_heads + n_kv_heads) * D].view(T, n_kv_heads, D)
    v = qkv[:, (n_heads + n_kv_heads) * D:].view(T, n_kv_heads, D)
    q2, k2 = rope_kv_write(q, k, v, positions, k_cache, v_cache, slots, **rope_kw)
    q.copy_(q2)
    k.copy_(k2)
    return qkv
