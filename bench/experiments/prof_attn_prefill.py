"""One causal T=4096 prefill launch of ours and one of SDPA flash, for Nsight Compute:

    ncu --kernel-name regex:"attn_prefill|flash_fwd" --section WarpStateStats \
        --section InstructionStats python bench/experiments/prof_attn_prefill.py
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import gptoss_ext  # noqa: F401

T, HQ, HKV, D = 4096, 64, 8, 64
q = torch.randn(T, HQ, D, device="cuda").bfloat16()
k = torch.randn(1, T, HKV, D, device="cuda").bfloat16()
v = torch.randn(1, T, HKV, D, device="cuda").bfloat16()
sinks = torch.randn(HQ, device="cuda")
cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
st = torch.zeros(1, dtype=torch.int32, device="cuda")
out = torch.empty_like(q)
torch.ops.gptoss_ext.attention_prefill(q, k, v, sinks, cu, st, T, 0, D ** -0.5, out)
qh = q.transpose(0, 1).unsqueeze(0)
kh = k[0].repeat_interleave(8, 1).transpose(0, 1).unsqueeze(0)
vh = v[0].repeat_interleave(8, 1).transpose(0, 1).unsqueeze(0)
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
torch.cuda.synchronize()
