"""The ops the model calls, and the Python face of the compiled kernels.

Each op here picks its implementation from its inputs:
  * CPU tensors: the plain-PyTorch reference (`gptoss_ext.reference`), always.
  * CUDA bf16 tensors with the kernels built: `torch.ops.gptoss_ext.*` (outputs allocated here).
  * CUDA tensors the kernels cannot serve (kernels not built, or float32): the reference, after a
    one-time RuntimeWarning that names the op and the reason. Never silently.
`reference_mode()` runs the reference on CUDA deliberately (for comparisons), without the warning.

The `torch.ops.gptoss_ext` ops are out-variants (they write into tensors given to them); their
fake implementations below let them trace and be captured in CUDA graphs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import torch

from . import _extension
from . import reference as ref

_local = threading.local()
_warned: set[str] = set()


@contextlib.contextmanager
def reference_mode():
    """Run every op through the reference implementation, on any device, inside this block."""
    prev = getattr(_local, "reference", False)
    _local.reference = True
    try:
        yield
    finally:
        _local.reference = prev


def kernels_available() -> bool:
    """The compiled kernels are loaded and a CUDA device is present."""
    return _extension.available()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(f"gptoss_ext: {msg}", RuntimeWarning, stacklevel=3)


def _use_kernel(op: str, t: torch.Tensor, dtypes=(torch.bfloat16,)) -> bool:
    """Whether `op` runs its kernel on t; when a CUDA tensor cannot, say why once."""
    if not t.is_cuda or getattr(_local, "reference", False):
        return False
    if not _extension.available():
        _warn_once(f"the CUDA kernels are not available ({_extension.load_error() or 'not built'}); '{op}' and "
                   "the other ops run the slow plain-PyTorch reference on the GPU (rebuild with "
                   "`pip install --no-build-isolation -e .` on a machine with nvcc)")
        return False
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        _warn_once(f"the '{op}' kernel takes {names}, got {t.dtype}; it runs the slow plain-PyTorch "
                   "reference on the GPU")
        return False
    return True


def _reference_on_cuda(op: str, t: torch.Tensor) -> None:
    """For ops that have no kernel yet: the reference runs, and CUDA callers are told once."""
    if t.is_cuda and not getattr(_local, "reference", False):
        _warn_once(f"no CUDA kernel for '{op}' yet; it runs the plain-PyTorch reference on the GPU")


# ---- linear (cuBLAS through torch) -------------------------------------------------------------

_SKINNY_MAX_WEIGHT = 64 << 20   # elements: beyond this (the unembedding) cuBLAS already streams at copy speed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_constant: bool = False) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T + bias [out]. On CUDA bf16 with 1..8 rows (decode) the skinny
    kernel (it streams the weight at ~copy speed where cuBLAS's split-K GEMV does not); else cuBLAS.
    weight_constant=True promises that no kernel of this library writes `weight` (model weights):
    the skinny kernel then starts loading it while the previous kernel finishes."""
    if (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2
            and 1 <= x.shape[0] <= 8 and x.shape[1] % 8 == 0 and x.shape[0] * x.shape[1] * 2 <= 96 * 1024
            and weight.is_contiguous() and weight.numel() <= _SKINNY_MAX_WEIGHT and x.stride(-1) == 1
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()))
            and not getattr(_local, "reference", False) and _extension.available()):
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        torch.ops.gptoss_ext.linear_skinny(x if x.stride(0) % 8 == 0 else x.contiguous(), weight, bias, out,
                                           weight_constant)
        return out
    return ref.linear(x, weight, bias)


def set_pdl(enabled: bool) -> bool:
    """Programmatic dependent launch for this library's kernels (Hopper; on by default, GPTOSS_PDL=0
    turns it off): each kernel may launch while the previous one finishes and waits on the device
    for its results. Returns the previous setting. Takes effect for later launches (and graphs
    captured later)."""
    if not _extension.available():
        return False
    return bool(torch.ops.gptoss_ext.set_pdl(bool(enabled)))


# ---- RMSNorm -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rms_norm(x) * scale over the last dim; x [T, H]."""
    if _use_kernel("rms_norm", x):
        out = torch.empty_like(x)
        torch.ops.gptoss_ext.rms_norm(x, scale, eps, out)
        return out
    return ref.rms_norm(x, scale, eps)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """r = residual + x; returns (rms_norm(r) * scale, r). x None: no add (r = residual).
    x may also be the MoE's uncombined fp32 outputs [T, k, H] (`moe(..., combine=False)`): then
    r = residual + x.sum(1), rounded once, and the combine costs no launch of its own."""
    if x is None:
        return rms_norm(residual, scale, eps), residual
    if x.dim() == 3:
        if x.is_cuda and _use_kernel("add_rms_norm", residual):
            out = torch.empty_like(residual)
            residual_out = torch.empty_like(residual)
            torch.ops.gptoss_ext.moe_combine_add_rms_norm(x, residual, scale, eps, out, residual_out)
            return out, residual_out
        r = (residual.float() + x.float().sum(1)).to(residual.dtype)
        return ref.rms_norm(r, scale, eps), r
    if _use_kernel("add_rms_norm", residual):
        out = torch.empty_like(residual)
        residual_out = torch.empty_like(residual)
        torch.ops.gptoss_ext.add_rms_norm(x, residual, scale, eps, out, residual_out)
        return out, residual_out
    return ref.add_rms_norm(x, residual, scale, eps)


# ---- RoPE --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _inv_freq(device: torch.device, head_dim: int, theta: float, factor: float, original_context: int,
              ntk_alpha: float, ntk_beta: float) -> tuple[torch.Tensor, float]:
    inv, conc = ref.yarn_inv_freq(head_dim, theta, factor, original_context, ntk_alpha, ntk_beta)
    return inv.to(device), conc


_ROPE_DEFAULTS = dict(theta=150000.0, factor=32.0, original_context=4096, ntk_alpha=1.0, ntk_beta=32.0)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, theta: float = 150000.0,
         factor: float = 32.0, original_context: int = 4096, ntk_alpha: float = 1.0,
         ntk_beta: float = 32.0) -> tuple[torch.Tensor, torch.Tensor]:
    """YaRN RoPE on q [T, Hq, D] and k [T, Hkv, D] at integer positions [T].
    The kernel path rotates q and k in place (they may be views of the fused qkv output)."""
    if _use_kernel("rope", q):
        inv, conc = _inv_freq(q.device, q.shape[-1], theta, factor, original_context, ntk_alpha, ntk_beta)
        torch.ops.gptoss_ext.rope_(q, k, positions, inv, conc)
        return q, k
    cos, sin = ref.rope_cos_sin(positions, q.shape[-1], theta, factor, original_context, ntk_alpha, ntk_beta)
    return ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, **rope_kwargs
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope(q, k, positions)` then `kv_write(k, v, k_cache, v_cache, slots)`, in one kernel launch
    where both kernels would run (head_dim 64); else the two ops. Returns the rotated (q, k)."""
    if _use_kernel("rope", q) and q.shape[-1] == 64 and _use_kernel("kv_write", k):
        r = {**_ROPE_DEFAULTS, **rope_kwargs}
        inv, conc = _inv_freq(q.device, q.shape[-1], r["theta"], r["factor"], r["original_context"], r["ntk_alpha"],
                              r["ntk_beta"])
        torch.ops.gptoss_ext.rope_kv_(q, k, v, positions, inv, conc, slots.to(k.device, torch.int64), k_cache, v_cache)
        return q, k
    q, k = rope(q, k, positions, **rope_kwargs)
    kv_write(k, v, k_cache, v_cache, slots)
    return q, k


def linear_rope_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, n_kv_heads: int,
                   weight_constant: bool = False, **rope_kwargs) -> torch.Tensor:
    """The fused qkv projection of decode: `qkv = linear(x, weight, bias)` [T, (n_heads + 2 n_kv_heads) *
    D], then `rope_kv_write` on its q / k / v head slices (q and k rotated in place, k and v into the
    cache rows `slots`). For 1..8 tokens on the kernel path it is one launch (the rotation and the
    cache write in the projection's epilogue, bit-identical to the separate ops; positions and slots
    must not be written by the kernel launched just before it); otherwise the separate ops run."""
    T, K = x.shape
    N = weight.shape[0]
    D = k_cache.shape[-1]
    if (x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and 1 <= T <= 8 and K % 8 == 0
            and T * K * 2 <= 96 * 1024 and weight.is_contiguous() and weight.numel() <= _SKINNY_MAX_WEIGHT
            and x.stride(-1) == 1 and x.stride(0) % 8 == 0 and D == 64 and N == (n_heads + 2 * n_kv_heads) * D
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()))
            and _use_kernel("rope", x) and _use_kernel("kv_write", x)):
        r = {**_ROPE_DEFAULTS, **rope_kwargs}
        inv, conc = _inv_freq(x.device, D, r["theta"], r["factor"], r["original_context"], r["ntk_alpha"],
                              r["ntk_beta"])
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
        torch.ops.gptoss_ext.linear_rope_kv(x, weight, bias, out, positions, inv, conc,
                                            slots.to(x.device, torch.int64), k_cache, v_cache, weight_constant)
        return out
    qkv = linear(x, weight, bias, weight_constant=weight_constant)
    q = qkv[:, :n_heads * D].view(T, n_heads, D)
    k = qkv[:, n_heads * D:(n_heads + n_kv_heads) * D].view(T, n_kv_heads, D)
    v = qkv[:, (n_heads + n_kv_heads) * D:].view(T, n_kv_heads, D)
    q2, k2 = rope_kv_write(q, k, v, positions, k_cache, v_cache, slots, **rope_kwargs)
    for view, rotated in ((q, q2), (k, k2)):          # the reference path rotates out of place
        if rotated.data_ptr() != view.data_ptr():
            view.copy_(rotated)
    return qkv


# ---- attention ---------------------------------------------------------------------------------
# KV cache of one layer: k_cache, v_cache [B, max_len, Hkv, 64] (bf16, contiguous); sequence b
# owns batch row b, position p is row p. Slots (kv_write) are flat rows b * max_len + p.

def _attn_kernel_ok(op: str, q: torch.Tensor) -> bool:
    if not _use_kernel(op, q):
        return False
    if q.shape[-1] != 64:
        _warn_once(f"the '{op}' kernel takes head_dim 64, got {q.shape[-1]}; it runs the slow plain-PyTorch "
                   "reference on the GPU")
        return False
    return True


def _sinks32(sinks: torch.Tensor | None) -> torch.Tensor | None:
    return None if sinks is None else sinks.to(torch.float32).contiguous()


def _scale(sm_scale: float | None, d: int) -> float:
    return float(sm_scale) if sm_scale is not None else d ** -0.5


def _check_attn_shapes(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must both be [batch, max_len, kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.shape[3] != q.shape[2] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{op}: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} (head_dim must "
                         "match and query heads be a multiple of the key/value heads)")


def _host_ints(name: str, v) -> list[int]:
    if isinstance(v, torch.Tensor):
        if v.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(v.shape)}")
        v = v.tolist()
    try:
        return [int(x) for x in v]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers") from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, *,
              start: int = 0, sliding_window: int = 0, sm_scale: float | None = None) -> torch.Tensor:
    """Sink-aware causal GQA attention of one sequence; see `reference.attention` (keys/values
    k, v [S, Hkv, D] for positions 0 .. S-1). On CUDA it runs the prefill kernel with k, v as a
    one-sequence cache."""
    T, S = q.shape[0], k.shape[0]
    if S < start + T:
        raise ValueError(f"keys cover {S} positions but queries reach position {start + T - 1}")
    if _attn_kernel_ok("attention", q) and T > 0:
        return attention_prefill(q, k.contiguous().unsqueeze(0), v.contiguous().unsqueeze(0), sinks, [0, T], [start],
                                 sliding_window=sliding_window, sm_scale=sm_scale)
    return ref.attention(q, k, v, sinks, start=start, sliding_window=sliding_window, sm_scale=sm_scale)


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor | None,
                      cu_seqlens, starts, *, sliding_window: int = 0, sm_scale: float | None = None,
                      max_q_len: int | None = None) -> torch.Tensor:
    """Varlen (chunked) prefill over a KV cache whose rows for the new tokens are already written.

    q [Ttot, Hq, 64]; sequence b's queries are q[cu_seqlens[b]:cu_seqlens[b+1]] at positions
    starts[b] .. and attend to cache rows 0 .. starts[b] + q_len - 1 of batch row b.
    cu_seqlens [B+1] / starts [B]: host sequences (validated here), or int32 CUDA tensors with
    max_q_len given (trusted as they are: the kernel clamps every index to the tensors).
    sliding_window > 0: a query at i sees keys j with i - window < j <= i. Returns [Ttot, Hq, 64]."""
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    _check_attn_shapes("attention_prefill", q, k_cache, v_cache)
    T, Hq, D = q.shape
    on_device = isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.is_cuda
    if not on_device:
        cu, st = _host_ints("cu_seqlens", cu_seqlens), _host_ints("starts", starts)
        if len(cu) != len(st) + 1 or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to {T} (the tokens of q) with one entry more than "
                             f"starts ({len(st)}), got {cu}")
        if len(st) > k_cache.shape[0]:
            raise ValueError(f"{len(st)} sequences but the cache has {k_cache.shape[0]} batch rows")
        for b, s0 in enumerate(st):
            if s0 < 0 or s0 + cu[b + 1] - cu[b] > k_cache.shape[1]:
                raise ValueError(f"sequence {b}: positions {s0} .. {s0 + cu[b + 1] - cu[b] - 1} do not fit the "
                                 f"cache of {k_cache.shape[1]} positions")
        max_q_len = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    elif max_q_len is None:
        raise ValueError("attention_prefill: with cu_seqlens on the GPU, give max_q_len")
    if _attn_kernel_ok("attention_prefill", q):
        if on_device:
            cu_t, st_t = cu_seqlens, starts
        else:
            both = torch.tensor(cu + st, dtype=torch.int32).to(q.device, non_blocking=True)
            cu_t, st_t = both[:len(cu)], both[len(cu):]
        out = torch.empty_like(q) if q.is_contiguous() else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        torch.ops.gptoss_ext.attn_prefill(q, k_cache, v_cache, _sinks32(sinks), cu_t, st_t, int(max_q_len),
                                          int(sliding_window), _scale(sm_scale, D), out)
        return out
    return ref.attention_prefill(q, k_cache, v_cache, sinks, cu_seqlens.tolist() if on_device else cu,
                                 starts.tolist() if on_device else st, sliding_window=sliding_window,
                                 sm_scale=sm_scale)


_scratch: dict[tuple, torch.Tensor] = {}


def _scratch_ints(kind: str, device: torch.device, n: int) -> torch.Tensor:
    """int32 scratch of the kernels that count in it (router, decode tickets): zeroed once, and the
    kernels leave it clean. One per kind, device and stream, grown as needed, so launches on one
    stream never share it concurrently."""
    key = (kind, device, torch.cuda.current_stream(device).cuda_stream)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _scratch[key] = buf
    return buf


@functools.lru_cache(maxsize=256)
def _decode_plan(B: int, Hq: int, Hkv: int, max_len: int, window: int, device: int) -> tuple[int, int, int]:
    """(chunk, splits, warps a CTA) of a decode launch on this device."""
    chunk, splits, warps = torch.ops.gptoss_ext.attn_decode_plan(B, Hq, Hkv, max_len, window, device)
    return int(chunk), int(splits), int(warps)


def _decode_tickets(device: torch.device, B: int, Hq: int, Hkv: int) -> torch.Tensor:
    """The decode kernel's per-group merge counters (zeroed once; the kernel leaves them at 0)."""
    return _scratch_ints("attn_tickets", device, B * Hkv * ((Hq // Hkv + 15) // 16))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor | None,
                     seq_lens, *, sliding_window: int = 0, sm_scale: float | None = None,
                     kv_ready: bool = False) -> torch.Tensor:
    """Decode: q [B, Hq, 64], one query per sequence at position seq_lens[b] - 1, over cache rows
    0 .. seq_lens[b] - 1 of batch row b (window > 0: only the last `window`). seq_lens: an int32
    CUDA tensor [B] (read on the device: CUDA-graph safe) or host integers. Split-KV: the launch
    shape depends only on B and the cache size. kv_ready=True promises that seq_lens and every
    cache row but the newest of each sequence were not written by the kernel launched just before
    (as in the model's decode step), so their loads may start before that kernel ends.
    Returns [B, Hq, 64]."""
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    _check_attn_shapes("attention_decode", q, k_cache, v_cache)
    B, Hq, D = q.shape
    max_len = k_cache.shape[1]
    if not isinstance(seq_lens, torch.Tensor) or not seq_lens.is_cuda:
        lens = _host_ints("seq_lens", seq_lens)
        if len(lens) != B:
            raise ValueError(f"seq_lens has {len(lens)} entries for {B} queries")
        bad = [n for n in lens if not 0 < n <= max_len]
        if bad:
            raise ValueError(f"seq_lens must be in [1, {max_len}] (the cache length), got {bad[0]}")
        seq_lens = torch.tensor(lens, dtype=torch.int32)
    if _attn_kernel_ok("attention_decode", q):
        seq_lens = seq_lens.to(q.device, torch.int32, non_blocking=True)
        Hkv = k_cache.shape[2]
        chunk, splits, warps = _decode_plan(B, Hq, Hkv, max_len, int(sliding_window), q.device.index or 0)
        ws_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        ws_ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
        torch.ops.gptoss_ext.attn_decode(q, k_cache, v_cache, _sinks32(sinks), seq_lens, int(sliding_window),
                                         _scale(sm_scale, D), chunk, warps, ws_o, ws_ml,
                                         _decode_tickets(q.device, B, Hq, Hkv), out, bool(kv_ready))
        return out
    return ref.attention_decode(q, k_cache, v_cache, sinks, seq_lens.tolist(), sliding_window=sliding_window,
                                sm_scale=sm_scale)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache / v_cache [B, max_len, Hkv, D] rows slots[t] (int64, = b * max_len + pos) <- k[t], v[t]
    ([T, Hkv, D], views allowed)."""
    if _use_kernel("kv_write", k) and k.shape[-1] == 64:
        torch.ops.gptoss_ext.kv_write(k, v, slots.to(k.device, torch.int64), k_cache, v_cache)
        return
    ref.kv_write(k, v, k_cache, v_cache, slots)


def decode_prep(seq_lens: torch.Tensor, active: torch.Tensor, row0: torch.Tensor, positions: torch.Tensor,
                slots: torch.Tensor) -> None:
    """A decode step's bookkeeping, in place: seq_lens += active (int32); positions = seq_lens - 1 and
    slots = where(active > 0, row0 + positions, -1) (int64). One launch on CUDA (instead of ~7
    elementwise kernels at the head of every decode step)."""
    if seq_lens.is_cuda and not getattr(_local, "reference", False) and _extension.available():
        torch.ops.gptoss_ext.decode_prep(seq_lens, active, row0, positions, slots)
        return
    seq_lens += active
    positions.copy_((seq_lens - 1).long())
    slots.copy_(torch.where(active > 0, row0 + positions, torch.full_like(positions, -1)))


# ---- MoE ---------------------------------------------------------------------------------------

def _router_scratch(device: torch.device, n: int) -> torch.Tensor:
    return _scratch_ints("router", device, n)


def _route_outputs(T: int, E: int, k: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(weights [T, k] fp32, ids [T, k], counts [E], offsets [E + 1], perm [T * k]) int32, uninitialised."""
    return (torch.empty(T, k, dtype=torch.float32, device=dev), torch.empty(T, k, dtype=torch.int32, device=dev),
            torch.empty(E, dtype=torch.int32, device=dev), torch.empty(E + 1, dtype=torch.int32, device=dev),
            torch.empty(T * k, dtype=torch.int32, device=dev))


def route(logits: torch.Tensor, k: int):
    """Top-k routing of logits [T, E]: (weights [T, k] fp32, ids [T, k] int32, counts [E],
    offsets [E + 1], perm [T * k]) int32 — see `reference.route` / `reference.group_by_expert`."""
    if _use_kernel("moe_router", logits, (torch.bfloat16, torch.float32)):
        T, E = logits.shape
        weights, ids, counts, offsets, perm = out = _route_outputs(T, E, k, logits.device)
        torch.ops.gptoss_ext.moe_router(logits.contiguous(), k, ids, weights, counts, offsets, perm,
                                        _router_scratch(logits.device, ((T + 31) // 32) * E + 1))
        return out
    weights, ids = ref.route(logits, k)
    counts, offsets, perm = ref.group_by_expert(ids, logits.shape[-1])
    return weights, ids.int(), counts, offsets, perm


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int):
    """`route(linear(x, gate_weight, gate_bias), k)` for 1 or 2 tokens in one kernel launch (decode);
    the gate weight must not be written by the kernel launched just before (model weights). Other
    cases run the two ops: the kernel takes up to 32 tokens, but each warp forms its expert's logits
    token after token (H200, E = 32: T = 1 6.5 vs 7.4 us, T = 8 15.6 vs 12.3 us for the two)."""
    T, H = x.shape
    E = gate_weight.shape[0]
    if (1 <= T <= 2 and H % 8 == 0 and H <= 3072 and E <= 256 and x.dtype == torch.bfloat16
            and gate_weight.dtype == torch.bfloat16 and gate_weight.is_contiguous() and x.stride(-1) == 1
            and x.stride(0) % 8 == 0 and (gate_bias is None or gate_bias.dtype == torch.bfloat16)
            and _use_kernel("moe_router", x)):
        weights, ids, counts, offsets, perm = out = _route_outputs(T, E, k, x.device)
        torch.ops.gptoss_ext.moe_gate_router(x, gate_weight, gate_bias, k, ids, weights, counts, offsets, perm,
                                             _router_scratch(x.device, 1 + T * E))
        return out
    return route(linear(x, gate_weight, gate_bias), k)


def add_rms_norm_route(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, eps: float,
                       gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int):
    """`t, r = add_rms_norm(x, residual, scale, eps)` and `gate_route(t, gate_weight, gate_bias, k)`:
    returns (t, r, routing). For 1 or 2 tokens on the kernel path all of it is one launch (the
    residual add, the norm, the gate linear and the router; bit-identical to the separate ops);
    otherwise the separate ops run."""
    T, H = residual.shape
    E = gate_weight.shape[0]
    if (1 <= T <= 2 and H % 8 == 0 and H <= 3072 and E <= 256 and x.dim() == 2 and x.shape == residual.shape
            and x.dtype == torch.bfloat16 and x.is_contiguous() and residual.is_contiguous()
            and scale.dtype == torch.bfloat16 and gate_weight.dtype == torch.bfloat16 and gate_weight.is_contiguous()
            and (gate_bias is None or gate_bias.dtype == torch.bfloat16)
            and _use_kernel("moe_router", x) and _use_kernel("add_rms_norm", residual)):
        out = torch.empty_like(residual)
        residual_out = torch.empty_like(residual)
        routing = weights, ids, counts, offsets, perm = _route_outputs(T, E, k, x.device)
        torch.ops.gptoss_ext.moe_add_norm_gate_router(x, residual, scale, eps, out, residual_out, gate_weight,
                                                      gate_bias, k, ids, weights, counts, offsets, perm,
                                                      _router_scratch(x.device, 1 + T * E))
        return out, residual_out, routing
    t, r = add_rms_norm(x, residual, scale, eps)
    return t, r, gate_route(t, gate_weight, gate_bias, k)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, mlp1_weight, mlp1_bias,
        mlp2_weight, mlp2_bias, *, experts_per_token: int = 4, swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0, residual: torch.Tensor | None = None, combine: bool = True,
        routing=None) -> torch.Tensor:
    """The MoE block on normed activations x [T, H]: router linear (cuBLAS), top-k, the MXFP4
    experts and the weighted sum (plus `residual` when given). CUDA bf16 with the experts in the
    kernel layout runs the kernels; anything else the reference. combine=False (no residual) on the
    kernel path returns the experts' weighted outputs uncombined, fp32 [T, k, H], for
    `add_rms_norm` to sum in its own launch; elsewhere it returns the combined [T, H] as usual.
    routing: `gate_route(x, gate_weight, gate_bias, k)`'s result when already computed (as
    `add_rms_norm_route` does); used on the kernel path only."""
    from .mxfp4 import KernelMXFP4

    kernel_weights = isinstance(mlp1_weight, KernelMXFP4) and isinstance(mlp2_weight, KernelMXFP4)
    if x.is_cuda and not getattr(_local, "reference", False) and not kernel_weights:
        _warn_once(f"the MoE kernels need MXFP4 experts in the kernel layout (got "
                   f"{type(mlp1_weight).__name__}); the MoE runs the plain-PyTorch reference on the GPU")
    elif kernel_weights and _use_kernel("moe", x):
        T = x.shape[0]
        k = experts_per_token
        if routing is None:
            routing = gate_route(x.contiguous(), gate_weight, gate_bias, k)
        weights, ids, counts, offsets, perm = routing
        R1, _ = mlp1_weight.shape
        H, I = mlp2_weight.shape
        h = torch.empty(T * k, R1 // 2, dtype=torch.bfloat16, device=x.device)
        y = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
        # mlp1 then mlp2 (mlp2 launched as routing_ready: its first weight loads overlap mlp1's tail)
        torch.ops.gptoss_ext.moe_experts(x.contiguous(), mlp1_weight.codes, mlp1_weight.scales, mlp1_bias,
                                         mlp2_weight.codes, mlp2_weight.scales, mlp2_bias, perm, offsets,
                                         weights.view(-1), k, swiglu_alpha, swiglu_limit, h, y,
                                         mlp1_weight.max_scale, mlp2_weight.max_scale)
        if not combine and residual is None:
            return y.view(T, k, H)
        out = torch.empty(T, H, dtype=torch.bfloat16, device=x.device)
        torch.ops.gptoss_ext.moe_combine(y, residual, k, out)
        return out
    out = ref.moe(x, gate_weight, gate_bias, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias,
                  experts_per_token=experts_per_token, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    return out if residual is None else (residual.float() + out.float()).to(residual.dtype)


# ---- fake implementations (tracing, CUDA-graph capture) ----------------------------------------

def _register_fakes() -> None:
    if getattr(_register_fakes, "done", False):
        return
    _register_fakes.done = True

    @torch.library.register_fake("gptoss_ext::rms_norm")
    def _(x, scale, eps, out):
        return None

    @torch.library.register_fake("gptoss_ext::add_rms_norm")
    def _(x, residual, scale, eps, out, residual_out):
        return None

    @torch.library.register_fake("gptoss_ext::moe_combine_add_rms_norm")
    def _(y, residual, scale, eps, out, residual_out):
        return None

    @torch.library.register_fake("gptoss_ext::linear_rope_kv")
    def _(x, weight, bias, out, positions, inv_freq, concentration, slots, k_cache, v_cache, weight_constant=False):
        return None

    @torch.library.register_fake("gptoss_ext::decode_prep")
    def _(seq_lens, active, row0, positions, slots):
        return None

    @torch.library.register_fake("gptoss_ext::rope_kv_")
    def _(q, k, v, positions, inv_freq, concentration, slots, k_cache, v_cache):
        return None

    @torch.library.register_fake("gptoss_ext::rope_")
    def _(q, k, positions, inv_freq, concentration):
        return None

    @torch.library.register_fake("gptoss_ext::moe_router")
    def _(logits, k, ids, weights, counts, offsets, perm, scratch):
        return None

    @torch.library.register_fake("gptoss_ext::moe_gate_router")
    def _(x, weight, bias, k, ids, weights, counts, offsets, perm, scratch):
        return None

    @torch.library.register_fake("gptoss_ext::moe_add_norm_gate_router")
    def _(x, residual, norm_scale, eps, out, residual_out, weight, bias, k, ids, weights, counts, offsets, perm,
          scratch):
        return None

    @torch.library.register_fake("gptoss_ext::moe_mlp1")
    def _(x, codes, scales, bias, perm, offsets, top_k, alpha, limit, out, max_scale=255):
        return None

    @torch.library.register_fake("gptoss_ext::moe_mlp2")
    def _(h, codes, scales, bias, perm, offsets, route_weights, out, max_scale=255, routing_ready=False):
        return None

    @torch.library.register_fake("gptoss_ext::moe_experts")
    def _(x, codes1, scales1, bias1, codes2, scales2, bias2, perm, offsets, route_weights, top_k, alpha, limit, h, y,
          max_scale1=255, max_scale2=255):
        return None

    @torch.library.register_fake("gptoss_ext::moe_combine")
    def _(y, residual, top_k, out):
        return None

    @torch.library.register_fake("gptoss_ext::attn_prefill")
    def _(q, k_cache, v_cache, sinks, cu_seqlens, start, max_q_len, window, sm_scale, out):
        return None

    @torch.library.register_fake("gptoss_ext::attn_decode")
    def _(q, k_cache, v_cache, sinks, seq_lens, window, sm_scale, chunk, warps, ws_o, ws_ml, tickets, out,
          kv_ready=False):
        return None

    @torch.library.register_fake("gptoss_ext::linear_skinny")
    def _(x, weight, bias, out, weight_constant=False):
        return None

    @torch.library.register_fake("gptoss_ext::kv_write")
    def _(k, v, slots, k_cache, v_cache):
        return None


if _extension.load(strict=False):
    _register_fakes()
