"""The paged KV cache: one pool of blocks per layer group.

Full-attention layers share the block ids of the full group, sliding-window layers those of the
window group (gptoss_ext.engine.block_manager). A pool is [layers of the group, blocks * block_size,
Hkv, 64]: block b holds rows b * block_size .. + block_size - 1 of every layer of its group; a
token's slot (the row its key and value are written to) is block_table[pos // block_size] *
block_size + pos % block_size.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def can_share(config: ModelConfig) -> bool:
    """Both groups have as many layers (a block then takes the same bytes in either): one pool can
    serve both (block_manager)."""
    n_win = sum(1 for i in range(config.num_hidden_layers) if config.layer_window(i) > 0)
    return 0 < n_win and 2 * n_win == config.num_hidden_layers


class PagedKVCache:
    """shared (can_share): one tensor pair of num_full_blocks + num_window_blocks blocks that both
    groups index with their own layers (the block manager gives each block to one group at a time)."""

    def __init__(self, config: ModelConfig, num_full_blocks: int, num_window_blocks: int, block_size: int,
                 device=None, dtype=torch.bfloat16, shared: bool = False):
        self.config, self.block_size = config, block_size
        self.group_of, self.index_of = [], []
        counts = {"full": 0, "window": 0}
        for i in range(config.num_hidden_layers):
            g = "window" if config.layer_window(i) > 0 else "full"
            self.group_of.append(g)
            self.index_of.append(counts[g])
            counts[g] += 1
        self.shared = shared
        if shared and not can_share(config):
            raise ValueError("a shared pool needs as many sliding-window layers as full-attention ones")
        self.num_blocks = {"full": num_full_blocks, "window": num_window_blocks if counts["window"] else 0}
        if shared:
            total = num_full_blocks + num_window_blocks
            self.num_blocks = {"full": total, "window": total}
        self.window = max((config.layer_window(i) for i in range(config.num_hidden_layers)), default=0)
        Hkv, D = config.num_key_value_heads, config.head_dim
        self.k, self.v = {}, {}
        for g, n in counts.items():
            if shared and g == "window":
                self.k[g], self.v[g] = self.k["full"], self.v["full"]
                continue
            shape = (n, self.num_blocks[g] * block_size, Hkv, D)
            self.k[g] = torch.zeros(shape, device=device, dtype=dtype)
            self.v[g] = torch.zeros(shape, device=device, dtype=dtype)

    def layer(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        """(group, k pool [rows, Hkv, D], v pool) of layer i."""
        g = self.group_of[i]
        return g, self.k[g][self.index_of[i]], self.v[g][self.index_of[i]]

    def nbytes(self) -> int:
        seen = {id(t): t for d in (self.k, self.v) for t in d.values()}
        return sum(t.numel() * t.element_size() for t in seen.values())

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype=torch.bfloat16) -> dict[str, int]:
        """Bytes one block takes in each group (k and v of every layer of the group)."""
        per_row = 2 * config.num_key_value_heads * config.head_dim * torch.tensor([], dtype=dtype).element_size()
        n_win = sum(1 for i in range(config.num_hidden_layers) if config.layer_window(i) > 0)
        return {"full": (config.num_hidden_layers - n_win) * block_size * per_row,
                "window": n_win * block_size * per_row}
