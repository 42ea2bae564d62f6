"""The engine's decode-only steps as CUDA graphs.

A step in which every running request decodes one token (no prefill chunk) has a fixed shape once
its batch and its block tables' width are rounded up to a bucket, so it is captured once per
(batch bucket, width bucket) and replayed: one host-to-device copy of the step's integers (tokens,
positions, lengths, slots and block tables of both layer groups, packed in one int32 buffer) and
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
        self.graphs: dict[tuple[int, int], tuple] = {}
        # The previous step's samples (written by the engine after each graph step): a row whose
        # `src` field is i >= 0 takes its input token from sampled[i] (the step ran one ahead).
        self.sampled = torch.zeros(1024, dtype=torch.int64, device=self.dev)

    def _layout(self, B: int, W: int) -> tuple[int, dict]:
        """Offsets of each field in the packed int32 buffer of a (B, W) step."""
        off, n = {}, 0
        for name, size in (("tokens", B), ("src", B), ("positions", B), ("seq_lens", B)):
            off[name] = (n, size)
            n += size
        for g in self.groups:
            off["slots_" + g] = (n, B)
            n += B
        for g in self.groups:
            off["table_" + g] = (n, B * W)
            n += B * W
        return n, off

    def _capture(self, B: int, W: int):
        from ..model import Step

        n, off = self._layout(B, W)
        packed = torch.zeros(n, dtype=torch.int32, device=self.dev)

        def field(name):
            a, size = off[name]
            return packed[a:a + size]

        field("seq_lens").fill_(1)
        field("src").fill_(-1)
        for g in self.groups:
            field("slots_" + g).fill_(-1)
        host = torch.empty(n, dtype=torch.int32, pin_memory=True)

        def run():
            step = Step(field("positions").long(), slots={g: field("slots_" + g).long() for g in self.groups},
                        seq_lens=field("seq_lens"), paged=self.cache, num_decode=B,
                        decode_tables={g: field("table_" + g).view(B, W) for g in self.groups})
            src = field("src").long()
            tokens = torch.where(src >= 0, self.sampled[src.clamp(min=0)], field("tokens").long())
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
        entry = (graph, packed, host, off, logits)
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
        graph, packed, host, off, logits = entry
        h = host.numpy()
        h[:] = 0
        a, _ = off["src"]
        h[a:a + B] = -1
        for name, vals in (("tokens", tokens), ("src", src), ("positions", positions), ("seq_lens", seq_lens)):
            a, _ = off[name]
            h[a:a + n] = vals
        a, _ = off["seq_lens"]
        h[a + n:a + B] = 1
        for g in self.groups:
            a, _ = off["slots_" + g]
            h[a:a + n] = slots[g]
            h[a + n:a + B] = -1
            a, _ = off["table_" + g]
            t2 = h[a:a + B * W].reshape(B, W)
            for i, row in enumerate(tables[g]):
                t2[i, :len(row)] = row[:W]
        packed.copy_(host, non_blocking=True)
        graph.replay()
        return logits[:n]

    def memory_bytes(self) -> int:
        return sum(e[1].numel() * 4 for e in self.graphs.values())
