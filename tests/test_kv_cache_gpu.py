"""GPU tests of the KV-cache write and the decode step's bookkeeping (decode_prep)."""

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


def test_decode_prep_matches_torch():
    """One launch == seq_lens += active; positions = seq_lens - 1; slots = where(active, row0 + pos, -1)."""
    from gptoss_ext import ops

    B, L = 37, 1000
    g = torch.Generator(device="cuda").manual_seed(3)
    seq = torch.randint(1, L - 1, (B,), device="cuda", generator=g, dtype=torch.int32)
    act = (torch.rand(B, device="cuda", generator=g) > 0.3).int()
    row0 = torch.arange(B, device="cuda") * L
    pos, slots = torch.empty(B, dtype=torch.int64, device="cuda"), torch.empty(B, dtype=torch.int64, device="cuda")
    want_seq = seq + act
    want_pos = (want_seq - 1).long()
    want_slots = torch.where(act > 0, row0 + want_pos, torch.full_like(want_pos, -1))
    ops.decode_prep(seq, act, row0, pos, slots)
    assert torch.equal(seq, want_seq) and torch.equal(pos, want_pos) and torch.equal(slots, want_slots)
    with pytest.raises(RuntimeError, match="decode_prep: 'active'"):
        torch.ops.gptoss_ext.decode_prep(seq, act[:5], row0, pos, slots)
    with pytest.raises(RuntimeError, match="decode_prep: 'slots'"):
        torch.ops.gptoss_ext.decode_prep(seq, act, row0, pos, slots.int())
