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

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T + bias [out]; cuBLAS on CUDA."""
    return ref.linear(x, weight, bias)


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
    """r = residual + x; returns (rms_norm(r) * scale, r). x None: no add (r = residual)."""
    if x is None:
        return rms_norm(residual, scale, eps), residual
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


# ---- attention and MoE (reference until their kernels land) ------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, *,
              start: int = 0, sliding_window: int = 0) -> torch.Tensor:
    """Sink-aware causal GQA attention; see `reference.attention`."""
    _reference_on_cuda("attention", q)
    return ref.attention(q, k, v, sinks, start=start, sliding_window=sliding_window)


_scratch: dict[tuple, torch.Tensor] = {}


def _router_scratch(device: torch.device, n: int) -> torch.Tensor:
    """The router's scratch (zeroed once; the kernel leaves it clean). One per device and stream,
    grown as needed, so launches on one stream never share it concurrently."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _scratch[key] = buf
    return buf


def route(logits: torch.Tensor, k: int):
    """Top-k routing of logits [T, E]: (weights [T, k] fp32, ids [T, k] int32, counts [E],
    offsets [E + 1], perm [T * k]) int32 — see `reference.route` / `reference.group_by_expert`."""
    if _use_kernel("moe_router", logits, (torch.bfloat16, torch.float32)):
        T, E = logits.shape
        dev = logits.device
        ids = torch.empty(T, k, dtype=torch.int32, device=dev)
        weights = torch.empty(T, k, dtype=torch.float32, device=dev)
        counts = torch.empty(E, dtype=torch.int32, device=dev)
        offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
        perm = torch.empty(T * k, dtype=torch.int32, device=dev)
        torch.ops.gptoss_ext.moe_router(logits.contiguous(), k, ids, weights, counts, offsets, perm,
                                        _router_scratch(dev, ((T + 31) // 32) * E + 1))
        return weights, ids, counts, offsets, perm
    weights, ids = ref.route(logits, k)
    counts, offsets, perm = ref.group_by_expert(ids, logits.shape[-1])
    return weights, ids.int(), counts, offsets, perm


def moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor, mlp1_weight, mlp1_bias,
        mlp2_weight, mlp2_bias, *, experts_per_token: int = 4, swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE block on normed activations x [T, H]: router linear (cuBLAS), top-k, the MXFP4
    experts and the weighted sum (plus `residual` when given). CUDA bf16 with the experts in the
    kernel layout runs the kernels; anything else the reference."""
    from .mxfp4 import KernelMXFP4

    kernel_weights = isinstance(mlp1_weight, KernelMXFP4) and isinstance(mlp2_weight, KernelMXFP4)
    if x.is_cuda and not getattr(_local, "reference", False) and not kernel_weights:
        _warn_once(f"the MoE kernels need MXFP4 experts in the kernel layout (got "
                   f"{type(mlp1_weight).__name__}); the MoE runs the plain-PyTorch reference on the GPU")
    elif kernel_weights and _use_kernel("moe", x):
        T = x.shape[0]
        k = experts_per_token
        logits = torch.nn.functional.linear(x, gate_weight, gate_bias)            # [T, E] bf16
        weights, ids, counts, offsets, perm = route(logits, k)
        R1, _ = mlp1_weight.shape
        H, I = mlp2_weight.shape
        h = torch.empty(T * k, R1 // 2, dtype=torch.bfloat16, device=x.device)
        torch.ops.gptoss_ext.moe_mlp1(x.contiguous(), mlp1_weight.codes, mlp1_weight.scales, mlp1_bias, perm, offsets,
                                      k, swiglu_alpha, swiglu_limit, h)
        y = torch.empty(T * k, H, dtype=torch.float32, device=x.device)
        torch.ops.gptoss_ext.moe_mlp2(h, mlp2_weight.codes, mlp2_weight.scales, mlp2_bias, perm, offsets,
                                      weights.view(-1), y)
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

    @torch.library.register_fake("gptoss_ext::rope_")
    def _(q, k, positions, inv_freq, concentration):
        return None

    @torch.library.register_fake("gptoss_ext::moe_router")
    def _(logits, k, ids, weights, counts, offsets, perm, scratch):
        return None

    @torch.library.register_fake("gptoss_ext::moe_mlp1")
    def _(x, codes, scales, bias, perm, offsets, top_k, alpha, limit, out):
        return None

    @torch.library.register_fake("gptoss_ext::moe_mlp2")
    def _(h, codes, scales, bias, perm, offsets, route_weights, out):
        return None

    @torch.library.register_fake("gptoss_ext::moe_combine")
    def _(y, residual, top_k, out):
        return None


if _extension.load(strict=False):
    _register_fakes()
