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
        return ops.linear(x, self.weight, self.bias)


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
        self.out = Linear(c.q_dim, c.hidden_size, True, device, dtype)

    def forward(self, t: torch.Tensor, positions: torch.Tensor, start: int, cache: "KVCache | None") -> torch.Tensor:
        """t: normed activations [T, H] at positions start .. start+T-1. Returns the block's output [T, H]."""
        T = t.shape[0]
        qkv = self.qkv(t)                                                   # [T, 5120]
        q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv) * self.head_dim
        q = qkv[:, :q_end].reshape(T, self.n_heads, self.head_dim)          # [T, Hq, D]
        k = qkv[:, q_end:k_end].reshape(T, self.n_kv, self.head_dim)        # [T, Hkv, D]
        v = qkv[:, k_end:].reshape(T, self.n_kv, self.head_dim)             # [T, Hkv, D]
        q, k = ops.rope(q, k, positions, **self.rope_kwargs)
        if cache is not None:
            k, v = cache.append(self.layer, start, k, v)                    # [start+T, Hkv, D]
        o = ops.attention(q, k, v, self.sinks, start=start, sliding_window=self.window)
        return self.out(o.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None, quantized: bool = True):
        super().__init__()
        c = config
        E, H, I = c.num_experts, c.hidden_size, c.intermediate_size
        self.config = c
        self.norm = RMSNorm(H, device, dtype)
        self.gate = Linear(H, E, True, device, dtype)
        if quantized:
            self.mlp1_weight = MXFP4Weight(E, 2 * I, H, device)
            self.mlp2_weight = MXFP4Weight(E, H, I, device)
        else:
            self.mlp1_weight = DenseExpertWeight(E, 2 * I, H, device, dtype)
            self.mlp2_weight = DenseExpertWeight(E, H, I, device, dtype)
        self.mlp1_bias = nn.Parameter(torch.empty(E, 2 * I, device=device, dtype=dtype), requires_grad=False)
        self.mlp2_bias = nn.Parameter(torch.empty(E, H, device=device, dtype=dtype), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ops.moe(t, self.gate.weight, self.gate.bias, self.mlp1_weight.packed, self.mlp1_bias,
                       self.mlp2_weight.packed, self.mlp2_bias, experts_per_token=c.experts_per_token,
                       swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, device=None, dtype=None, quantized: bool = True):
        super().__init__()
        self.attn = Attention(config, layer, device, dtype)
        self.mlp = MLP(config, device, dtype, quantized)


class KVCache:
    """bf16 (or the model's dtype) keys and values for one sequence.

    k[layer], v[layer]: [max_len, Hkv, D]; positions 0 .. length-1 are filled. Sliding-window
    layers keep every position here (the reference path slices what it needs)."""

    def __init__(self, config: ModelConfig, max_len: int, device=None, dtype=torch.bfloat16):
        if max_len <= 0:
            raise ValueError(f"KV cache length must be positive, got {max_len}")
        shape = (config.num_hidden_layers, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[0]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class GptOss(nn.Module):
    """gpt-oss. `model(tokens)` on a 1-D LongTensor returns logits [T, vocab] (float32)."""

    def __init__(self, config: ModelConfig, device=None, dtype=torch.bfloat16, quantized: bool = True):
        super().__init__()
        c = config
        self.config = c
        self.quantized = quantized
        self.embedding = nn.Embedding(c.vocab_size, c.hidden_size, device=device, dtype=dtype)
        self.embedding.weight.requires_grad_(False)
        self.block = nn.ModuleList(Block(c, i, device, dtype, quantized) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, device, dtype)
        self.unembedding = Linear(c.hidden_size, c.vocab_size, False, device, dtype)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.config, max_len, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [T] int64. Without a cache: the whole sequence from position 0. With a cache: the
        tokens continue it at position cache.length, and the cache advances by T.
        Returns logits [T, V] (or [1, V] with last_only) in float32."""
        c = self.config
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be int64 or int32, got {tokens.dtype}")
        tokens = tokens.to(self.device)
        T = tokens.shape[0]
        start = cache.length if cache is not None else 0
        if start + T > c.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {c.context_length}")
        positions = torch.arange(start, start + T, device=self.device)

        x = self.embedding(tokens)                                           # [T, H] residual stream
        delta = None
        for blk in self.block:
            t, x = ops.add_rms_norm(delta, x, blk.attn.norm.scale, c.rms_norm_eps)
            delta = blk.attn(t, positions, start, cache)
            t, x = ops.add_rms_norm(delta, x, blk.mlp.norm.scale, c.rms_norm_eps)
            delta = blk.mlp(t)
        t, x = ops.add_rms_norm(delta, x, self.norm.scale, c.rms_norm_eps)
        if last_only:
            t = t[-1:]
        logits = self.unembedding(t).float()                                 # [T, V]
        if cache is not None:
            cache.length = start + T
        return logits

    def prepare_kernels(self) -> bool:
        """Reorder the MXFP4 experts into the CUDA kernels' layout (once, in place) when this model
        can run the MoE kernels: on CUDA, bf16, kernels built, widths multiples of 64."""
        c = self.config
        if not (self.device.type == "cuda" and self.dtype == torch.bfloat16 and self.quantized
                and ops.kernels_available() and c.hidden_size % 64 == 0 and c.intermediate_size % 64 == 0
                and c.num_experts <= 256 and c.experts_per_token <= 8):
            return False
        for blk in self.block:
            if blk.mlp.mlp1_weight.kernel is None:
                blk.mlp.mlp1_weight.to_kernel_layout(swiglu=True)
                blk.mlp.mlp2_weight.to_kernel_layout(swiglu=False)
        return True

    def generate(self, prompt_tokens, **kwargs):
        """See `gptoss_ext.generate.generate`."""
        from .generate import generate
        return generate(self, prompt_tokens, **kwargs)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))
