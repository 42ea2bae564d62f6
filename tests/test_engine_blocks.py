"""The paged cache's block manager: allocation, window blocks given back, prefix reuse by hash with
reference counts and LRU eviction (CPU, no model)."""

import pytest

from gptoss_ext.engine.block_manager import BlockManager, BlockPool, NoFreeBlocks, block_hashes


def test_pool_refcounts_cache_and_lru_eviction():
    p = BlockPool(3)
    a, b, c = p.allocate(), p.allocate(), p.allocate()
    with pytest.raises(NoFreeBlocks):
        p.allocate()
    p.register(a, 11)
    p.register(b, 22)
    p.release(a)
    p.release(b)                                 # both cached, a the least recently used
    assert p.available() == 2 and p.has(11) and p.has(22)
    assert p.take_cached(22) == b and p.ref[b] == 1
    d = p.allocate()                             # evicts a (the LRU cached prefix)
    assert d == a and not p.has(11) and p.has(22)
    p.release(c)
    assert p.allocate() == c                     # an unhashed block goes back to the free list
    with pytest.raises(RuntimeError, match="released more often"):
        p.release(c) or p.release(c)


def test_full_and_window_tables_and_window_blocks_given_back():
    bm = BlockManager(num_full_blocks=64, num_window_blocks=8, block_size=16, window=32)
    toks = list(range(200))
    bm.allocate(1, 0, 100)                       # a 100-token prefill chunk
    s = bm.tables(1)
    assert len(s.full) == 7 and all(b >= 0 for b in s.window[:7])
    bm.advance(1, toks, 100)
    # later queries (position >= 100) read keys >= 69: window blocks 0..3 are given back
    assert s.window[:4] == [-1] * 4 and all(b >= 0 for b in s.window[4:7])
    assert bm.win.in_use() == 3
    for pos in range(100, 180):                  # decode: one position a step
        bm.allocate(1, pos, pos + 1)
        bm.advance(1, toks, pos + 1)
        assert bm.win.in_use() <= 3              # never more than the window (+1 block) a sequence
    assert len(s.full) == -(-180 // 16)
    bm.free(1)
    assert bm.full.in_use() == 0 and bm.win.in_use() == 0


def test_out_of_blocks_takes_nothing():
    bm = BlockManager(num_full_blocks=4, num_window_blocks=4, block_size=16, window=16)
    bm.allocate(1, 0, 48)
    before = (bm.full.available(), bm.win.available())
    with pytest.raises(NoFreeBlocks):
        bm.allocate(2, 0, 40)                    # needs 3 full blocks, 1 is left
    assert (bm.full.available(), bm.win.available()) == before and 2 not in bm.seqs


def test_prefix_reuse_needs_the_window_blocks_too():
    bs, W = 16, 32
    bm = BlockManager(num_full_blocks=64, num_window_blocks=64, block_size=bs, window=W)
    prompt = list(range(1000, 1000 + 100))
    bm.allocate(1, 0, 100)
    bm.advance(1, prompt, 100)
    bm.free(1)                                   # finished: its hashed blocks stay cached
    # the same prompt + more: 6 whole blocks of the first 99 tokens are cached in the full group,
    # but the window group kept only blocks 4, 5 (6 was never full): the match ends at 6 blocks
    # only if blocks 4 and 5 (positions 64..95, the window before 96) are there
    got = bm.match_prefix(2, prompt + [7, 8, 9])
    assert got == 6 * bs
    s = bm.tables(2)
    assert len(s.full) == 6 and s.window[4] >= 0 and s.window[5] >= 0 and s.window[:4] == [-1] * 4
    assert bm.hit_tokens == 96
    # a prompt that diverges in block 2 reuses two blocks, if their window blocks are still cached:
    # they were given back early and evicted only under pressure, so here they are
    other = prompt[:40] + [5] * 60
    assert bm.match_prefix(3, other) in (0, 2 * bs)
    bm.free(2)
    bm.free(3)


def test_prefix_reuse_leaves_a_token_to_compute_and_counts_references():
    bm = BlockManager(num_full_blocks=16, num_window_blocks=16, block_size=16, window=0)
    prompt = list(range(64))
    bm.allocate(1, 0, 64)
    bm.advance(1, prompt, 64)
    assert bm.match_prefix(2, prompt) == 48      # 4 blocks cached, the last token must be computed
    assert all(bm.full.ref[b] == 2 for b in bm.tables(2).full)
    bm.free(1)
    assert all(bm.full.ref[b] == 1 for b in bm.tables(2).full)


def test_block_hashes_chain():
    a = block_hashes(list(range(48)), 16)
    b = block_hashes(list(range(32)) + [0] * 16, 16)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes([1] * 16 + [2] * 16, 16)[1] != block_hashes([3] * 16 + [2] * 16, 16)[1]


def test_one_pool_for_both_groups():
    """shared: the window group's blocks come from the full group's pool and go back to it; each
    group's copy of a prefix block is its own (the window's is another block)."""
    bm = BlockManager(num_full_blocks=6, num_window_blocks=2, block_size=16, window=16, shared=True)
    assert bm.pool.num_blocks == 8 and bm.window_blocks_per_seq() == 2
    assert bm.capacity_tokens() == (8 - 2) * 16
    toks = list(range(1, 100))
    bm.allocate(1, 0, 48)                        # a prefill of 48: 3 full blocks and 3 window blocks
    assert bm.in_use() == (3, 3) and bm.pool.available() == 2
    assert not set(bm.tables(1).full) & set(bm.tables(1).window)
    assert not bm.can_allocate(2, 0, 32)         # 2 full + 2 window > the 2 left: the window counts too
    assert bm.can_allocate(2, 0, 16)
    bm.advance(1, toks, 48)                      # registers 3 prefix blocks in both groups; the window
    assert bm.in_use() == (3, 1) and bm.pool.available() == 4    # blocks 0, 1 go back to the one pool
    bm.free(1)
    assert bm.pool.available() == 8 and bm.in_use() == (0, 0)
    assert bm.match_prefix(3, toks[:49]) == 48   # the full copies and the window copy are found apart
    s = bm.tables(3)
    assert len(s.full) == 3 and s.window[2] >= 0 and s.window[2] not in s.full
    bm.free(3)
    for i in range(4):                           # every block serves either group
        bm.allocate(10 + i, 0, 1)
    assert bm.in_use() == (4, 4) and bm.pool.available() == 0
