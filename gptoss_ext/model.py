"""The gpt-oss transformer: embedding -> blocks (attention, MoE) -> RMSNorm -> unembedding.

Module and parameter names mirror OpenAI's `original/` checkpoint, so its tensors load by name:
`embedding.weight`, `block.N.attn.{norm.scale, qkv.weight, qkv.bias, sinks, out.weight, out.bias}`,
`block.N.mlp.{norm.scale, gate.weight, gate.bias, mlp1_weight.blocks, mlp1_weight.scales, mlp1_bias,
mlp2_weight.blocks, mlp2_weight.scales, mlp2_bias}`, `norm.scale`, `unembedding.weight`.
Expert weights stay packed as MXFP4 (uint8 blocks + scales); a dequantised fine-tune keeps dense
expert weights instead (`mlpN_weight.weight`, [E, rows, cols]).

Every op goes through `gptoss_ext.ops`, which runs the CUDA kernels on CUDA tensors when they are
built and the plain-PyTorch reference otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in, device=device, dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(n_out, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, weight_constant=True)


class MXFP4Weight(nn.Module):
    """Experts' weights [E, rows, cols] kept packed: blocks [E, rows, cols/32, 16], scales [E, rows, cols/32]
    (the checkpoint layout), or after `to_kernel_layout` codes + scales in the CUDA kernels' layout
    (gptoss_ext.mxfp4), the same bytes reordered."""

    def __init__(self, experts: int, rows: int, cols: int, device=None):
        super().__init__()
        self.register_buffer("blocks", torch.empty(experts, rows, cols // 32, 16, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(experts, rows, cols // 32, dtype=torch.uint8, device=device))
        self.kernel = None

    @property
    def packed(self):
        return self.kernel if self.kernel is not None else (self.blocks, self.scales)

    def to_kernel_layout(self, swiglu: bool) -> None:
        from .mxfp4 import KernelMXFP4

        k = KernelMXFP4.from_checkpoint(self.blocks, self.scales, swiglu)
        del self.blocks, self.scales
        self.register_buffer("codes", k.codes)
        self.register_buffer("kscales", k.scales)
        self.kernel = k


class DenseExpertWeight(nn.Module):
    """Experts' weights [E, rows, cols] in a floating dtype (dequantised fine-tunes)."""

    def __init__(self, experts: int, rows: int, cols: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, rows, cols, device=device, dtype=dtype), requires_grad=False)

    @property
    def packed(self) -> torch.Tensor:
        return self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None, dtype=None):
        super().__init__()
        c = config
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.layer_window(layer)
        self.rope_kwargs = c.rope_kwargs
        self.norm = RMSNorm(c.hidden_size, device, dtype)
        self.qkv = Linear(c.hidden_size, c.qkv_dim, True, device, dtype)
        self.sinks = nn.Parameter(torch.empty(c.num_attention_heads, device=device, dtype=dtype), requires_grad=False)
        self.sinks32 = None                 # float32 copy for the kernels (prepare_kernels)
        self.out = Linear(c.q_dim, c.hidden_size, True, device, dtype)

    def forward(self, t: torch.Tensor, step: "Step") -> torch.Tensor:
        """t: normed activations [T, H] of the step's tokens. Returns the block's output [T, H]."""
        T = t.shape[0]
        sinks = self.sinks32 if self.sinks32 is not None else self.sinks
        if step.paged is not None:                                          # the engine's paged cache
            return self._paged(t, step, sinks)
        if step.cache is not None and step.seq_lens is not None:           # decode: one token a sequence
            kc, vc = step.cache.k[self.layer], step.cache.v[self.layer]      # [B, max_len, Hkv, D]
            # projection + RoPE + KV-cache write (one launch on the kernel path)
            qkv = ops.linear_rope_kv(t, self.qkv.weight, self.qkv.bias, step.positions, kc, vc, step.slots,
                                     self.n_heads, self.n_kv, weight_constant=True, **self.rope_kwargs)
            q = qkv[:, :self.n_heads * self.head_dim].view(T, self.n_heads, self.head_dim)
            # kv_ready: the step's lengths and the older cache rows were written kernels ago
            o = ops.attention_decode(q, kc, vc, sinks, step.seq_lens, sliding_window=self.window, kv_ready=True)
            return self.out(o.reshape(T, -1))
        qkv = self.qkv(t)                                                   # [T, 5120]
        q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv) * self.head_dim
        q = qkv[:, :q_end].view(T, self.n_heads, self.head_dim)             # [T, Hq, D]
        k = qkv[:, q_end:k_end].view(T, self.n_kv, self.head_dim)           # [T, Hkv, D]
        v = qkv[:, k_end:].view(T, self.n_kv, self.head_dim)                # [T, Hkv, D]
        if step.cache is None:                                              # one sequence from position 0
            q, k = ops.rope(q, k, step.positions, **self.rope_kwargs)
            o = ops.attention(q, k, v, sinks, sliding_window=self.window)
        else:
            kc, vc = step.cache.k[self.layer], step.cache.v[self.layer]      # [B, max_len, Hkv, D]
            q, k = ops.rope_kv_write(q, k, v, step.positions, kc, vc, step.slots, **self.rope_kwargs)
            o = ops.attention_prefill(q, kc, vc, sinks, step.cu_seqlens, step.starts,              # varlen prefill
                                      sliding_window=self.window, max_q_len=step.max_q_len)
        return self.out(o.reshape(T, -1))


    def _paged(self, t: torch.Tensor, step: "Step", sinks) -> torch.Tensor:
        """A step of the serving engine: the first step.num_decode rows decode one token of a
        sequence each, the rest are prefill chunks; keys and values live in the paged pools."""
        T, D = t.shape[0], self.head_dim
        group, kp, vp = step.paged.layer(self.layer)                        # pools [rows, Hkv, D]
        bs = step.paged.block_size
        if step.num_decode == T:          # decode only: the fused projection + RoPE + write, as decode()
            qkv = ops.linear_rope_kv(t, self.qkv.weight, self.qkv.bias, step.positions, kp.unsqueeze(0),
                                     vp.unsqueeze(0), step.slots[group], self.n_heads, self.n_kv,
                                     weight_constant=True, **self.rope_kwargs)
            q = qkv[:, :self.n_heads * D].view(T, self.n_heads, D)
            o = ops.attention_decode(q, kp, vp, sinks, step.seq_lens, sliding_window=self.window, kv_ready=True,
                                     block_table=step.decode_tables[group], block_size=bs)
            return self.out(o.reshape(T, -1))
        qkv = self.qkv(t)
        q_end, k_end = self.n_heads * D, (self.n_heads + self.n_kv) * D
        q = qkv[:, :q_end].view(T, self.n_heads, D)
        k = qkv[:, q_end:k_end].view(T, self.n_kv, D)
        v = qkv[:, k_end:].view(T, self.n_kv, D)
        q, k = ops.rope_kv_write(q, k, v, step.positions, kp.unsqueeze(0), vp.unsqueeze(0), step.slots[group],
                                 **self.rope_kwargs)
        Bd, outs = step.num_decode, []
        if Bd:
            outs.append(ops.attention_decode(q[:Bd], kp, vp, sinks, step.seq_lens, sliding_window=self.window,
                                             block_table=step.decode_tables[group], block_size=bs))
        if T > Bd:
            outs.append(ops.attention_prefill(q[Bd:], kp, vp, sinks, step.cu_seqlens, step.starts,
                                              sliding_window=self.window, max_q_len=step.max_q_len,
                                              block_table=step.prefill_tables[group], block_size=bs))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.out(o.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None, quantized: bool = True,
                 experts: tuple[int, int] | None = None):
        super().__init__()
        c = config
        H, I = c.hidden_size, c.intermediate_size
        self.config = c
        # experts (first, count): the experts this module holds when the experts are split over
        # ranks (gptoss_ext.parallel); the gate still scores all of them
        self.experts = experts
        E = experts[1] if experts else c.num_experts
        self.norm = RMSNorm(H, device, dtype)
        self.gate = Linear(H, c.num_experts, True, device, dtype)
        if quantized:
            self.mlp1_weight = MXFP4Weight(E, 2 * I, H, device)
            self.mlp2_weight = MXFP4Weight(E, H, I, device)
        else:
            self.mlp1_weight = DenseExpertWeight(E, 2 * I, H, device, dtype)
            self.mlp2_weight = DenseExpertWeight(E, H, I, device, dtype)
        self.mlp1_bias = nn.Parameter(torch.empty(E, 2 * I, device=device, dtype=dtype), requires_grad=False)
        self.mlp2_bias = nn.Parameter(torch.empty(E, H, device=device, dtype=dtype), requires_grad=False)

    def forward(self, t: torch.Tensor, routing=None) -> torch.Tensor:
        """The experts' outputs of normed t [T, H]: uncombined fp32 [T, k, H] on the kernel path
        (the next norm sums them, ops.moe_combine_add_rms_norm), combined [T, H] otherwise."""
        c = self.config
        return ops.moe(t, self.gate.weight, self.gate.bias, self.mlp1_weight.packed, self.mlp1_bias,
                       self.mlp2_weight.packed, self.mlp2_bias, experts_per_token=c.experts_per_token,
                       swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit, combine=False, routing=routing,
                       experts=self.experts)

    def norm_route(self, delta: torch.Tensor, x: torch.Tensor):
        """The residual add + this block's RMSNorm, and the routing when the MoE kernels will run
        (one launch for decode): (normed, new residual, routing or None)."""
        c = self.config
        if ops.uses_moe_kernels(x, self.mlp1_weight.packed):
            return ops.moe_add_norm_gate_router(delta, x, self.norm.scale, c.rms_norm_eps, self.gate.weight,
                                                self.gate.bias, c.experts_per_token)
        t, x = ops.add_rms_norm(delta, x, self.norm.scale, c.rms_norm_eps)
        return t, x, None


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None, dtype=None, quantized: bool = True,
                 experts: tuple[int, int] | None = None):
        super().__init__()
        self.attn = Attention(config, layer, device, dtype)
        self.mlp = MLP(config, device, dtype, quantized, experts)


class KVCache:
    """Keys and values of `batch` sequences, bf16 (or the model's dtype).

    k, v: [layers, batch, max_len, Hkv, D]; sequence b owns batch row b and its position p is row p
    (the attention kernels' layout, see csrc/kernels/attention.h; a write goes through flat slots
    b * max_len + p, so a paged layout only changes how slots are computed). lengths[b]: positions
    filled. Sliding-window layers keep every position too."""

    def __init__(self, config: ModelConfig, max_len: int, device=None, dtype=torch.bfloat16, batch: int = 1):
        if max_len <= 0:
            raise ValueError(f"KV cache length must be positive, got {max_len}")
        if batch <= 0:
            raise ValueError(f"KV cache batch must be positive, got {batch}")
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.batch = batch
        self.lengths = [0] * batch

    @property
    def length(self) -> int:
        """Filled positions of sequence 0 (the one-sequence API)."""
        return self.lengths[0]

    @length.setter
    def length(self, n: int) -> None:
        self.lengths[0] = n

    def reset(self) -> None:
        self.lengths = [0] * self.batch

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Step:
    """What the attention layers need to know about one forward step (built by GptOss)."""

    def __init__(self, positions, cache=None, slots=None, cu_seqlens=None, starts=None, max_q_len=None,
                 seq_lens=None, paged=None, num_decode=0, decode_tables=None, prefill_tables=None):
        self.positions = positions      # [T] int64, device
        self.cache = cache              # KVCache or None (no cache: one sequence from position 0)
        self.slots = slots              # [T] int64, device: cache rows written (-1: none)
        self.cu_seqlens = cu_seqlens    # prefill: [B+1] int32, device
        self.starts = starts            # prefill: [B] int32, device
        self.max_q_len = max_q_len      # prefill: longest piece
        self.seq_lens = seq_lens        # decode: [B] int32, device (lengths including the new token)
        # The engine's steps (gptoss_ext.engine): a paged cache, rows [0, num_decode) decode one
        # token of a sequence each (seq_lens, decode_tables), the rest are prefill chunks
        # (cu_seqlens, starts relative to them, prefill_tables); slots and tables by group.
        self.paged = paged              # gptoss_ext.engine.cache.PagedKVCache
        self.num_decode = num_decode
        self.decode_tables = decode_tables      # {"full": [Bd, max_blocks] int32, "window": ...}
        self.prefill_tables = prefill_tables    # {"full": [Bp, max_blocks] int32, "window": ...}


class GptOss(nn.Module):
    """gpt-oss. `model(tokens)` on a 1-D LongTensor returns logits [T, vocab] (float32)."""

    def __init__(self, config: ModelConfig, device=None, dtype=torch.bfloat16, quantized: bool = True,
                 experts: tuple[int, int] | None = None):
        """experts: (first, count) of the experts this model holds (a rank's share, gptoss_ext.parallel)."""
        super().__init__()
        c = config
        self.config = c
        self.quantized = quantized
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.embedding.weight.requires_grad_(False)
        self.block = nn.ModuleList(Block(c, i, device, dtype, quantized, experts) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, device, dtype)
        self.unembedding = Linear(c.hidden_size, c.vocab_size, False, device, dtype)
        self.checkpoint_info = None     # where the weights came from (set by load_model: set_checkpoint_info)
        self._engine = None             # the engine generate() runs on, kept between calls (generation_engine)
        self.tp = None                  # gptoss_ext.parallel.TensorParallel of a sharded model (shard_model)

    def set_checkpoint_info(self, info) -> None:
        """Record where the weights came from (gptoss_ext.checkpoint.CheckpointInfo)."""
        self.checkpoint_info = info

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        return KVCache(self.config, max_len, self.device, self.dtype, batch=batch)

    def _run(self, tokens: torch.Tensor, step: Step, select=None, float_logits: bool = True) -> torch.Tensor:
        """Embedding -> blocks -> norm -> unembedding of the rows `select` (None: all). float32 logits
        (float_logits=False: in the model's dtype, as the unembedding gives them)."""
        tp = self.tp
        x = self._embed(tokens)                                              # [T, H] residual stream
        moe_out = None                                                       # the previous block's MoE output
        for blk in self.block:
            t, x = self._moe_residual_norm(moe_out, x, blk.attn.norm.scale)
            delta = blk.attn(t, step)
            if tp is not None:                       # the ranks' heads' shares of the out projection
                delta = tp.all_reduce(delta)
            t, x, routing = blk.mlp.norm_route(delta, x)
            moe_out = blk.mlp(t, routing)
            if tp is not None:                       # the ranks' shares (experts or their intermediate):
                if moe_out.dim() == 3:               # each rank's pairs summed per token, then the ranks' sums
                    moe_out = moe_out.sum(1, keepdim=True)
                moe_out = tp.all_reduce(moe_out)
        t, x = self._moe_residual_norm(moe_out, x, self.norm.scale)
        if select is not None:
            t = t[select]
        logits = self.unembedding(t)
        if tp is not None:                           # each rank's slice of the vocabulary
            logits = tp.all_gather_last(logits)
        return logits.float() if float_logits else logits

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes and predicts (a sharded model's config holds its rank's slice)."""
        return self.config.vocab_size * (self.tp.world if self.tp is not None else 1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embedding(tokens)
        V = self.config.vocab_size                   # this rank's rows: [rank * V, (rank + 1) * V)
        local = tokens - self.tp.rank * V
        mine = (local >= 0) & (local < V)
        x = self.embedding(local.clamp(0, V - 1)) * mine.unsqueeze(-1).to(self.dtype)
        return self.tp.all_reduce(x)

    def _moe_residual_norm(self, moe_out, x: torch.Tensor, scale: torch.Tensor):
        """The MoE output added to the residual stream (combined in the same launch) and the next
        RMSNorm: (normed, new residual). Before the first block there is nothing to add."""
        eps = self.config.rms_norm_eps
        if moe_out is None:
            return ops.add_rms_norm(None, x, scale, eps)
        return ops.moe_combine_add_rms_norm(moe_out, x, scale, eps)

    def _check_tokens(self, tokens) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.as_tensor(list(tokens), dtype=torch.int64)
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}")
        return tokens

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [T] int64. Without a cache: the whole sequence from position 0. With a cache: the
        tokens continue its sequence 0 at position cache.length, and the cache advances by T.
        Returns logits [T, V] (or [1, V] with last_only) in float32."""
        tokens = self._check_tokens(tokens)
        if tokens.numel() == 0:
            raise ValueError("tokens must be a non-empty 1-D tensor, got shape (0,)")
        if cache is None:
            T = tokens.shape[0]
            if T > self.config.context_length:
                raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
            step = Step(torch.arange(T, device=self.device))
            return self._run(tokens.to(self.device), step, slice(-1, None) if last_only else None)
        return self.prefill([tokens], cache, last_only=last_only)

    @torch.inference_mode()
    def prefill(self, pieces, cache: KVCache, last_only: bool = True, chunk: int = 8192) -> torch.Tensor:
        """Continue sequences 0 .. len(pieces)-1 of `cache` with pieces[b] (1-D token ids, may be
        empty) in one padding-free varlen pass (split into passes of at most `chunk` tokens).
        Returns float32 logits: with last_only, [len(pieces), V] for each piece's last token (rows
        of empty pieces are zero); else [sum of lengths, V]."""
        c = self.config
        if not 0 < len(pieces) <= cache.batch:
            raise ValueError(f"{len(pieces)} sequences for a cache of batch {cache.batch}")
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        pieces = [self._check_tokens(p) for p in pieces]
        for b, p in enumerate(pieces):
            end = cache.lengths[b] + p.numel()
            if end > min(cache.max_len, c.context_length):
                raise ValueError(f"sequence {b}: {end} positions exceed the "
                                 + (f"context length {c.context_length}" if end > c.context_length
                                    else f"KV cache of {cache.max_len} (it is full)"))
        for p in pieces:
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= self.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        B = len(pieces)
        done = [0] * B
        out_last = torch.zeros(B, self.vocab_size, dtype=torch.float32, device=self.device) if last_only else None
        out_all = []
        while True:
            budget, take = chunk, []
            for b in range(B):
                n = min(pieces[b].numel() - done[b], budget)
                take.append(n)
                budget -= n
            if sum(take) == 0:
                break
            toks = torch.cat([pieces[b][done[b]:done[b] + take[b]] for b in range(B)])
            cu, starts, positions, slots, last_rows, last_seqs = [0], [], [], [], [], []
            for b in range(B):
                s0, n = cache.lengths[b], take[b]
                cu.append(cu[-1] + n)
                starts.append(s0)
                positions.extend(range(s0, s0 + n))
                slots.extend(range(b * cache.max_len + s0, b * cache.max_len + s0 + n))
                if n and done[b] + n == pieces[b].numel():
                    last_rows.append(cu[-1] - 1)
                    last_seqs.append(b)
            meta = torch.tensor(cu + starts, dtype=torch.int32)
            longs = torch.tensor([positions, slots], dtype=torch.int64)
            if self.device.type == "cuda":
                meta, longs = meta.pin_memory(), longs.pin_memory()
            meta = meta.to(self.device, non_blocking=True)
            longs = longs.to(self.device, non_blocking=True)
            step = Step(longs[0], cache, longs[1], meta[:B + 1], meta[B + 1:], max(take))
            if last_only:
                if last_rows:
                    sel = torch.tensor(last_rows, device=self.device)
                    out_last[torch.tensor(last_seqs, device=self.device)] = self._run(toks.to(self.device), step, sel)
                else:
                    self._run(toks.to(self.device), step, slice(0, 0))
            else:
                out_all.append(self._run(toks.to(self.device), step))
            for b in range(B):
                cache.lengths[b] += take[b]
                done[b] += take[b]
        return out_last if last_only else torch.cat(out_all)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, cache: KVCache, seq_lens: torch.Tensor, slots: torch.Tensor,
               positions: torch.Tensor | None = None, float_logits: bool = True) -> torch.Tensor:
        """One token for each of the cache's first B sequences, all on the device (no host sync; CUDA-graph
        capturable): tokens [B] int64, seq_lens [B] int32 (lengths including the new token; the token
        sits at position seq_lens - 1), slots [B] int64 (cache rows to write, -1: none). The caller
        keeps cache.lengths. positions: seq_lens - 1 as int64 when the caller has it.
        Returns float32 logits [B, V] (float_logits=False: the unembedding's dtype)."""
        step = Step((seq_lens - 1).long() if positions is None else positions, cache, slots, seq_lens=seq_lens)
        return self._run(tokens, step, float_logits=float_logits)

    def prepare_kernels(self) -> bool:
        """Reorder the MXFP4 experts into the CUDA kernels' layout (once, in place) when this model
        can run the MoE kernels: on CUDA, bf16, kernels built, widths multiples of 64."""
        c = self.config
        if not (self.device.type == "cuda" and self.dtype == torch.bfloat16 and self.quantized
                and ops.kernels_available()):
            return False
        lim = ops.limits()
        col = lim["moe_experts_col_multiple"]        # both widths are a GEMM's K somewhere (mlp1, mlp2)
        if not (c.hidden_size % col == 0 and c.intermediate_size % col == 0
                and c.num_experts <= lim["moe_experts_max_experts"] and c.experts_per_token <= lim["moe_router_max_top_k"]):
            return False
        for blk in self.block:
            blk.attn.sinks32 = blk.attn.sinks.detach().float()
            if blk.mlp.mlp1_weight.kernel is None:
                blk.mlp.mlp1_weight.to_kernel_layout(swiglu=True)
                blk.mlp.mlp2_weight.to_kernel_layout(swiglu=False)
        return True

    def generation_engine(self, lengths: list[int], use_graph: bool | None = None):
        """The serving engine generate() runs on (gptoss_ext.engine.Engine) with room for sequences of
        these total lengths (prompt + new tokens). The model owns it: it is kept between calls (its
        KV blocks, CUDA graphs and prefix cache: a chat that resends its history reuses it) while it
        fits; a larger one replaces it (the old one freed first); release_decode_state() frees it."""
        from .engine import Engine

        cuda = self.device.type == "cuda"
        if use_graph is None:
            use_graph = cuda and ops.kernels_available() and self.dtype == torch.bfloat16
        if use_graph and not cuda:
            raise ValueError("CUDA-graph decode needs the model on a CUDA device")
        bs = 128
        # a block per 128 positions (+1: a step may run one position ahead), one spare a sequence
        need = sum(-(-(n + 1) // bs) + 1 for n in lengths)
        seqs = 1 << max(0, (len(lengths) - 1).bit_length())
        e = self._engine
        if e is not None and not e.scheduler.has_work():
            e.run_until_done()                   # a step still in flight for requests that were dropped
        if (e is not None and e.num_full_blocks >= need and e.scheduler.max_num_seqs >= seqs
                and (e.graphs is not None) == use_graph and not e.has_work()):
            return e
        self._engine = None
        del e
        if cuda:
            torch.cuda.empty_cache()
        blocks = max(16, -(-need // 16) * 16)
        self._engine = Engine(self, num_blocks=blocks, block_size=bs, max_num_seqs=seqs, max_num_batched_tokens=8192,
                              use_graphs=use_graph)
        return self._engine

    def release_decode_state(self) -> None:
        """Free the engine (KV cache, CUDA graphs) that generate() keeps between calls; the next
        generate() makes a new one."""
        self._engine = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def generate(self, prompt_tokens, **kwargs):
        """See `gptoss_ext.generate.generate`."""
        from .generate import generate
        return generate(self, prompt_tokens, **kwargs)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))
