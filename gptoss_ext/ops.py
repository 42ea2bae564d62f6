"""The ops the model calls. CPU tensors always take the plain-PyTorch reference
(`gptoss_ext.reference`); CUDA tensors take the compiled kernels (`torch.ops.gptoss_ext.*`) where
they are built, and otherwise the reference with a one-time warning that names why."""

from __future__ import annotations

import warnings

import torch

from . import reference as ref

_warned_reference_on_cuda = False


def _reference_on_cuda(op: str) -> None:
    global _warned_reference_on_cuda
    if not _warned_reference_on_cuda:
        _warned_reference_on_cuda = True
        from ._extension import load_error
        warnings.warn(
            f"gptoss_ext: the CUDA kernels are not available ({load_error() or 'not built'}); "
            f"'{op}' and the other ops run the slow plain-PyTorch reference on the GPU. "
            "Rebuild with `pip install --no-build-isolation -e .` on a machine with nvcc.",
            RuntimeWarning, stacklevel=3)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T + bias [out] (cuBLAS on CUDA)."""
    return ref.linear(x, weight, bias)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x) * scale, residual + x); x None means no add."""
    if x is None:
        if residual.is_cuda:
            _reference_on_cuda("rms_norm")
        return ref.rms_norm(residual, scale, eps), residual
    if residual.is_cuda:
        _reference_on_cuda("add_rms_norm")
    return ref.add_rms_norm(x, residual, scale, eps)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, head_dim: int | None = None,
         theta: float = 150000.0, factor: float = 32.0, original_context: int = 4096,
         ntk_alpha: float = 1.0, ntk_beta: float = 32.0) -> tuple[torch.Tensor, torch.Tensor]:
    """YaRN RoPE on q [T, Hq, D] and k [T, Hkv, D] at positions [T]."""
    if q.is_cuda:
        _reference_on_cuda("rope")
    cos, sin = ref.rope_cos_sin(positions, q.shape[-1], theta, factor, original_context, ntk_alpha, ntk_beta)
    return ref.apply_rope(q, cos, sin), ref.apply_rope(k, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
              start: int = 0, sliding_window: int = 0) -> torch.Tensor:
    """Sink-aware causal GQA attention; see `reference.attention`."""
    if q.is_cuda:
        _reference_on_cuda("attention")
    return ref.attention(q, k, v, sinks, start=start, sliding_window=sliding_window)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, mlp1_weight, mlp1_bias,
        mlp2_weight, mlp2_bias, *, experts_per_token: int = 4, swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0) -> torch.Tensor:
    """The MoE block on normed activations [T, H]; see `reference.moe`."""
    if x.is_cuda:
        _reference_on_cuda("moe")
    return ref.moe(x, gate_weight, gate_bias, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias,
                   experts_per_token=experts_per_token, swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
