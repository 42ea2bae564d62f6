"""MXFP4 expert weights: the checkpoint layout and the kernels' layout.

Checkpoint layout (both released formats): blocks [E, R, C/32, 16] uint8, two FP4 (E2M1) codes a
byte, low nibble first; scales [E, R, C/32] uint8 (E8M0).

Kernel layout (written once at load by `to_kernel_layout`, 4.25 bits per weight as before):
  codes  [E, R/16, C/64, 32, 16] uint8: for each 16-row x 64-column tile, lane L of a warp reads 16
         bytes holding exactly the codes of its mma.m16n8k16 A fragments for the tile's four
         16-column steps. Word s (bytes 4s..4s+3, little endian) is step s and holds the 8 codes of
         the lane's four fp16x2 A registers h = 0..3, half j = 0 (low) / 1 (high): with g = L // 4,
         q = L % 4 that code is the weight at
             row g + 8 * (h % 2), column 16 s + 2 q + 8 * (h // 2) + j.
         Its 3 magnitude bits (E2M1 without the sign) sit at bit MAG[h] + 16 j and its sign at
         bit SIGN[h] + 16 j, MAG = (0, 3, 6, 9), SIGN = (13, 14, 12, 15). The kernel's fp16 value
         of a code is its magnitude bits at fp16 bits 9..11 and its sign at bit 15 (= E2M1 * 2^-14,
         exact, subnormals included); this placement gets all four registers of a word with 11
         integer operations instead of 16:
             a0 = (w << 9) & 0x0E000E00 | (w << 2) & 0x80008000
             a1 = (w << 6) & 0x0E000E00 | (w << 1) & 0x80008000
             a2 = (w << 3) & 0x8E008E00
             a3 =  w       & 0x8E008E00
  scales [E, R/16, C/64, 8, 4] uint8: for row pair (g, g + 8) of the tile, the scales of
         (g, group 0), (g + 8, group 0), (g, group 1), (g + 8, group 1) (group = 32 columns).
For mlp1 (`swiglu=True`) the rows of tile t are reordered so tile row i < 8 is the gate row
2 (8 t + i) and tile row i + 8 its linear partner 2 (8 t + i) + 1: SwiGLU then happens in the
registers that hold both.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _row_order(R: int, swiglu: bool, device: torch.device) -> torch.Tensor:
    """Kernel-layout row -> checkpoint row."""
    pr = torch.arange(R, device=device)
    if not swiglu:
        return pr
    t, i = pr // 16, pr % 16
    return torch.where(i < 8, 2 * (8 * t + i), 2 * (8 * t + i - 8) + 1)


@functools.lru_cache(maxsize=8)
def _fragment_index(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile row, tile column) of code p = h + 4 j of word s of lane L, as [32, 4, 8] tensors."""
    L = torch.arange(32, device=device).view(32, 1, 1)
    s = torch.arange(4, device=device).view(1, 4, 1)
    p = torch.arange(8, device=device).view(1, 1, 8)
    g, q, h, j = L // 4, L % 4, p % 4, p // 4
    row = (g + 8 * (h % 2)).expand(32, 4, 8)
    col = 16 * s + 2 * q + 8 * (h // 2) + j
    return row.contiguous(), col.expand(32, 4, 8).contiguous()


def _unpack(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes -> [..., G*32] codes (low nibble first)."""
    b = blocks
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*b.shape[:-2], -1)


MAG_BIT = (0, 3, 6, 9)       # register h -> first bit of its low half's 3 magnitude bits in a word
SIGN_BIT = (13, 14, 12, 15)  # register h -> its low half's sign bit (high half: + 16)


def _pack_words(frag: torch.Tensor) -> torch.Tensor:
    """[..., 8] codes (p = h + 4 j) -> [..., 4] bytes of the little-endian word described above."""
    c = frag.to(torch.int32)
    w = torch.zeros(frag.shape[:-1], dtype=torch.int32, device=frag.device)
    for p in range(8):
        h, j = p % 4, p // 4
        w |= ((c[..., p] & 7) << (MAG_BIT[h] + 16 * j)) | ((c[..., p] >> 3) << (SIGN_BIT[h] + 16 * j))
    return torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def _unpack_words(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `_pack_words`: [..., 4] bytes -> [..., 8] codes."""
    b = codes.to(torch.int32)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    out = []
    for p in range(8):
        h, j = p % 4, p // 4
        out.append(((w >> (MAG_BIT[h] + 16 * j)) & 7) | (((w >> (SIGN_BIT[h] + 16 * j)) & 1) << 3))
    return torch.stack(out, dim=-1).to(torch.uint8)


def _check_shapes(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 3 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise ValueError(f"one expert's MXFP4 weight must be blocks [R, C/32, 16] and scales [R, C/32], "
                         f"got {tuple(blocks.shape)} and {tuple(scales.shape)}")
    R, C = blocks.shape[0], blocks.shape[1] * 32
    if R % 16 or C % 64:
        raise ValueError(f"the MoE kernels need rows % 16 == 0 and columns % 64 == 0, got {R} x {C}")
    return R, C


def expert_to_kernel_layout(blocks: torch.Tensor, scales: torch.Tensor, swiglu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert: blocks [R, C/32, 16], scales [R, C/32] -> codes [R/16, C/64, 32, 16], scales [R/16, C/64, 8, 4]."""
    R, C = _check_shapes(blocks, scales)
    order = _row_order(R, swiglu, blocks.device)
    nib = _unpack(blocks)[order]                                            # [R, C] codes, kernel row order
    nib = nib.view(R // 16, 16, C // 64, 64).permute(0, 2, 1, 3)           # [T, Cc, 16 rows, 64 cols]
    row, col = _fragment_index(blocks.device)
    frag = nib[:, :, row, col]                                              # [T, Cc, 32, 4, 8]
    codes = _pack_words(frag).reshape(R // 16, C // 64, 32, 16)
    sc = scales[order].view(R // 16, 2, 8, C // 64, 2)                      # [T, h, g, Cc, grp]
    ksc = sc.permute(0, 3, 2, 4, 1).reshape(R // 16, C // 64, 8, 4)
    return codes.contiguous(), ksc.contiguous()


def expert_from_kernel_layout(codes: torch.Tensor, kscales: torch.Tensor, swiglu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `expert_to_kernel_layout` (for the reference path and tests)."""
    T, Cc = codes.shape[0], codes.shape[1]
    R, C = 16 * T, 64 * Cc
    frag = _unpack_words(codes.view(T, Cc, 32, 4, 4))                       # [T, Cc, 32, 4, 8]
    row, col = _fragment_index(codes.device)
    nib = torch.empty(T, Cc, 16, 64, dtype=torch.uint8, device=codes.device)
    nib[:, :, row, col] = frag
    nib = nib.permute(0, 2, 1, 3).reshape(R, C)
    sc = kscales.view(T, Cc, 8, 2, 2).permute(0, 4, 2, 1, 3).reshape(R, C // 32)
    order = _row_order(R, swiglu, codes.device)
    blocks_k = (nib[:, 0::2] | (nib[:, 1::2] << 4)).view(R, C // 32, 16)
    blocks = torch.empty_like(blocks_k)
    scales = torch.empty_like(sc)
    blocks[order] = blocks_k
    scales[order] = sc
    return blocks, scales


class KernelMXFP4:
    """All experts of one weight in the kernel layout (`codes`, `scales`)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, swiglu: bool):
        self.codes, self.scales, self.swiglu = codes, scales, swiglu
        # The largest E8M0 scale byte: <= 128 lets the prefill kernel fold scales into fp16 weights.
        self.max_scale = int(scales.max()) if scales.numel() else 0

    @classmethod
    def from_checkpoint(cls, blocks: torch.Tensor, scales: torch.Tensor, swiglu: bool) -> "KernelMXFP4":
        """Converts expert by expert (transient memory of one expert) into new tensors."""
        parts = [expert_to_kernel_layout(blocks[e], scales[e], swiglu) for e in range(blocks.shape[0])]
        return cls(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), swiglu)

    @property
    def num_experts(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of one expert's weight."""
        return 16 * self.codes.shape[1], 64 * self.codes.shape[2]

    def checkpoint_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_from_kernel_layout(self.codes[e], self.scales[e], self.swiglu)
