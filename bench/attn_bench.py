"""Attention benchmarks at gpt-oss shapes (64 query / 8 KV heads of 64), peers in the same run:
  prefill, causal full attention, T = 4096 and 16384: torch SDPA flash and cuDNN backends (no
    sinks; K/V expanded to 64 heads, which they need), against our sink-aware GQA kernel;
  prefill with the 128-token window: FlexAttention (torch.compile'd, sliding-window block mask,
    sinks through the LSE correction out * sigmoid(lse - sink));
  decode (one query a sequence, split-KV): B = 32 at cache length 8192, B = 1 at 8192 and 65536,
    as % of copy bandwidth over the K/V bytes read; torch SDPA with enable_gqa as a peer;
  decode through block tables (the serving engine's): B = 64 and 256, mixed lengths, shuffled blocks."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from gptoss_ext import ops

from common import Row, rotation_count, time_cuda

HQ, HKV, D = 64, 8, 64
SCALE = D ** -0.5


def _sdpa_rows(T: int, q, k, v, flops: float, case: str) -> list[Row]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    qh = q.transpose(0, 1).unsqueeze(0)                                        # [1, 64, T, 64]
    kh = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1).unsqueeze(0)
    vh = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1).unsqueeze(0)
    for name, backend in (("torch SDPA flash (no sinks)", SDPBackend.FLASH_ATTENTION),
                          ("torch SDPA cuDNN (no sinks)", SDPBackend.CUDNN_ATTENTION)):
        try:
            def fn(i, backend=backend):
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=SCALE)
            fn(0)
            ms, p10, p90, mode = time_cuda(fn)
            rows.append(Row("attention_prefill", case, name, ms, p10, p90, flops=flops, timing=mode))
        except Exception as e:  # a peer that cannot run is reported, not dropped
            rows.append(Row("attention_prefill", case, f"{name} unavailable: {type(e).__name__}", 0.0, 0.0, 0.0))
    return rows


def _flex_rows(T: int, q, k, v, sinks, flops: float, case: str) -> list[Row]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def window_mask(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < 128)

        bm = create_block_mask(window_mask, 1, 1, T, T, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = k.transpose(0, 1).unsqueeze(0)
        vh = v.transpose(0, 1).unsqueeze(0)
        sk = sinks.view(1, HQ, 1, 1)

        def fn(i):
            out, lse = flex(qh, kh, vh, block_mask=bm, scale=SCALE, enable_gqa=True, return_lse=True)
            return out * torch.sigmoid(lse.unsqueeze(-1) - sk)

        fn(0)
        ms, p10, p90, mode = time_cuda(fn)
        return [Row("attention_prefill", case, "FlexAttention (compiled) + LSE sink", ms, p10, p90, flops=flops,
                    timing=mode)]
    except Exception as e:
        return [Row("attention_prefill", case, f"FlexAttention unavailable: {type(e).__name__}: {str(e)[:60]}",
                    0.0, 0.0, 0.0)]


def bench_prefill() -> list[Row]:
    rows = []
    for T in (4096, 16384):
        q = torch.randn(T, HQ, D, device="cuda").bfloat16()
        k = torch.randn(T, HKV, D, device="cuda").bfloat16()
        v = torch.randn(T, HKV, D, device="cuda").bfloat16()
        sinks = torch.randn(HQ, device="cuda")
        kc, vc = k.unsqueeze(0), v.unsqueeze(0)
        cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
        st = torch.zeros(1, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        for window in (0, 128):
            keys = T * (T + 1) / 2 if window == 0 else sum(min(i + 1, window) for i in range(T))
            flops = 4 * keys * HQ * D
            case = f"T={T} {'causal' if window == 0 else 'window 128'}"

            def ours(i, window=window):
                torch.ops.gptoss_ext.attention_prefill(q, kc, vc, sinks, cu, st, T, window, SCALE, out)

            t_end = time.perf_counter() + 0.3          # clocks up before the first timed row
            while time.perf_counter() < t_end:
                ours(0)
                torch.cuda.synchronize()
            ms, p10, p90, mode = time_cuda(ours)
            target = (">= SDPA flash speed; aim cuDNN" if window == 0 else ">= 2x FlexAttention")
            rows.append(Row("attention_prefill", case, "gptoss_ext (sinks, GQA)", ms, p10, p90, flops=flops,
                            timing=mode, target=target))
            if window == 0:
                rows += _sdpa_rows(T, q, k, v, flops, case)
            else:
                rows += _flex_rows(T, q, k, v, sinks, flops, case)
        del q, k, v, kc, vc, out
        torch.cuda.empty_cache()
    return rows


def bench_decode(l2: int) -> list[Row]:
    rows = []
    for B, L, window in ((32, 8192, 0), (1, 8192, 0), (1, 65536, 0), (1, 2048, 0), (32, 8192, 128), (1, 8192, 128)):
        keys = min(L, window) if window else L
        nbytes = B * keys * HKV * D * 2 * 2
        n = rotation_count(nbytes, l2, cap=16) if B * L * HKV * D * 4 < 8e9 else 1
        caches = [(torch.randn(B, L, HKV, D, device="cuda").bfloat16(), torch.randn(B, L, HKV, D, device="cuda").bfloat16())
                  for _ in range(n)]
        q = torch.randn(B, HQ, D, device="cuda").bfloat16()
        sinks = torch.randn(HQ, device="cuda")
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        case = f"B={B} L={L}" + (" window 128" if window else "")
        ops.attention_decode(q, caches[0][0], caches[0][1], sinks, lens, sliding_window=window)
        ms, p10, p90, mode = time_cuda(
            lambda i: ops.attention_decode(q, caches[i][0], caches[i][1], sinks, lens, sliding_window=window), n)
        target = "" if window or L == 2048 else (">=80% copy BW" if B == 32 else ">=50% copy BW")
        chunk, splits, warps = ops.attention_decode_plan(B, HQ, HKV, L, window)
        rows.append(Row("attention_decode", case, "gptoss_ext (split-KV)", ms, p10, p90, bytes=nbytes, timing=mode,
                        flops=4 * B * keys * HQ * D, target=target,
                        extra={"chunk": chunk, "splits": splits, "warps": warps}))
        ms, p10, p90, mode = time_cuda(lambda i: ops.attention_decode(q, caches[i][0], caches[i][1], sinks, lens,
                                                                      sliding_window=window, kv_ready=True), n)
        rows.append(Row("attention_decode", case, "gptoss_ext, kv_ready (the model's call: loads before the wait)",
                        ms, p10, p90, bytes=nbytes, timing=mode))
        if B == 1 and not window:   # other CTA shapes and split lengths (the plan's choice is the row above)
            tickets = torch.zeros(B * HKV, dtype=torch.int32, device="cuda")
            for w, c in sorted({(1, 256), (4, 512), (4, 1024), (8, 256), (8, 1024)} - {(warps, chunk)}):
                S = -(-L // c)
                ws_o = torch.empty(B, HQ, S, D, device="cuda")
                ws_ml = torch.empty(B, HQ, S, 2, device="cuda")
                o = torch.empty(B, HQ, D, device="cuda", dtype=torch.bfloat16)
                ms, p10, p90, mode = time_cuda(
                    lambda i, w=w, c=c, ws_o=ws_o, ws_ml=ws_ml, o=o: torch.ops.gptoss_ext.attention_decode(
                        q, caches[i][0], caches[i][1], sinks, lens, 0, SCALE, c, w, ws_o, ws_ml, tickets, o), n)
                rows.append(Row("attention_decode", case, f"gptoss_ext, {w}-warp CTAs, chunk {c} ({S} splits)", ms,
                                p10, p90, bytes=nbytes, timing=mode))
        if not window:
            qh = q.view(B, HQ, 1, D)
            views = [(kc.transpose(1, 2), vc.transpose(1, 2)) for kc, vc in caches]
            try:
                def sdpa(i):
                    F.scaled_dot_product_attention(qh, views[i][0], views[i][1], scale=SCALE, enable_gqa=True)
                sdpa(0)
                ms, p10, p90, mode = time_cuda(sdpa, n)
                rows.append(Row("attention_decode", case, "torch SDPA enable_gqa (no sinks)", ms, p10, p90,
                                bytes=nbytes, timing=mode))
            except Exception as e:
                rows.append(Row("attention_decode", case, f"torch SDPA unavailable: {type(e).__name__}", 0.0, 0.0, 0.0))
        del caches
        torch.cuda.empty_cache()
    return rows


def bench_decode_paged(l2: int) -> list[Row]:
    """The serving engine's decode: B = 64 and 256 sequences of mixed lengths (uniform in 512..3584,
    a 1k/1k load half way) through block tables of 128-row blocks, the blocks shuffled over the pool;
    % of copy bandwidth over the K/V bytes read. Beside it the same lengths in a contiguous cache."""
    rows = []
    bs = 128
    for B in (64, 256):
        g = torch.Generator().manual_seed(B)
        lens_h = torch.randint(512, 3585, (B,), generator=g)
        nblk = [-(-int(n) // bs) for n in lens_h]
        W = 1 << (max(nblk) - 1).bit_length()
        total = sum(nblk)
        nbytes = int(lens_h.sum()) * HKV * D * 2 * 2
        n = rotation_count(nbytes, l2, cap=8)
        pools = [(torch.randn(total * bs, HKV, D, device="cuda").bfloat16(),
                  torch.randn(total * bs, HKV, D, device="cuda").bfloat16()) for _ in range(n)]
        perm = torch.randperm(total, generator=g)
        table = torch.zeros(B, W, dtype=torch.int32)
        at = 0
        for b, k in enumerate(nblk):
            table[b, :k] = perm[at:at + k].int()
            at += k
        table = table.cuda()
        q = torch.randn(B, HQ, D, device="cuda").bfloat16()
        sinks = torch.randn(HQ, device="cuda")
        lens = lens_h.int().cuda()
        case = f"B={B} mixed lengths 512-3584, paged (128-row blocks, shuffled)"
        fn = lambda i: ops.attention_decode(q, pools[i][0], pools[i][1], sinks, lens, block_table=table,   # noqa: E731
                                            block_size=bs, kv_ready=True)
        fn(0)
        ms, p10, p90, mode = time_cuda(fn, n)
        rows.append(Row("attention_decode", case, "gptoss_ext (split-KV, block table)", ms, p10, p90, bytes=nbytes,
                        timing=mode, target=">=70% copy BW"))
        del pools
        L = W * bs
        caches = [(torch.randn(B, L, HKV, D, device="cuda").bfloat16(), torch.randn(B, L, HKV, D, device="cuda").bfloat16())
                  for _ in range(min(n, 2))]
        ms, p10, p90, mode = time_cuda(lambda i: ops.attention_decode(q, caches[i][0], caches[i][1], sinks, lens,
                                                                      kv_ready=True), len(caches))
        rows.append(Row("attention_decode", case, "gptoss_ext, the same lengths in a contiguous cache", ms, p10, p90,
                        bytes=nbytes, timing=mode))
        del caches
        torch.cuda.empty_cache()
    return rows


def run(l2: int) -> list[Row]:
    return bench_prefill() + bench_decode(l2) + bench_decode_paged(l2)
