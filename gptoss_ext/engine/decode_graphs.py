"""The engine's decode-only steps as CUDA graphs.

A step in which every running request decodes one token (no prefill chunk) has a fixed shape once
its batch and its block tables' width are rounded up to a bucket, so it is captured once per
(batch bucket, width bucket) and replayed: one host-to-device copy of the step's integers (tokens,
positions, lengths, slots and block tables of both layer groups, packed in one buffer) and
one graph launch, instead of hundreds of kernel launches from Python. Rows past the step's batch
are padding: they write nothing (slot -1) and read block 0 of length 1; their logits are dropped.
Graphs share one memory pool, so a new bucket costs only its capture.
"""

from __future__ import annotations

import torch


def batch_bucket(n: int) -> int:
    """The graph batch for n decoding requests: powers of two up to 32, then multiples of 32 (the
    padding stays under 1/8 of the batch where most of the batches are)."""
    if n <= 32:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 32) * 32


def width_bucket(blocks: int, cap: int) -> int:
    """Block-table width for a longest table of `blocks` blocks: a power of two, at most cap."""
    return min(cap, 1 << max(0, (blocks - 1).bit_length()))


class DecodeGraphs:
    """Captured decode steps of one engine (its model and paged cache)."""

    def __init__(self, model, cache, groups: list[str], max_blocks: int):
        self.model, self.cache, self.groups, self.max_blocks = model, cache, groups, max_blocks
        self.dev = model.device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], list] = {}   # (B, W) -> [graph, packed, hosts, fields, logits, turn]
        # The previous step's samples (written by the engine after each graph step): a row whose
        # `src` field is i >= 0 takes its input token from sampled[i] (the step ran one ahead).
        self.sampled = torch.zeros(1024, dtype=torch.int64, device=self.dev)

    def _layout(self, B: int, W: int) -> tuple[int, dict]:
        """Fields of the packed buffer of a (B, W) step: name -> (dtype, offset in elements of that
        dtype, count). One int64 buffer: tokens, src, positions and slots (int64, as the ops take
        them), then lengths and block tables (int32, two to an int64 element)."""
        off, n = {}, 0
        for name in ["tokens", "src", "positions"] + ["slots_" + g for g in self.groups]:
            off[name] = ("i64", n, B)
            n += B
        n32 = 2 * n
        for name, size in [("seq_lens", B)] + [("table_" + g, B * W) for g in self.groups]:
            off[name] = ("i32", n32, size)
            n32 += size
        return (n32 + 1) // 2, off

    @staticmethod
    def _field(buf64, buf32, off, name):
        kind, a, size = off[name]
        return (buf64 if kind == "i64" else buf32)[a:a + size]

    def _capture(self, B: int, W: int):
        from ..model import Step

        n, off = self._layout(B, W)
        packed = torch.zeros(n, dtype=torch.int64, device=self.dev)
        packed32 = packed.view(torch.int32)

        def field(name):
            return self._field(packed, packed32, off, name)

        field("seq_lens").fill_(1)
        field("src").fill_(-1)
        for g in self.groups:
            field("slots_" + g).fill_(-1)
        # Two host buffers, used in turn: a step's copy may still be queued on the GPU while the
        # host packs the next step (decode steps run one ahead); it has run by the step after.
        host = [torch.empty(n, dtype=torch.int64, pin_memory=True) for _ in range(2)]

        def run():
            step = Step(field("positions"), slots={g: field("slots_" + g) for g in self.groups},
                        seq_lens=field("seq_lens"), paged=self.cache, num_decode=B,
                        decode_tables={g: field("table_" + g).view(B, W) for g in self.groups})
            src = field("src")
            tokens = torch.where(src >= 0, self.sampled[src.clamp(min=0)], field("tokens"))
            return self.model._run(tokens, step, float_logits=False)

        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):                   # warm-up: padding rows only, nothing is written
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            logits = run()
        entry = [graph, packed, host, off, logits, 0]
        self.graphs[(B, W)] = entry
        return entry

    def run(self, tokens: list[int], src: list[int], positions: list[int], seq_lens: list[int],
            slots: dict[str, list[int]], tables: dict[str, list[list[int]]]) -> torch.Tensor:
        """Logits [len(tokens), V] (the model's dtype) of one decode step; row i's input token is
        sampled[src[i]] where src[i] >= 0, else tokens[i]."""
        n = len(tokens)
        B = batch_bucket(n)
        if B > self.sampled.numel():
            self.sampled = torch.zeros(B, dtype=torch.int64, device=self.dev)
            self.graphs.clear()                  # they read the old buffer
        W = width_bucket(max((len(t) for ts in tables.values() for t in ts), default=1), self.max_blocks)
        entry = self.graphs.get((B, W)) or self._capture(B, W)
        graph, packed, hosts, off, logits, turn = entry
        host = hosts[turn]
        entry[5] = turn ^ 1
        h64 = host.numpy()
        h32 = h64.view("int32")

        def field(name):
            return self._field(h64, h32, off, name)

        h64[:] = 0
        field("src")[:] = -1
        field("seq_lens")[:] = 1
        for name, vals in (("tokens", tokens), ("src", src), ("positions", positions), ("seq_lens", seq_lens)):
            field(name)[:n] = vals
        for g in self.groups:
            sl = field("slots_" + g)
            sl[:n] = slots[g]
            sl[n:] = -1
            t2 = field("table_" + g).reshape(B, W)
            for i, row in enumerate(tables[g]):
                t2[i, :len(row)] = row[:W]
        packed.copy_(host, non_blocking=True)
        graph.replay()
        return logits[:n]
