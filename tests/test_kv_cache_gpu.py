"""GPU tests of the KV-cache write."""

import pytest
import torch

from gptoss_ext import ops
from gptoss_ext import reference as ref
from gpu_helpers import D, DEV, make_cache, rand

pytestmark = pytest.mark.gpu


def test_kv_write():
    g = torch.Generator(device=DEV).manual_seed(3)
    B, L, Hkv, T = 3, 50, 8, 20
    qkv = rand((T, (64 + 2 * Hkv) * D), g)
    k = qkv[:, 64 * D:(64 + Hkv) * D].view(T, Hkv, D)          # strided views of a fused qkv buffer
    v = qkv[:, (64 + Hkv) * D:].view(T, Hkv, D)
    kc, vc = make_cache(B, L, Hkv, g, poison=False)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.randperm(B * L, device=DEV, generator=g)[:T]
    slots[5] = -1                                               # skipped
    ops.kv_write(k, v, kc, vc, slots)
    keep = slots >= 0
    ref.kv_write(k[keep], v[keep], kc2, vc2, slots[keep])
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
