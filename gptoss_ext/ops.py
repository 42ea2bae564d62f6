"""The ops the model calls, and the Python face of the compiled kernels.

One road per op, found by one name: `csrc/kernels/<name>.cu` (torch-free kernel and launcher) ->
`csrc/ops/<name>_ops.cpp` (argument checks) -> its schema in `csrc/bindings.cpp` -> the section
`<name>` here -> `reference.<op>` (the oracle) -> `tests/test_<name>*.py` -> benchmark rows
`<name>`. The roads: rms_norm, rope, kv_cache, attention, linear, moe_router, moe_experts,
moe_combine. `moe()` below composes the last three into the MoE block.

Each op picks its implementation from its inputs:
  * CPU tensors: the plain-PyTorch reference (`gptoss_ext.reference`), always.
  * CUDA bf16 tensors with the kernels built: `torch.ops.gptoss_ext.*` (outputs allocated here).
  * CUDA tensors the kernels cannot serve (kernels not built, float32, head_dim other than 64): the
    reference, after a one-time RuntimeWarning that names the op and the reason. Never silently.
`reference_mode()` runs the reference on CUDA deliberately (for comparisons), without the warning.

Which kernel runs is decided in one place per op and can be asked: `attention_decode_plan` (the
decode launch shape), `moe_experts_plan` (the expert GEMM kernel, e.g. 'decode_tiles_splitk' for
the 20b decode at batch 1), `moe_gate_router`'s form (the cluster form on Hopper), and the
conditions written in each op below (e.g. `linear`: the skinny kernel for 1..8 rows). The kernels'
limits come from the extension (`limits()`), never repeated here.

The `torch.ops.gptoss_ext` ops are out-variants (they write into tensors given to them); their
fake implementations, generated from the schemas at load, let them trace and be captured in CUDA
graphs.
"""

from __future__ import annotations

import contextlib
import functools
import os
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


@functools.lru_cache(maxsize=1)
def limits() -> dict[str, int]:
    """The kernels' limits by name (head_dim, experts, top-k, widths, ...), read from the extension:
    the one definition is in the kernels' headers. Empty when the kernels are not loaded."""
    if not _extension.load(strict=False):
        return {}
    return dict(torch.ops.gptoss_ext.limits())


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


def set_pdl(enabled: bool) -> bool:
    """Programmatic dependent launch for this library's kernels (Hopper; on by default, GPTOSS_PDL=0
    turns it off at load): each kernel may launch while the previous one finishes and waits on the
    device for its results. Returns the previous setting. Takes effect for later launches (and
    graphs captured later)."""
    if not _extension.available():
        return False
    return bool(torch.ops.gptoss_ext.set_pdl(bool(enabled)))


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


def _device_index(device: torch.device | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def _bf16_rows(x: torch.Tensor, max_rows: int) -> bool:
    """x is a bf16 [M, K] with contiguous rows, 1 <= M <= max_rows, K % 8 == 0, and a row stride the
    16-byte vector loads accept."""
    return (x.dtype == torch.bfloat16 and x.dim() == 2 and 1 <= x.shape[0] <= max_rows and x.shape[1] % 8 == 0
            and x.stride(-1) == 1)


# ---- rms_norm ----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rms_norm(x) * scale over the last dim; x [T, H]."""
    if _use_kernel("rms_norm", x):
        out = torch.empty_like(x)
        torch.ops.gptoss_ext.rms_norm(x, scale, eps, out)
        return out
    return ref.rms_norm(x, scale, eps)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """r = residual + x; returns (rms_norm(r) * scale, r). x None: no add (r = residual)."""
    if x is None:
        return rms_norm(residual, scale, eps), residual
    if _use_kernel("add_rms_norm", residual):
        out = torch.empty_like(residual)
        residual_out = torch.empty_like(residual)
        torch.ops.gptoss_ext.add_rms_norm(x, residual, scale, eps, out, residual_out)
        return out, residual_out
    return ref.add_rms_norm(x, residual, scale, eps)


# ---- rope --------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _inv_freq(device: torch.device, head_dim: int, rope_items: tuple) -> tuple[torch.Tensor, float]:
    inv, conc = ref.yarn_inv_freq(head_dim, **dict(rope_items))
    return inv.to(device), conc


def rope_tables(device: torch.device, head_dim: int, **rope) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] fp64 on device, concentration) for the kernels; `rope` overrides
    reference.ROPE_DEFAULTS. Cached."""
    return _inv_freq(device, head_dim, tuple(sorted(ref.rope_params(**rope).items())))


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, **rope_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """YaRN RoPE on q [T, Hq, D] and k [T, Hkv, D] at integer positions [T]; `rope_kw` overrides
    reference.ROPE_DEFAULTS. The kernel path rotates q and k in place (they may be views of the
    fused qkv output); the reference returns new tensors."""
    if _use_kernel("rope", q):
        inv, conc = rope_tables(q.device, q.shape[-1], **rope_kw)
        torch.ops.gptoss_ext.rope_(q, k, positions, inv, conc)
        return q, k
    return ref.rope(q, k, positions, **rope_kw)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, **rope_kw
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope(q, k, positions)` then `kv_write(k, v, k_cache, v_cache, slots)`, in one kernel launch
    where both kernels would run (head_dim 64); else the two ops. Returns the rotated (q, k)."""
    if _use_kernel("rope", q) and q.shape[-1] == limits()["attention_head_dim"] and _use_kernel("kv_write", k):
        inv, conc = rope_tables(q.device, q.shape[-1], **rope_kw)
        torch.ops.gptoss_ext.rope_kv_(q, k, v, positions, inv, conc, slots.to(k.device, torch.int64), k_cache, v_cache)
        return q, k
    q, k = rope(q, k, positions, **rope_kw)
    kv_write(k, v, k_cache, v_cache, slots)
    return q, k


# ---- kv_cache ----------------------------------------------------------------------------------
# KV cache of one layer: k_cache, v_cache [B, max_len, Hkv, 64] (bf16, contiguous); sequence b
# owns batch row b, position p is row p. Writes go to flat slots b * max_len + p (kv_cache.h).

def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_cache / v_cache [B, max_len, Hkv, D] rows slots[t] (int64, = b * max_len + pos) <- k[t], v[t]
    ([T, Hkv, D], views allowed); slots outside the cache (-1) are skipped."""
    if _use_kernel("kv_write", k) and k.shape[-1] == limits()["attention_head_dim"]:
        torch.ops.gptoss_ext.kv_write(k, v, slots.to(k.device, torch.int64), k_cache, v_cache)
        return
    ref.kv_write(k, v, k_cache, v_cache, slots)


# ---- attention ---------------------------------------------------------------------------------

def _attn_kernel_ok(op: str, q: torch.Tensor) -> bool:
    if not _use_kernel(op, q):
        return False
    if q.shape[-1] != limits()["attention_head_dim"]:
        _warn_once(f"the '{op}' kernel takes head_dim {limits()['attention_head_dim']}, got {q.shape[-1]}; it runs "
                   "the slow plain-PyTorch reference on the GPU")
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


def paged_attention_supported(device) -> bool:
    """Whether attention over a paged KV cache (block tables) runs on `device`: the reference ops on
    the CPU, the kernels on CUDA (blocks of a power of two >= limits()['attention_min_block_rows'])."""
    return torch.device(device).type != "cuda" or _extension.available()


def _paged(op: str, q: torch.Tensor, k_pool: torch.Tensor, block_table, block_size) -> bool:
    """Checks of a paged call (k_pool [rows, Hkv, D], block_table [B, max_blocks] int32); whether
    the kernel runs it (else the reference)."""
    if k_pool.dim() != 3:
        raise ValueError(f"{op}: with a block table the cache is a pool [rows, kv_heads, head_dim], got shape "
                         f"{tuple(k_pool.shape)}")
    if not isinstance(block_size, int) or block_size <= 0 or k_pool.shape[0] % block_size:
        raise ValueError(f"{op}: block_size must divide the pool's {k_pool.shape[0]} rows, got {block_size!r}")
    if not _attn_kernel_ok(op, q):
        return False
    if block_size < limits()["attention_min_block_rows"] or block_size & (block_size - 1):
        raise ValueError(f"{op}: the attention kernels read paged blocks of a power of two >= "
                         f"{limits()['attention_min_block_rows']} rows, got {block_size}")
    return True


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor | None,
                      cu_seqlens, starts, *, sliding_window: int = 0, sm_scale: float | None = None,
                      max_q_len: int | None = None, block_table=None, block_size: int | None = None) -> torch.Tensor:
    """Varlen (chunked) prefill over a KV cache whose rows for the new tokens are already written.

    q [Ttot, Hq, 64]; sequence b's queries are q[cu_seqlens[b]:cu_seqlens[b+1]] at positions
    starts[b] .. and attend to cache rows 0 .. starts[b] + q_len - 1 of batch row b.
    cu_seqlens [B+1] / starts [B]: host sequences (validated here), or int32 CUDA tensors with
    max_q_len given (trusted as they are: the kernel clamps every index to the tensors).
    sliding_window > 0: a query at i sees keys j with i - window < j <= i. Returns [Ttot, Hq, 64]."""
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    if block_table is not None:        # a paged pool: sequence b's positions through its block table
        if _paged("attention_prefill", q, k_cache, block_table, block_size):
            if max_q_len is None:
                raise ValueError("attention_prefill: with a block table, give max_q_len")
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            torch.ops.gptoss_ext.attention_prefill(
                q, k_cache, v_cache, _sinks32(sinks), torch.as_tensor(cu_seqlens, dtype=torch.int32).to(q.device),
                torch.as_tensor(starts, dtype=torch.int32).to(q.device), int(max_q_len), int(sliding_window),
                _scale(sm_scale, q.shape[-1]), out, block_table.to(q.device, torch.int32), int(block_size))
            return out
        return ref.attention_prefill(q, k_cache, v_cache, sinks, _host_ints("cu_seqlens", cu_seqlens),
                                     _host_ints("starts", starts), sliding_window=sliding_window, sm_scale=sm_scale,
                                     block_table=block_table.tolist(), block_size=block_size)
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
        torch.ops.gptoss_ext.attention_prefill(q, k_cache, v_cache, _sinks32(sinks), cu_t, st_t, int(max_q_len),
                                          int(sliding_window), _scale(sm_scale, D), out)
        return out
    return ref.attention_prefill(q, k_cache, v_cache, sinks, cu_seqlens.tolist() if on_device else cu,
                                 starts.tolist() if on_device else st, sliding_window=sliding_window,
                                 sm_scale=sm_scale)


@functools.lru_cache(maxsize=256)
def _decode_plan(B: int, Hq: int, Hkv: int, max_len: int, window: int, device: int) -> tuple[int, int, int]:
    chunk, splits, warps = torch.ops.gptoss_ext.attention_decode_plan(B, Hq, Hkv, max_len, window, device)
    return int(chunk), int(splits), int(warps)


def attention_decode_plan(B: int, Hq: int, Hkv: int, max_len: int, window: int = 0,
                          device: torch.device | int | None = None) -> tuple[int, int, int]:
    """(chunk, splits, warps a CTA) of a decode launch on this device: the one place the decode
    kernel's shape is chosen (csrc/kernels/attention.cu, attn_decode_split), from the shapes only."""
    return _decode_plan(B, Hq, Hkv, max_len, window, _device_index(device))


def _decode_tickets(device: torch.device, B: int, Hq: int, Hkv: int) -> torch.Tensor:
    """The decode kernel's per-group merge counters (zeroed once; the kernel leaves them at 0)."""
    return _scratch_ints("attn_tickets", device, B * Hkv * ((Hq // Hkv + 15) // 16))


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sinks: torch.Tensor | None,
                     seq_lens, *, sliding_window: int = 0, sm_scale: float | None = None,
                     kv_ready: bool = False, block_table=None, block_size: int | None = None) -> torch.Tensor:
    """Decode: q [B, Hq, 64], one query per sequence at position seq_lens[b] - 1, over cache rows
    0 .. seq_lens[b] - 1 of batch row b (window > 0: only the last `window`). seq_lens: an int32
    CUDA tensor [B] (read on the device: CUDA-graph safe) or host integers. Split-KV: the launch
    shape depends only on B and the cache size. kv_ready=True promises that seq_lens and every
    cache row but the newest of each sequence were not written by the kernel launched just before
    (as in the model's decode step), so their loads may start before that kernel ends.
    Returns [B, Hq, 64]."""
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = full attention), got {sliding_window}")
    if block_table is not None:
        if _paged("attention_decode", q, k_cache, block_table, block_size):
            B, Hq, D = q.shape
            Hkv = k_cache.shape[1]
            chunk, splits, warps = _decode_plan(B, Hq, Hkv, block_table.shape[1] * block_size, int(sliding_window),
                                                q.device.index or 0)
            ws_o = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
            ws_ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
            out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
            torch.ops.gptoss_ext.attention_decode(
                q, k_cache, v_cache, _sinks32(sinks), torch.as_tensor(seq_lens, dtype=torch.int32).to(q.device),
                int(sliding_window), _scale(sm_scale, D), chunk, warps, ws_o, ws_ml, _decode_tickets(q.device, B, Hq, Hkv), out,
                bool(kv_ready), block_table.to(q.device, torch.int32), int(block_size))
            return out
        return ref.attention_decode(q, k_cache, v_cache, sinks, _host_ints("seq_lens", seq_lens),
                                    sliding_window=sliding_window, sm_scale=sm_scale,
                                    block_table=block_table.tolist(), block_size=block_size)
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
        torch.ops.gptoss_ext.attention_decode(q, k_cache, v_cache, _sinks32(sinks), seq_lens, int(sliding_window),
                                              _scale(sm_scale, D), chunk, warps, ws_o, ws_ml,
                                              _decode_tickets(q.device, B, Hq, Hkv), out, bool(kv_ready))
        return out
    return ref.attention_decode(q, k_cache, v_cache, sinks, seq_lens.tolist(), sliding_window=sliding_window,
                                sm_scale=sm_scale)




# ---- linear (the skinny kernel for decode rows, cuBLAS through torch otherwise) -------------------

_SKINNY_MAX_WEIGHT = 64 << 20   # elements: beyond this (the unembedding) cuBLAS already streams at copy speed


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The skinny kernel serves x @ weight^T + bias: CUDA bf16, 1..8 rows within its shared memory,
    a weight cuBLAS would stream worse (not the unembedding)."""
    if not (x.is_cuda and not getattr(_local, "reference", False) and _extension.available()):
        return False
    lim = limits()
    return (_bf16_rows(x, lim["linear_skinny_max_rows"]) and x.shape[0] * x.shape[1] * 2 <= lim["linear_skinny_max_x_bytes"]
            and weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.numel() <= _SKINNY_MAX_WEIGHT
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           weight_constant: bool = False) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T + bias [out]. On CUDA bf16 with 1..8 rows (decode) the skinny
    kernel (it streams the weight at ~copy speed where cuBLAS's split-K GEMV does not); else cuBLAS.
    weight_constant=True promises that no kernel of this library writes `weight` (model weights):
    the skinny kernel then starts loading it while the previous kernel finishes."""
    if _skinny_ok(x, weight, bias):
        out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        torch.ops.gptoss_ext.linear_skinny(x if x.stride(0) % 8 == 0 else x.contiguous(), weight, bias, out,
                                           weight_constant)
        return out
    return ref.linear(x, weight, bias)


def linear_rope_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, positions: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, n_heads: int, n_kv_heads: int,
                   weight_constant: bool = False, **rope_kw) -> torch.Tensor:
    """The fused qkv projection of decode: `qkv = linear(x, weight, bias)` [T, (n_heads + 2 n_kv_heads) *
    D], then `rope_kv_write` on its q / k / v head slices (q and k rotated in place, k and v into the
    cache rows `slots`). For 1..8 tokens on the kernel path it is one launch (the rotation and the
    cache write in the projection's epilogue, bit-identical to the separate ops; positions and slots
    must not be written by the kernel launched just before it); otherwise the separate ops run."""
    T, _ = x.shape
    N = weight.shape[0]
    D = k_cache.shape[-1]
    if (_skinny_ok(x, weight, bias) and x.stride(0) % 8 == 0 and D == limits()["attention_head_dim"]
            and N == (n_heads + 2 * n_kv_heads) * D and _use_kernel("rope", x) and _use_kernel("kv_write", x)):
        inv, conc = rope_tables(x.device, D, **rope_kw)
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
        torch.ops.gptoss_ext.linear_rope_kv(x, weight, bias, out, positions, inv, conc,
                                            slots.to(x.device, torch.int64), k_cache, v_cache, weight_constant)
        return out
    qkv = linear(x, weight, bias, weight_constant=weight_constant)
    q = qkv[:, :n_heads * D].view(T, n_heads, D)
    k = qkv[:, n_heads * D:(n_heads + n_kv_heads) * D].view(T, n_kv_heads, D)
    v = qkv[:, (n_heads + n_kv_heads) * D:].view(T, n_kv_heads, D)
    q2, k2 = rope_kv_write(q, k, v, positions, k_cache, v_cache, slots, **rope_kw)
    for view, rotated in ((q, q2), (k, k2)):          # the reference path rotates out of place
        if rotated.data_ptr() != view.data_ptr():
            view.copy_(rotated)
    return qkv


# ---- moe_router ----------------------------------------------------------------------------------
# Routing: (weights [T, k] fp32, ids [T, k] int32, counts [E], offsets [E + 1], perm [T * k] int32).

GATE_FORMS = {"plan": -1, "ticket": 0, "cluster": 1}   # moe_gate_router's forms (kernels/moe_router.h)
# Tokens up to which the fused gate + router runs: each warp forms its expert's logits token after
# token, so beyond 2 the separate gate linear + router win (H200, E = 32: T = 1 6.5 vs 7.4 us,
# T = 8 15.6 vs 12.3 us for the two).
_GATE_FUSED_MAX_TOKENS = 2


def _route_outputs(T: int, E: int, k: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(weights [T, k] fp32, ids [T, k], counts [E], offsets [E + 1], perm [T * k]) int32, uninitialised."""
    return (torch.empty(T, k, dtype=torch.float32, device=dev), torch.empty(T, k, dtype=torch.int32, device=dev),
            torch.empty(E, dtype=torch.int32, device=dev), torch.empty(E + 1, dtype=torch.int32, device=dev),
            torch.empty(T * k, dtype=torch.int32, device=dev))


def moe_router(logits: torch.Tensor, k: int):
    """Top-k routing of logits [T, E] and the grouping by expert — see `reference.moe_router`."""
    if _use_kernel("moe_router", logits, (torch.bfloat16, torch.float32)):
        T, E = logits.shape
        weights, ids, counts, offsets, perm = out = _route_outputs(T, E, k, logits.device)
        torch.ops.gptoss_ext.moe_router(logits.contiguous(), k, ids, weights, counts, offsets, perm,
                                        _scratch_ints("router", logits.device, ((T + 31) // 32) * E + 1))
        return out
    return ref.moe_router(logits, k)


def _gate_fused_ok(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int) -> bool:
    T, H = x.shape
    lim = limits()
    return (1 <= T <= _GATE_FUSED_MAX_TOKENS and bool(lim) and H % 8 == 0 and H <= lim["moe_gate_router_max_hidden"]
            and gate_weight.shape[0] <= lim["moe_router_max_experts"] and k <= lim["moe_router_max_top_k"]
            and x.dtype == torch.bfloat16 and gate_weight.dtype == torch.bfloat16 and gate_weight.is_contiguous()
            and (gate_bias is None or gate_bias.dtype == torch.bfloat16))


def moe_gate_router(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int,
                    form: str = "plan"):
    """`moe_router(linear(x, gate_weight, gate_bias), k)`, for 1 or 2 tokens in one kernel launch
    (decode); the gate weight must not be written by the kernel launched just before (model
    weights). form: 'plan' (the cluster form on Hopper where it serves, else 'ticket'), or one of
    them by name (it must serve the call). Other cases run the two ops."""
    if (_gate_fused_ok(x, gate_weight, gate_bias, k) and x.stride(-1) == 1 and x.stride(0) % 8 == 0
            and _use_kernel("moe_router", x)):
        T, E = x.shape[0], gate_weight.shape[0]
        weights, ids, counts, offsets, perm = out = _route_outputs(T, E, k, x.device)
        torch.ops.gptoss_ext.moe_gate_router(x, gate_weight, gate_bias, k, ids, weights, counts, offsets, perm,
                                             _scratch_ints("router", x.device, 1 + T * E), GATE_FORMS[form])
        return out
    return moe_router(linear(x, gate_weight, gate_bias), k)


def moe_add_norm_gate_router(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor, eps: float,
                             gate_weight: torch.Tensor, gate_bias: torch.Tensor | None, k: int, form: str = "plan"):
    """`t, r = add_rms_norm(x, residual, scale, eps)` and `moe_gate_router(t, gate_weight, gate_bias, k)`:
    returns (t, r, routing). For 1 or 2 tokens on the kernel path all of it is one launch (the
    residual add, the norm, the gate linear and the router; bit-identical to the separate ops);
    otherwise the separate ops run."""
    if (x.dim() == 2 and x.shape == residual.shape and _gate_fused_ok(residual, gate_weight, gate_bias, k)
            and x.dtype == torch.bfloat16 and x.is_contiguous() and residual.is_contiguous()
            and scale.dtype == torch.bfloat16 and _use_kernel("moe_router", x) and _use_kernel("add_rms_norm", residual)):
        T, E = residual.shape[0], gate_weight.shape[0]
        out = torch.empty_like(residual)
        residual_out = torch.empty_like(residual)
        routing = weights, ids, counts, offsets, perm = _route_outputs(T, E, k, x.device)
        torch.ops.gptoss_ext.moe_add_norm_gate_router(x, residual, scale, eps, out, residual_out, gate_weight,
                                                      gate_bias, k, ids, weights, counts, offsets, perm,
                                                      _scratch_ints("router", x.device, 1 + T * E), GATE_FORMS[form])
        return out, residual_out, routing
    t, r = add_rms_norm(x, residual, scale, eps)
    return t, r, moe_gate_router(t, gate_weight, gate_bias, k, form)


# ---- moe_experts ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def moe_kernel_names() -> tuple[str, ...]:
    """The expert GEMM kernels, by the index the ops take (csrc/kernels/moe_experts.h, MoeKernel)."""
    return tuple(torch.ops.gptoss_ext.moe_kernel_names()) if _extension.load(strict=False) else ()


def moe_experts_plan(pairs: int, experts: int, rows: int, cols: int, max_scale: int = 255,
                     device: torch.device | int | None = None) -> str:
    """The kernel `moe_experts` runs for one of its GEMMs (mlp1: rows = 2 x intermediate, cols =
    hidden; mlp2: rows = hidden, cols = intermediate) with `pairs` routed (token, expert) pairs:
    the plan of csrc/kernels/moe_experts.cu, from the shapes and the device only."""
    return moe_kernel_names()[torch.ops.gptoss_ext.moe_experts_plan(pairs, experts, rows, cols, max_scale,
                                                                    _device_index(device))]


def uses_moe_kernels(x: torch.Tensor, mlp1_weight) -> bool:
    """Whether the MoE of x runs the kernels: CUDA bf16 activations and experts in the kernels'
    layout (gptoss_ext.mxfp4.KernelMXFP4), kernels loaded."""
    from .mxfp4 import KernelMXFP4

    return isinstance(mlp1_weight, KernelMXFP4) and _use_kernel("moe_experts", x)


def moe_experts(x: torch.Tensor, routing, mlp1_weight, mlp1_bias: torch.Tensor, mlp2_weight, mlp2_bias: torch.Tensor,
                *, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0, kernel: str | None = None,
                experts: tuple[int, int] | None = None) -> torch.Tensor:
    """The routed experts of x [T, H] (normed activations): for each (token, expert) pair of
    `routing` (as moe_router returns it) mlp2(swiglu(mlp1(x))) times the routing weight; returns
    them uncombined, fp32 [T, k, H] (moe_combine sums them). mlp1_weight / mlp2_weight: MXFP4
    experts in the kernels' layout (KernelMXFP4) for the kernels; anything `reference.expert_weight`
    reads for the reference. kernel: None (the plan's, see moe_experts_plan) or a name of
    moe_kernel_names() for both GEMMs (it must serve them). experts: (first, count) when the
    weights hold only those experts (a rank's share, gptoss_ext.parallel): the routing is over all
    experts, the pairs of the others come out as zeros."""
    weights, ids, counts, offsets, perm = routing
    T = x.shape[0]
    k = weights.shape[1]
    first = 0
    if experts is not None:
        first, n = experts
        E = offsets.shape[0] - 1
        if not (0 <= first and n >= 1 and first + n <= E):
            raise ValueError(f"experts {experts}: not a range of the routing's {E} experts")
        if mlp1_bias.shape[0] != n or mlp2_bias.shape[0] != n:
            raise ValueError(f"experts {experts}: the biases hold {mlp1_bias.shape[0]} and {mlp2_bias.shape[0]} "
                             f"experts, not {n}")
    if uses_moe_kernels(x, mlp1_weight):
        R1, _ = mlp1_weight.shape
        H, _ = mlp2_weight.shape
        h = torch.empty(T * k, R1 // 2, dtype=torch.bfloat16, device=x.device)
        if experts is not None:
            # the kernels take the held experts' slice of the offsets (perm indices stay global)
            # and write only those pairs' rows
            offsets = offsets[first:first + experts[1] + 1]
            y = torch.zeros(T * k, H, dtype=torch.float32, device=x.device)
        else:
            y = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
        if kernel is not None and kernel not in moe_kernel_names():
            raise ValueError(f"kernel {kernel!r} is not in moe_kernel_names(): {', '.join(moe_kernel_names())}")
        kid = -1 if kernel is None else moe_kernel_names().index(kernel)
        # mlp1 then mlp2 (mlp2 launched as routing_ready: its first weight loads overlap mlp1's tail)
        torch.ops.gptoss_ext.moe_experts(x.contiguous(), mlp1_weight.codes, mlp1_weight.scales, mlp1_bias,
                                         mlp2_weight.codes, mlp2_weight.scales, mlp2_bias, perm, offsets,
                                         weights.view(-1), k, swiglu_alpha, swiglu_limit, h, y,
                                         mlp1_weight.max_scale, mlp2_weight.max_scale, kid)
        return y.view(T, k, H)
    return ref.moe_experts(x, weights, ids, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_alpha=swiglu_alpha,
                           swiglu_limit=swiglu_limit, combine=False, experts=experts)


# ---- moe_combine ---------------------------------------------------------------------------------

def moe_combine(y: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Sum each token's expert outputs y [T, k, H] fp32 (+ residual [T, H]), rounded once to bf16."""
    if (_use_kernel("moe_combine", y, (torch.float32,)) and y.dim() == 3
            and (residual is None or residual.dtype == torch.bfloat16)):
        T, k, H = y.shape
        out = torch.empty(T, H, dtype=torch.bfloat16, device=y.device)
        torch.ops.gptoss_ext.moe_combine(y.reshape(T * k, H), residual, k, out)
        return out
    return ref.moe_combine(y, residual)


def moe_combine_add_rms_norm(y: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor,
                             eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """r = residual + the combined MoE output; returns (rms_norm(r) * scale, r). y: the experts'
    uncombined outputs [T, k, H] fp32 (the kernel path: summed in the norm's own launch, rounded
    once), or an already combined [T, H] in the residual's dtype (the reference path of `moe`)."""
    if y.dim() == 2:
        return add_rms_norm(y, residual, scale, eps)
    if y.is_cuda and _use_kernel("moe_combine", residual):
        out = torch.empty_like(residual)
        residual_out = torch.empty_like(residual)
        torch.ops.gptoss_ext.moe_combine_add_rms_norm(y, residual, scale, eps, out, residual_out)
        return out, residual_out
    return ref.moe_combine_add_rms_norm(y, residual, scale, eps)


# ---- the MoE block: moe_router -> moe_experts -> moe_combine ----------------------------------------

def moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, mlp1_weight, mlp1_bias,
        mlp2_weight, mlp2_bias, *, experts_per_token: int = 4, swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0, residual: torch.Tensor | None = None, combine: bool = True,
        routing=None, experts: tuple[int, int] | None = None) -> torch.Tensor:
    """The MoE block on normed activations x [T, H]: router, top-k, the MXFP4 experts and the
    weighted sum (plus `residual` when given). CUDA bf16 with the experts in the kernel layout runs
    the kernels; anything else the reference. combine=False (no residual) on the kernel path
    returns the experts' weighted outputs uncombined, fp32 [T, k, H], for
    `moe_combine_add_rms_norm` to sum in the next norm's launch; elsewhere it returns the combined
    [T, H] as usual. routing: `moe_gate_router(x, gate_weight, gate_bias, k)`'s result when
    already computed (as `moe_add_norm_gate_router` does); used on the kernel path only.
    experts: (first, count) of the experts the weights hold (see moe_experts): the output has only
    their share."""
    if uses_moe_kernels(x, mlp1_weight):
        if routing is None:
            routing = moe_gate_router(x.contiguous(), gate_weight, gate_bias, experts_per_token)
        y = moe_experts(x, routing, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias, swiglu_alpha=swiglu_alpha,
                        swiglu_limit=swiglu_limit, experts=experts)
        if not combine and residual is None:
            return y
        return moe_combine(y, residual)
    from .mxfp4 import KernelMXFP4

    if x.is_cuda and not getattr(_local, "reference", False) and not isinstance(mlp1_weight, KernelMXFP4):
        _warn_once(f"the MoE kernels need MXFP4 experts in the kernel layout (got "
                   f"{type(mlp1_weight).__name__}); the MoE runs the plain-PyTorch reference on the GPU")
    out = ref.moe(x, gate_weight, gate_bias, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias,
                  experts_per_token=experts_per_token, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
                  experts=experts)
    return out if residual is None else (residual.float() + out.float()).to(residual.dtype)


# ---- fake implementations (tracing, CUDA-graph capture), from the schemas --------------------------

def _register_fakes() -> None:
    """Every out-variant op (its schema returns ()) gets a fake that does nothing: the outputs are
    the caller's tensors, so there is nothing to allocate or shape. Generated from the registered
    schemas, so a new op needs no entry here."""
    if getattr(_register_fakes, "done", False):
        return
    _register_fakes.done = True
    for qualname in sorted(torch._C._dispatch_get_all_op_names()):
        if not qualname.startswith("gptoss_ext::"):
            continue
        op = getattr(torch.ops.gptoss_ext, qualname.split("::", 1)[1]).default
        schema = op._schema
        if schema.returns or not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            continue
        torch.library.register_fake(qualname)(_fake_out_variant)


def _fake_out_variant(*args, **kwargs) -> None:
    return None


if _extension.load(strict=False):
    _register_fakes()
    if os.environ.get("GPTOSS_PDL") == "0":
        set_pdl(False)
