"""KV-cache blocks: pools of fixed-size blocks, per-sequence block tables, prefix reuse by hash.

gpt-oss alternates full-attention layers with 128-token sliding-window layers, so the cache has two
block groups, each its own pool of `block_size`-token blocks shared by all layers of that kind
(block b of the full group holds positions of one sequence in every full layer's pool):
  * full group: a sequence keeps a block for every `block_size` positions it has;
  * window group: a sequence keeps only the blocks its next queries can read (the last `window`
    positions); older ones go back to the pool as the sequence moves on, so a long sequence costs
    about half the memory of keeping every layer's every position.
Block tables are lists of block ids indexed by logical block (position // block_size); window
entries that were given back are -1 (the kernels never read them).

One pool or two: when both groups have as many layers (gpt-oss alternates them), a block takes the
same bytes in either, and the groups share one pool (`shared=True`): a block goes to whichever group
needs it, so the window group holds only what the running sequences' windows use and every other
block is there for the full group (vLLM's hybrid allocator does the same). Otherwise each group
has its own pool.

Prefix reuse: a full block is identified by the hash of (the previous block's hash, its token ids).
When the last reference to a hashed block goes, the block stays in the pool's cache (LRU) until its
space is needed, and a later sequence starting with the same tokens takes it instead of computing
it again. A prefix of m blocks is reusable only if the full group has all m and the window group
has the blocks covering the last `window` positions before m * block_size.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


class NoFreeBlocks(Exception):
    """The pool has no block left (the scheduler preempts or waits; callers never see this)."""


class BlockPool:
    """`num_blocks` blocks with reference counts, a free list and a prefix cache of unreferenced
    blocks that still hold a hashed prefix (evicted least recently used first)."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.cached: OrderedDict[int, None] = OrderedDict()     # unreferenced, hashed: LRU order
        self.by_hash: dict[int, int] = {}

    def available(self) -> int:
        """Blocks an allocation can take (free ones and cached ones it may evict)."""
        return len(self.free) + len(self.cached)

    def in_use(self) -> int:
        return self.num_blocks - self.available()

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)               # evict the least recently used prefix
            del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = None
        else:
            raise NoFreeBlocks()
        self.ref[b] = 1
        return b

    def take_cached(self, h: int) -> int | None:
        """The block holding the prefix with hash h, with a new reference; None if there is none."""
        b = self.by_hash.get(h)
        if b is None:
            return None
        if self.ref[b] == 0:
            del self.cached[b]
        self.ref[b] += 1
        return b

    def has(self, h: int) -> bool:
        return h in self.by_hash

    def register(self, b: int, h: int) -> None:
        """Block b (referenced) now holds the full block with hash h; a first holder wins."""
        if self.hash_of[b] is None and h not in self.by_hash:
            self.hash_of[b] = h
            self.by_hash[h] = b

    def release(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"block {b} released more often than taken")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.hash_of[b] is not None:
                self.cached[b] = None                            # most recently used at the end
            else:
                self.free.append(b)


class _GroupView:
    """One group's side of a shared pool: its hashed blocks under their own keys (the window group's
    copy of a prefix block is another block than the full group's)."""

    def __init__(self, pool: BlockPool, tag: str):
        self.pool, self.tag = pool, tag

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def available(self) -> int:
        return self.pool.available()

    def in_use(self) -> int:
        return self.pool.in_use()

    def allocate(self) -> int:
        return self.pool.allocate()

    def release(self, b: int) -> None:
        self.pool.release(b)

    def take_cached(self, h: int) -> int | None:
        return self.pool.take_cached((self.tag, h))

    def has(self, h: int) -> bool:
        return self.pool.has((self.tag, h))

    def register(self, b: int, h: int) -> None:
        self.pool.register(b, (self.tag, h))


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """The chained hash of every full block of tokens."""
    out, h = [], 0
    for i in range(len(tokens) // block_size):
        h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


@dataclass
class SeqBlocks:
    """One sequence's block tables (logical block -> block id; -1: not held)."""
    full: list[int] = field(default_factory=list)
    window: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)    # hashes of its full blocks registered so far
    cached_tokens: int = 0                              # positions taken from the prefix cache
    window_released: int = 0                            # window entries before this one are given back


class BlockManager:
    """The two block groups of a paged cache and every sequence's tables. shared: one pool of
    num_full_blocks + num_window_blocks blocks for both groups (see the module's text)."""

    def __init__(self, num_full_blocks: int, num_window_blocks: int, block_size: int, window: int,
                 shared: bool = False):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.block_size, self.window = block_size, window
        self.shared = shared and window > 0
        if self.shared:
            self.pool = BlockPool(num_full_blocks + num_window_blocks)
            self.full, self.win = _GroupView(self.pool, "full"), _GroupView(self.pool, "window")
        else:
            self.full = BlockPool(num_full_blocks)
            self.win = BlockPool(num_window_blocks) if window > 0 else None
            self.pool = self.full
        self.seqs: dict[int, SeqBlocks] = {}
        self.hit_tokens = 0          # prompt positions served from the prefix cache
        self.query_tokens = 0        # prompt positions looked up

    # ---- what a step needs ----------------------------------------------------------------------
    def _window_first_block(self, next_pos: int) -> int:
        """The first logical block the queries at positions >= next_pos can read in a window layer."""
        return max(0, next_pos - self.window + 1) // self.block_size

    def holds(self, seq_id: int, pos: int) -> bool:
        """The sequence already has the blocks a decode query at pos needs (most steps: no block
        boundary crossed)."""
        s = self.seqs.get(seq_id)
        i = pos // self.block_size
        return (s is not None and i < len(s.full) and
                (self.win is None or (i < len(s.window) and s.window[i] >= 0
                                      and self._window_first_block(pos) >= s.window_released)))

    def can_allocate(self, seq_id: int, start: int, end: int) -> bool:
        f, w = self._needed(seq_id, start, end)
        if self.shared:
            return f + w <= self.pool.available()
        return f <= self.full.available() and (self.win is None or w <= self.win.available())

    def window_blocks_per_seq(self) -> int:
        """Window blocks a sequence holds at most (its window and the block being written)."""
        return -(-self.window // self.block_size) + 1 if self.win is not None else 0

    def capacity_tokens(self) -> int:
        """Positions one sequence can hold when it has the cache to itself."""
        n = self.full.num_blocks - (self.window_blocks_per_seq() if self.shared else 0)
        return max(0, n) * self.block_size

    def window_held(self, seq_id: int) -> int:
        """Window blocks the sequence holds (those before window_released went back)."""
        s = self.seqs.get(seq_id)
        return sum(1 for b in s.window[s.window_released:] if b >= 0) if s else 0

    def in_use(self) -> tuple[int, int]:
        """Blocks held: (full group, window group); of a shared pool, counted from the tables (the
        prefix cache's unreferenced blocks are free to take, so they are not counted)."""
        if not self.shared:
            return self.full.in_use(), self.win.in_use() if self.win is not None else 0
        win = sum(self.window_held(i) for i in self.seqs)
        return self.pool.in_use() - win, win

    def _needed(self, seq_id: int, start: int, end: int) -> tuple[int, int]:
        """Blocks to allocate for queries at positions [start, end) (keys written there, and in a
        window layer the keys those queries read)."""
        s = self.seqs.get(seq_id) or SeqBlocks()
        bs = self.block_size
        n = -(-end // bs)
        full = max(0, n - len(s.full))
        if self.win is None:
            return full, 0
        lo = self._window_first_block(start)
        win = sum(1 for i in range(lo, n) if i >= len(s.window) or s.window[i] < 0)
        return full, win

    def allocate(self, seq_id: int, start: int, end: int) -> None:
        """Hold the blocks for queries at positions [start, end): full blocks up to end, window
        blocks from the window before start up to end. Raises NoFreeBlocks (nothing taken) when a
        pool cannot give them."""
        if not self.can_allocate(seq_id, start, end):
            raise NoFreeBlocks()
        s = self.seqs.setdefault(seq_id, SeqBlocks())
        bs = self.block_size
        n = -(-end // bs)
        while len(s.full) < n:
            s.full.append(self.full.allocate())
        if self.win is not None:
            while len(s.window) < n:
                s.window.append(-1)
            for i in range(self._window_first_block(start), n):
                if s.window[i] < 0:
                    s.window[i] = self.win.allocate()

    def advance(self, seq_id: int, tokens: list[int], written: int) -> None:
        """The sequence's positions [0, written) now hold tokens[:written]: register its newly full
        blocks for prefix reuse and give back window blocks no later query can read."""
        s = self.seqs[seq_id]
        bs = self.block_size
        h = s.hashes[-1] if s.hashes else 0
        for i in range(len(s.hashes), written // bs):      # only the blocks completed since (a chain)
            h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
            s.hashes.append(h)
            self.full.register(s.full[i], h)
            if self.win is not None and i < len(s.window) and s.window[i] >= 0:
                self.win.register(s.window[i], h)
        if self.win is not None:
            first = min(self._window_first_block(written), len(s.window))
            for i in range(s.window_released, first):
                if s.window[i] >= 0:
                    self.win.release(s.window[i])
                    s.window[i] = -1
            s.window_released = max(s.window_released, first)

    def match_prefix(self, seq_id: int, prompt: list[int]) -> int:
        """Take the longest reusable cached prefix of prompt (whole blocks, at least one prompt token
        left to compute) for a new sequence; returns the number of positions it covers."""
        if seq_id in self.seqs:
            raise RuntimeError(f"sequence {seq_id} already has blocks")
        bs = self.block_size
        hashes = block_hashes(prompt[:len(prompt) - 1], bs)
        self.query_tokens += len(prompt)
        m = 0
        while m < len(hashes) and self.full.has(hashes[m]):
            m += 1
        while m > 0 and self.win is not None:
            lo = self._window_first_block(m * bs)
            if all(self.win.has(hashes[i]) for i in range(lo, m)):
                break
            m -= 1
        s = SeqBlocks()
        s.window_released = self._window_first_block(m * bs) if self.win is not None else 0
        for i in range(m):
            s.full.append(self.full.take_cached(hashes[i]))
        if self.win is not None:
            lo = self._window_first_block(m * bs)
            s.window = [-1] * m
            for i in range(lo, m):
                s.window[i] = self.win.take_cached(hashes[i])
        s.hashes = hashes[:m]
        s.cached_tokens = m * bs
        self.seqs[seq_id] = s
        self.hit_tokens += m * bs
        return m * bs

    def free(self, seq_id: int) -> None:
        """Give back every block of the sequence (hashed full blocks stay in the prefix cache)."""
        s = self.seqs.pop(seq_id, None)
        if s is None:
            return
        for b in s.full:
            self.full.release(b)
        if self.win is not None:
            for b in s.window:
                if b >= 0:
                    self.win.release(b)

    def tables(self, seq_id: int) -> SeqBlocks:
        return self.seqs[seq_id]

    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
