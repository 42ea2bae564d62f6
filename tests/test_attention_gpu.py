"""GPU tests of the attention kernels (varlen prefill, split-KV decode, KV-cache write) against the
fp32 reference on fresh random inputs: lengths around the 64-key tiles and the 128 window, start
offsets, window on/off, sinks, GQA ratios, mixed batches, NaN beyond the valid cache rows, CUDA
graphs, and argument errors. Error is held to ~2x that of a plain bf16 PyTorch attention."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import D, make_cache, rand

pytestmark = pytest.mark.gpu
DEV = "cuda"


def bf16_attention(q, k, v, sinks, start, window):
    """A plain bf16 PyTorch attention (what an eager bf16 model computes): the error yardstick."""
    T, Hq, _ = q.shape
    S, Hkv, _ = k.shape
    G = Hq // Hkv
    kk = k.repeat_interleave(G, 1).transpose(0, 1)                     # [Hq, S, D]
    vv = v.repeat_interleave(G, 1).transpose(0, 1)
    scores = torch.matmul(q.transpose(0, 1), kk.transpose(1, 2)) * (D ** -0.5)   # [Hq, T, S] bf16
    qpos = start + torch.arange(T, device=DEV)[:, None]
    kpos = torch.arange(S, device=DEV)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= qpos - kpos < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    logits = torch.cat([scores, sinks.bfloat16().view(Hq, 1, 1).expand(Hq, T, 1)], -1)
    probs = torch.softmax(logits, -1)[..., :-1]
    return torch.matmul(probs, vv).transpose(0, 1)                     # [T, Hq, D] bf16


def check_close(got, want32, yard):
    """got (kernel, bf16) vs the fp32 reference: max error <= 2x the bf16 yardstick's (+ a floor)."""
    assert not got.isnan().any(), "NaN in the kernel output"
    err = (got.float() - want32).abs().max().item()
    err_yard = (yard.float() - want32).abs().max().item()
    floor = 2e-3 * max(want32.abs().max().item(), 1e-3)
    assert err <= 2 * err_yard + floor, f"error {err:.3e} vs bf16 PyTorch {err_yard:.3e}"


# ---- prefill ------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 127, 128, 129, 2 * 128 + 17, 1000, 4096])
@pytest.mark.parametrize("start", [0, 75])
@pytest.mark.parametrize("window", [0, 128])
def test_prefill_matches_reference(T, start, window):
    Hq, Hkv = 64, 8
    g = torch.Generator(device=DEV).manual_seed(T * 31 + start + window)
    q = rand((T, Hq, D), g, 2.0)
    kc, vc = make_cache(1, start + T + 50, Hkv, g)
    k, v = rand((start + T, Hkv, D), g, 2.0), rand((start + T, Hkv, D), g)
    kc[0, :start + T], vc[0, :start + T] = k, v
    sinks = torch.randn(Hq, device=DEV, generator=g) * 2
    got = ops.attention_prefill(q, kc, vc, sinks, [0, T], [start], sliding_window=window)
    want = ref.attention(q.float(), k.float(), v.float(), sinks, start=start, sliding_window=window).float()
    check_close(got, want, bf16_attention(q, k, v, sinks, start, window))


@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (64, 8), (12, 4), (32, 1), (64, 2)])
def test_prefill_gqa_ratios(Hq, Hkv):
    T, start = 300, 20
    g = torch.Generator(device=DEV).manual_seed(Hq * 100 + Hkv)
    q = rand((T, Hq, D), g, 2.0)
    k, v = rand((start + T, Hkv, D), g, 2.0), rand((start + T, Hkv, D), g)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    for window in (0, 128):
        got = ops.attention(q, k, v, sinks, start=start, sliding_window=window)
        want = ref.attention(q.float(), k.float(), v.float(), sinks, start=start, sliding_window=window)
        check_close(got, want, bf16_attention(q, k, v, sinks, start, window))


def test_window_is_not_ignored():
    """Beyond twice the window, windowed and full attention must differ, and each match its reference."""
    T, Hq, Hkv = 600, 16, 2
    g = torch.Generator(device=DEV).manual_seed(5)
    q, k, v = rand((T, Hq, D), g, 2.0), rand((T, Hkv, D), g, 2.0), rand((T, Hkv, D), g)
    sinks = torch.zeros(Hq, device=DEV)
    win = ops.attention(q, k, v, sinks, sliding_window=128)
    full = ops.attention(q, k, v, sinks, sliding_window=0)
    # The first 128 queries see the same keys: the window launch (64-row blocks) and the full one
    # (128-row blocks, 128-key tiles) round differently, so each must meet the full reference there.
    want_full = ref.attention(q[:128].float(), k[:128].float(), v[:128].float(), sinks)
    yard = bf16_attention(q[:128], k[:128], v[:128], sinks, 0, 0)
    check_close(win[:128], want_full, yard)
    check_close(full[:128], want_full, yard)
    assert (win[300:].float() - full[300:].float()).abs().mean() > 0.02
    want = ref.attention(q.float(), k.float(), v.float(), sinks, sliding_window=128)
    assert (win[300:].float() - want[300:]).abs().max() < (full[300:].float() - want[300:]).abs().max() / 5


def test_sinks():
    T, Hq, Hkv = 200, 16, 2
    g = torch.Generator(device=DEV).manual_seed(9)
    q, k, v = rand((T, Hq, D), g, 2.0), rand((T, Hkv, D), g, 2.0), rand((T, Hkv, D), g)
    none = ops.attention(q, k, v, None)
    want_none = ref.attention(q.float(), k.float(), v.float(), None)
    check_close(none, want_none, bf16_attention(q, k, v, torch.full((Hq,), -1e4, device=DEV), 0, 0))
    very_negative = ops.attention(q, k, v, torch.full((Hq,), -1e4, device=DEV))
    assert torch.equal(very_negative, none)
    large = ops.attention(q, k, v, torch.full((Hq,), 60.0, device=DEV))
    assert not large.isnan().any() and large.float().abs().max() < 1e-6      # mass goes to the sink
    sinks = torch.zeros(Hq, device=DEV)
    base = ops.attention(q, k, v, sinks)
    sinks2 = sinks.clone()
    sinks2[3] = 2.0
    moved = ops.attention(q, k, v, sinks2)
    changed = (moved.float() - base.float()).abs().amax(dim=(0, 2)) > 0
    assert changed[3] and changed.sum() == 1                                # only head 3 changes
    assert moved[:, 3].float().abs().mean() < base[:, 3].float().abs().mean()


def test_prefill_varlen_batch():
    """Several sequences of different lengths and starts in one launch (one of them empty)."""
    Hq, Hkv = 64, 8
    g = torch.Generator(device=DEV).manual_seed(11)
    lens, starts = [1, 129, 0, 700, 64, 300], [0, 40, 5, 1000, 2, 130]
    L = max(s + n for s, n in zip(starts, lens)) + 10
    kc, vc = make_cache(len(lens), L, Hkv, g)
    ks, vs = [], []
    for b, (s, n) in enumerate(zip(starts, lens)):
        k, v = rand((s + n, Hkv, D), g, 2.0), rand((s + n, Hkv, D), g)
        kc[b, :s + n], vc[b, :s + n] = k, v
        ks.append(k)
        vs.append(v)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q = rand((cu[-1], Hq, D), g, 2.0)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    for window in (0, 128):
        got = ops.attention_prefill(q, kc, vc, sinks, cu, starts, sliding_window=window)
        for b, (s, n) in enumerate(zip(starts, lens)):
            if n == 0:
                continue
            qs = q[cu[b]:cu[b + 1]]
            want = ref.attention(qs.float(), ks[b].float(), vs[b].float(), sinks, start=s, sliding_window=window)
            check_close(got[cu[b]:cu[b + 1]], want, bf16_attention(qs, ks[b], vs[b], sinks, s, window))
        # the device-tensor form gives the same result
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEV)
        st_t = torch.tensor(starts, dtype=torch.int32, device=DEV)
        got2 = ops.attention_prefill(q, kc, vc, sinks, cu_t, st_t, sliding_window=window, max_q_len=max(lens))
        assert torch.equal(got, got2)


def test_prefill_chunked_equals_whole():
    """Prefill in chunks (prompt continuation) gives what one whole prefill gives."""
    T, Hq, Hkv = 700, 64, 8
    g = torch.Generator(device=DEV).manual_seed(12)
    q = rand((T, Hq, D), g, 2.0)
    kc, vc = make_cache(1, T, Hkv, g, poison=False)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    whole = ops.attention_prefill(q, kc, vc, sinks, [0, T], [0], sliding_window=128)
    parts = [ops.attention_prefill(q[a:b], kc, vc, sinks, [0, b - a], [a], sliding_window=128)
             for a, b in ((0, 100), (100, 357), (357, 700))]
    assert torch.equal(torch.cat(parts), whole)


# ---- decode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 127, 128, 129, 1000, 8192, 65536])
@pytest.mark.parametrize("window", [0, 128])
def test_decode_matches_reference(L, window):
    Hq, Hkv = 64, 8
    g = torch.Generator(device=DEV).manual_seed(L + window)
    cap = L + 37
    kc, vc = make_cache(1, cap, Hkv, g)
    k, v = rand((L, Hkv, D), g, 2.0), rand((L, Hkv, D), g)
    kc[0, :L], vc[0, :L] = k, v
    q = rand((1, Hq, D), g, 2.0)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    lens = torch.tensor([L], dtype=torch.int32, device=DEV)
    got = ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
    want = ref.attention(q.float(), k.float(), v.float(), sinks, start=L - 1, sliding_window=window)
    check_close(got, want, bf16_attention(q, k, v, sinks, L - 1, window))
    # loads started before the launch wait (the model's call) change nothing
    assert torch.equal(ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window, kv_ready=True), got)


@pytest.mark.parametrize("Hq,Hkv", [(64, 8), (8, 8), (40, 2), (64, 1)])
def test_decode_batch_mixed_lengths(Hq, Hkv):
    g = torch.Generator(device=DEV).manual_seed(Hq + Hkv)
    lens = [1, 300, 4096, 77, 129, 2000, 64]
    B, cap = len(lens), 4096 + 64
    kc, vc = make_cache(B, cap, Hkv, g)
    for b, n in enumerate(lens):
        kc[b, :n], vc[b, :n] = rand((n, Hkv, D), g, 2.0), rand((n, Hkv, D), g)
    q = rand((B, Hq, D), g, 2.0)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    for window in (0, 128):
        got = ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
        for b, n in enumerate(lens):
            k, v = kc[b, :n], vc[b, :n]
            want = ref.attention(q[b:b + 1].float(), k.float(), v.float(), sinks, start=n - 1, sliding_window=window)
            check_close(got[b:b + 1], want, bf16_attention(q[b:b + 1], k, v, sinks, n - 1, window))


@pytest.mark.parametrize("warps,chunk", [(1, 64), (1, 1024), (4, 128), (4, 512), (4, 2048), (4, 8192),
                                         (8, 256), (8, 512), (8, 4096)])
def test_decode_split_layouts(warps, chunk):
    """Every CTA shape and split length the op accepts gives the reference (the plan picks one of
    them by batch size); the merge tickets are left at zero, so a second launch agrees bit for bit."""
    Hq, Hkv = 64, 8
    g = torch.Generator(device=DEV).manual_seed(warps * 100000 + chunk)
    lens = [5000, 1, 129, 8000]
    B, cap = len(lens), 8000
    kc, vc = make_cache(B, cap, Hkv, g)
    for b, n in enumerate(lens):
        kc[b, :n], vc[b, :n] = rand((n, Hkv, D), g, 2.0), rand((n, Hkv, D), g)
    q = rand((B, Hq, D), g, 2.0)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    S = -(-cap // chunk)
    ws_o = torch.empty(B, Hq, S, D, device=DEV)
    ws_ml = torch.empty(B, Hq, S, 2, device=DEV)
    tickets = torch.zeros(B * Hkv, dtype=torch.int32, device=DEV)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    outs = []
    for kv_ready in (False, True):
        out = torch.empty(B, Hq, D, device=DEV, dtype=torch.bfloat16)
        torch.ops.gptoss_ext.attention_decode(q, kc, vc, sinks, lens_t, 0, D ** -0.5, chunk, warps, ws_o, ws_ml, tickets,
                                         out, kv_ready)
        outs.append(out)
        assert int(tickets.abs().sum()) == 0
    assert torch.equal(outs[0], outs[1])
    for b, n in enumerate(lens):
        k, v = kc[b, :n], vc[b, :n]
        want = ref.attention(q[b:b + 1].float(), k.float(), v.float(), sinks, start=n - 1)
        check_close(outs[0][b:b + 1], want, bf16_attention(q[b:b + 1], k, v, sinks, n - 1, 0))


def test_decode_plan_shapes():
    """Small batches get 8-warp CTAs (about one an SM), large ones one-warp CTAs; a 128 window is
    one split; chunk x splits always covers the range."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    for B, L, window in ((1, 8192, 0), (1, 65536, 0), (1, 2048, 0), (1, 8192, 128), (32, 8192, 0), (32, 8192, 128),
                         (3, 100, 0), (1, 1, 0)):
        chunk, splits, warps = ops.attention_decode_plan(B, 64, 8, L, window)
        rng = min(L, window) if window else L
        assert chunk * splits >= rng and chunk * (splits - 1) < rng
        assert warps == ((4 if rng <= 128 else 8) if B * 8 * 2 <= sms else 1)
        assert chunk % (32 * max(2, warps)) == 0
        if window == 128:
            assert splits == 1


def test_decode_equals_prefill_last_row():
    T, Hq, Hkv = 513, 64, 8
    g = torch.Generator(device=DEV).manual_seed(21)
    kc, vc = make_cache(1, 1024, Hkv, g, poison=False)
    q = rand((T, Hq, D), g, 2.0)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    for window in (0, 128):
        pre = ops.attention_prefill(q, kc, vc, sinks, [0, T], [0], sliding_window=window)
        dec = ops.attention_decode(q[-1:], kc, vc, sinks, [T], sliding_window=window)
        assert (pre[-1:].float() - dec.float()).abs().max() < 2e-2


# ---- KV-cache write -----------------------------------------------------------------------------

# ---- CUDA graphs --------------------------------------------------------------------------------

def test_decode_cuda_graph_replay():
    """A captured decode step replays with new lengths and queries written into its static inputs."""
    Hq, Hkv, B, cap = 64, 8, 4, 2048
    g = torch.Generator(device=DEV).manual_seed(4)
    kc, vc = make_cache(B, cap, Hkv, g, poison=False)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    q = rand((B, Hq, D), g)
    lens = torch.tensor([5, 100, 2000, 1], dtype=torch.int32, device=DEV)
    outs = {}
    for window in (0, 128):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs[window] = ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
        for new_lens in ([5, 100, 2000, 1], [2048, 1, 129, 700]):
            lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            q.copy_(rand((B, Hq, D), g))
            graph.replay()
            eager = ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
            assert torch.equal(outs[window], eager)


def test_prefill_cuda_graph_replay():
    Hq, Hkv, T = 64, 8, 300
    g = torch.Generator(device=DEV).manual_seed(8)
    kc, vc = make_cache(2, 512, Hkv, g, poison=False)
    q = rand((T, Hq, D), g)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    cu = torch.tensor([0, 100, T], dtype=torch.int32, device=DEV)
    st = torch.tensor([0, 50], dtype=torch.int32, device=DEV)
    eager = ops.attention_prefill(q, kc, vc, sinks, cu, st, max_q_len=200)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.attention_prefill(q, kc, vc, sinks, cu, st, max_q_len=200)
    graph.replay()
    assert torch.equal(out, eager)


def small_prefill(seed, batch, cache_len, start):
    """10 queries of 8 heads over a cache [batch, cache_len, 2, 64]: (g, q, kc, vc, cu, st, out)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = rand((10, 8, D), g)
    kc, vc = make_cache(batch, cache_len, 2, g, poison=False)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=DEV)
    st = torch.tensor([start], dtype=torch.int32, device=DEV)
    return g, q, kc, vc, cu, st, torch.empty_like(q)


def test_opcheck():
    g, q, kc, vc, cu, st, out = small_prefill(2, 1, 16, 3)
    torch.library.opcheck(torch.ops.gptoss_ext.attention_prefill, (q, kc, vc, None, cu, st, 10, 0, 0.125, out))


# ---- errors ---------------------------------------------------------------------------------------

def test_argument_errors():
    g, q, kc, vc, cu, st, out = small_prefill(1, 2, 32, 0)
    op = torch.ops.gptoss_ext.attention_prefill
    with pytest.raises(RuntimeError, match="head_dim 64"):
        op(rand((10, 8, 128), g), kc, vc, None, cu, st, 10, 0, 0.125, out)
    with pytest.raises(RuntimeError, match="multiple of the cache's key/value heads"):
        op(rand((10, 7, D), g), kc, vc, None, cu, st, 10, 0, 0.125, torch.empty(10, 7, D, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(RuntimeError, match="'sinks' must have dtype Float"):
        op(q, kc, vc, torch.zeros(8, device=DEV, dtype=torch.bfloat16), cu, st, 10, 0, 0.125, out)
    with pytest.raises(RuntimeError, match="'cu_seqlens' dim 0 must be 2"):
        op(q, kc, vc, None, cu[:1], st, 10, 0, 0.125, out)
    with pytest.raises(RuntimeError, match="'k_cache' must have dtype BFloat16"):
        op(q, kc.float(), vc, None, cu, st, 10, 0, 0.125, out)
    with pytest.raises(ValueError, match="do not fit the cache"):
        ops.attention_prefill(q, kc, vc, None, [0, 10], [30])
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        ops.attention_prefill(q, kc, vc, None, [0, 4], [0])
    with pytest.raises(ValueError, match="seq_lens must be in"):
        ops.attention_decode(q[:2], kc, vc, None, [0, 5])
    with pytest.raises(ValueError, match="sliding_window must be >= 0"):
        ops.attention_decode(q[:2], kc, vc, None, [1, 5], sliding_window=-1)
    ws = torch.empty(2, 8, 1, D, device=DEV)
    ml = torch.empty(2, 8, 1, 2, device=DEV)
    tickets = torch.zeros(16, dtype=torch.int32, device=DEV)
    ones = torch.ones(2, dtype=torch.int32, device=DEV)
    dec = torch.ops.gptoss_ext.attention_decode
    with pytest.raises(RuntimeError, match="chunk must be a positive multiple of 64"):
        dec(q[:2], kc, vc, None, ones, 0, 0.125, 32, 1, ws, ml, tickets, torch.empty_like(q[:2]))
    with pytest.raises(RuntimeError, match="chunk must be a positive multiple of 128 .with 4 warps"):
        dec(q[:2], kc, vc, None, ones, 0, 0.125, 64, 4, ws, ml, tickets, torch.empty_like(q[:2]))
    with pytest.raises(RuntimeError, match="warps .a CTA. must be 1, 4 or 8, got 2"):
        dec(q[:2], kc, vc, None, ones, 0, 0.125, 128, 2, ws, ml, tickets, torch.empty_like(q[:2]))
    with pytest.raises(RuntimeError, match="'tickets' needs 4 zeroed int32 counters"):
        dec(q[:2], kc, vc, None, ones, 0, 0.125, 128, 4, ws, ml, tickets[:3], torch.empty_like(q[:2]))
    with pytest.raises(RuntimeError, match="'tickets' must have dtype Int"):
        dec(q[:2], kc, vc, None, ones, 0, 0.125, 128, 4, ws, ml, tickets.long(), torch.empty_like(q[:2]))
    with pytest.raises(RuntimeError, match="'slots' must have dtype Long"):
        torch.ops.gptoss_ext.kv_write(q[:, :2], q[:, :2], torch.zeros(10, dtype=torch.int32, device=DEV), kc, vc)


# ---- paged KV cache ---------------------------------------------------------------------------------

def paged_copy(kc, vc, bs, g, window=0, lens=None):
    """The contiguous cache [B, L, Hkv, D] as a pool of shuffled bs-row blocks and its block table
    (with a window, blocks wholly before the window of each sequence's length are -1 and their pool
    rows are NaN: the kernels must never read them)."""
    B, L, Hkv, _ = kc.shape
    nb = -(-L // bs)
    perm = torch.randperm(B * nb + 3, generator=torch.Generator().manual_seed(int(g.initial_seed()) % 1000))
    table = perm[:B * nb].view(B, nb).to(torch.int32)
    kp = torch.full(((B * nb + 3) * bs, Hkv, D), float("nan"), dtype=kc.dtype, device=DEV)
    vp = kp.clone()
    for b in range(B):
        for i in range(nb):
            n = min(bs, L - i * bs)
            row = int(table[b, i]) * bs
            kp[row:row + n] = kc[b, i * bs:i * bs + n]
            vp[row:row + n] = vc[b, i * bs:i * bs + n]
            if window and lens is not None and (i + 1) * bs <= max(0, lens[b] - window - 64):
                kp[row:row + bs] = float("nan")        # given back: garbage that must not be read
                vp[row:row + bs] = float("nan")
                table[b, i] = -1
    return kp, vp, table.to(DEV)


@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize("bs", [128, 256])
def test_paged_prefill_equals_contiguous(window, bs):
    """Varlen prefill with start offsets over shuffled blocks, partial last blocks, chunks crossing
    block and window boundaries: the same bits as over the contiguous cache."""
    g = torch.Generator(device=DEV).manual_seed(7 + bs + window)
    Hq, Hkv, L = 64, 8, 700
    kc, vc = make_cache(3, L, Hkv, g, poison=False)
    pieces, starts = [130, 1, 333], [0, 250, 367]
    T = sum(pieces)
    q = rand((T, Hq, D), g)
    sinks = torch.randn(Hq, device=DEV, generator=g)
    cu = [0]
    for n in pieces:
        cu.append(cu[-1] + n)
    want = ops.attention_prefill(q, kc, vc, sinks, cu, starts, sliding_window=window)
    kp, vp, table = paged_copy(kc, vc, bs, g)
    got = ops.attention_prefill(q, kp, vp, sinks, torch.tensor(cu), torch.tensor(starts), sliding_window=window,
                                max_q_len=max(pieces), block_table=table, block_size=bs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("window", [0, 128])
def test_paged_decode_equals_contiguous(window):
    """Decode over shuffled blocks with mixed lengths (blocks wholly outside the window given back):
    the same bits as the contiguous cache, in every CTA shape the plan picks."""
    g = torch.Generator(device=DEV).manual_seed(11 + window)
    Hq, Hkv, bs = 64, 8, 128
    for B, L in ((1, 2048), (5, 1000), (64, 520)):
        kc, vc = make_cache(B, L, Hkv, g, poison=False)
        lens = [L - (7 * b) % 97 for b in range(B)]
        q = rand((B, Hq, D), g)
        sinks = torch.randn(Hq, device=DEV, generator=g)
        want = ops.attention_decode(q, kc, vc, sinks, lens, sliding_window=window)
        kp, vp, table = paged_copy(kc, vc, bs, g, window, lens)
        got = ops.attention_decode(q, kp, vp, sinks, torch.tensor(lens, dtype=torch.int32), sliding_window=window,
                                   block_table=table, block_size=bs)
        assert not got.isnan().any()
        assert torch.equal(got, want), (B, L)


def test_paged_arguments_are_checked():
    g = torch.Generator(device=DEV).manual_seed(3)
    kc, vc = make_cache(1, 256, 8, g, poison=False)
    kp, vp, table = paged_copy(kc, vc, 128, g)
    q = rand((1, 64, D), g)
    with pytest.raises(ValueError, match="power of two >= 128"):
        ops.attention_decode(q, kp, vp, None, torch.tensor([10], dtype=torch.int32), block_table=table, block_size=64)
    with pytest.raises(RuntimeError, match="'block_table' must have dtype Int"):
        torch.ops.gptoss_ext.attention_decode(q, kp, vp, None, torch.tensor([10], dtype=torch.int32, device=DEV), 0,
                                              0.125, 256, 8, torch.empty(1, 64, 1, D, device=DEV),
                                              torch.empty(1, 64, 1, 2, device=DEV),
                                              torch.zeros(64, dtype=torch.int32, device=DEV), torch.empty_like(q),
                                              False, table.long(), 128)
