"""Continuous batching: which tokens each engine step computes.

Every step takes the next token of every running sequence (decode) plus prefill chunks of
sequences still reading their prompt, within a token budget, so a long prompt is read over several
steps while everybody else keeps decoding (chunked prefill). Requests join at the next step and
leave the step they finish; their blocks go back at once.

A new request is admitted only while the free blocks exceed its prompt's plus a reserve for the
running requests to grow into (`decode_reserve`: that share of the tokens each may still generate,
by max_tokens and the context; 0 admits whenever the prompt fits), which keeps preemption rare when
the cache is the limit (120b on one 80 GB GPU). When the cache runs out of blocks all the same,
the newest running sequence is preempted: its blocks are freed
and it waits at the head of the queue to be recomputed (its prompt plus what it generated so far)
before any new request is admitted. A request that could never fit (longer than the context, or
than the whole cache) is refused when it is added, with the reason.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager


@dataclass
class SamplingParams:
    """How one request samples and when it stops (validated by `check`)."""
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_stops: bool = False           # benchmarks: always generate max_tokens

    def check(self) -> None:
        """ValueError naming the field that is out of range."""
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")


# Request states
WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)                    # compared by identity (the per-step paths test membership)
class Request:
    """A sequence in the engine: its prompt, what it generated, where it stands."""
    id: int
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    state: str = WAITING
    computed: int = 0                   # positions whose keys/values are in the cache
    finish_reason: str | None = None    # "stop", "length", "abort", or "error: ..."
    first_token_time: float | None = None
    preemptions: int = 0
    cached_tokens: int = 0              # prompt positions served from the prefix cache (last admission)
    pending: int = 0                    # tokens sampled by a launched step, not back on the host yet

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_slice(self, a: int, b: int) -> list[int]:
        """tokens[a:b] without building the whole list (the per-step paths)."""
        P = len(self.prompt)
        if b <= P:
            return self.prompt[a:b]
        if a >= P:
            return self.output[a - P:b - P]
        return self.prompt[a:] + self.output[:b - P]

    @property
    def view(self) -> "_TokenView":
        return _TokenView(self)

    @property
    def num_tokens(self) -> int:
        """Positions it has: prompt, output and the tokens still on their way (pending)."""
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def prefilling(self) -> bool:
        """More than its newest token is uncomputed (the prompt, or everything after a preemption):
        it reads a chunk; otherwise its newest token is the input of a decode step."""
        return self.computed < self.num_tokens - 1


@dataclass
class Chunk:
    """Positions [start, end) of a request computed in this step; `sample`: its last position
    predicts the request's next token (a decode, or the last chunk of a prefill)."""
    req: Request
    start: int
    end: int
    sample: bool


@dataclass
class StepPlan:
    decodes: list[Chunk] = field(default_factory=list)    # one position each
    prefills: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.end - c.start for c in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class _TokenView:
    """A request's tokens (prompt + output) for slicing, without concatenating them."""
    __slots__ = ("req",)

    def __init__(self, req: Request):
        self.req = req

    def __len__(self) -> int:
        return self.req.num_tokens

    def __getitem__(self, s: slice) -> list[int]:
        a, b, _ = s.indices(self.req.num_tokens)
        return self.req.token_slice(a, b)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_model_len: int, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, decode_reserve: float = 0.5,
                 max_prefill_with_decodes: int | None = None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0 <= decode_reserve <= 1:
            raise ValueError(f"decode_reserve must be in [0, 1], got {decode_reserve}")
        self.blocks = blocks
        self.decode_reserve = decode_reserve
        if max_prefill_with_decodes is not None and max_prefill_with_decodes < 1:
            raise ValueError(f"max_prefill_with_decodes must be >= 1, got {max_prefill_with_decodes}")
        self.max_prefill_with_decodes = max_prefill_with_decodes
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()

    # ---- requests in and out --------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams, vocab_size: int) -> None:
        """ValueError naming what is wrong with a request (nothing of the engine is touched)."""
        params.check()
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token {bad!r} is outside the vocabulary [0, {vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.max_model_len} "
                             "(and at least one must be left to generate)")
        capacity = self.blocks.capacity_tokens()
        if len(prompt) + 1 > capacity:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the whole KV cache holds {capacity}")

    def add(self, prompt: list[int], params: SamplingParams, vocab_size: int) -> Request:
        self.check(prompt, params, vocab_size)
        req = Request(next(self._ids), list(prompt), params)
        self.waiting.append(req)
        return req

    def abort(self, req: Request, reason: str = "abort") -> None:
        """Finish a request now (cancelled, or failed) and give back its blocks."""
        if req.state == FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.id)
        req.state, req.finish_reason = FINISHED, reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------------
    def _preempt(self, plan: StepPlan) -> Request | None:
        """Free the newest running request's blocks and put it back at the head of the queue."""
        if not self.running:
            return None
        victim = max(self.running, key=lambda r: r.arrival)
        self.running.remove(victim)
        self.blocks.free(victim.id)
        victim.state, victim.computed = WAITING, 0
        victim.preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)
        return victim

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        # 1. decodes of running sequences, oldest first; a sequence that needs a block it cannot get
        #    makes the newest sequence give way (possibly itself)
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.state != RUNNING or req.prefilling or budget == 0:
                continue
            pos = req.num_tokens - 1
            if self.blocks.holds(req.id, pos):
                plan.decodes.append(Chunk(req, pos, pos + 1, True))
                budget -= 1
                continue
            while not self.blocks.can_allocate(req.id, pos, pos + 1):
                if self._preempt(plan) is req:
                    break
            if req.state != RUNNING:
                continue
            self.blocks.allocate(req.id, pos, pos + 1)
            plan.decodes.append(Chunk(req, pos, pos + 1, True))
            budget -= 1
        # 2. prefill chunks: running sequences still reading their tokens, then waiting ones (a step
        #    that decodes may cap them, so a long prompt does not stretch everybody's next token)
        if plan.decodes and self.max_prefill_with_decodes is not None:
            budget = min(budget, self.max_prefill_with_decodes)
        for req in [r for r in self.running if r.prefilling]:
            budget = self._prefill_chunk(req, budget, plan)
        reserved = None
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if self.running and self.decode_reserve > 0:
                # Admission keeps blocks back for the running requests to grow into (a share of what
                # they may still generate), so that they are not preempted and recomputed later.
                if reserved is None:
                    reserved = self._decode_reserve_blocks(self.running)
                prompt_blocks = -(-(req.num_tokens - req.computed) // self.blocks.block_size)
                if self.blocks.shared:       # and its window's blocks, from the same pool
                    prompt_blocks += self.blocks.window_blocks_per_seq()
                if self.blocks.full.available() - prompt_blocks < reserved:
                    break
            if req.computed == 0 and req.id not in self.blocks.seqs:
                hit = self.blocks.match_prefix(req.id, req.tokens)
                req.computed = req.cached_tokens = hit
            before = len(plan.prefills)
            budget = self._prefill_chunk(req, budget, plan)
            if len(plan.prefills) == before:          # no blocks for even a first chunk: wait
                if req.computed == req.cached_tokens:
                    self.blocks.free(req.id)
                    req.computed = 0
                break
            self.waiting.popleft()
            req.state = RUNNING
            self.running.append(req)
            if reserved is not None:
                reserved += self._decode_reserve_blocks([req])
        return plan

    # Tokens a request is expected to generate at most, for the reserve: a max_tokens left at the
    # context (128k) says nothing about how long it runs.
    RESERVE_CLIP_TOKENS = 4096

    def _decode_reserve_blocks(self, reqs) -> int:
        """Blocks the requests will still take for decode_reserve of the tokens they may still
        generate (max_tokens, the context, at most RESERVE_CLIP_TOKENS) beyond the blocks they hold."""
        bs, total = self.blocks.block_size, 0
        for r in reqs:
            left = min(r.params.max_tokens - len(r.output) - r.pending, self.max_model_len - r.num_tokens,
                       self.RESERVE_CLIP_TOKENS)
            end = r.num_tokens + int(max(0, left) * self.decode_reserve)
            s = self.blocks.seqs.get(r.id)
            total += max(0, -(-end // bs) - (len(s.full) if s else 0))
            if self.blocks.shared:           # one pool: its window blocks come from the same blocks
                total += max(0, self.blocks.window_blocks_per_seq() - self.blocks.window_held(r.id))
        return total

    def _prefill_chunk(self, req: Request, budget: int, plan: StepPlan) -> int:
        """Schedule the next chunk of a request's uncomputed tokens within the budget and the free
        blocks (shrinking it to what fits); returns the budget left."""
        start, total = req.computed, req.num_tokens
        end = min(total, start + budget)
        while end > start and not self.blocks.can_allocate(req.id, start, end):
            end = start + (end - start) // 2
        if end <= start:
            return budget
        self.blocks.allocate(req.id, start, end)
        plan.prefills.append(Chunk(req, start, end, end == total))
        return budget - (end - start)

    def schedule_ahead(self) -> StepPlan | None:
        """The next decode-only step while the current one's tokens are still on the GPU (each
        running request's newest token pending): every running request decodes its next position.
        None when the step must be scheduled the usual way, after those tokens are back (a request
        waits or prefills, a block is short)."""
        if self.waiting:
            return None
        plan = StepPlan()
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.prefilling:
                return None
            if len(req.output) + req.pending >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                continue                   # its last token is on the way: it ends when that comes back
            pos = req.num_tokens - 1
            if not self.blocks.holds(req.id, pos):
                if not self.blocks.can_allocate(req.id, pos, pos + 1):
                    return None
                self.blocks.allocate(req.id, pos, pos + 1)
            plan.decodes.append(Chunk(req, pos, pos + 1, True))
        if not plan or len(plan.decodes) > self.max_num_batched_tokens:
            return None
        return plan

    def launched(self, plan: StepPlan) -> None:
        """The step is on the GPU: its positions count as computed, its samples as pending."""
        for c in plan.decodes + plan.prefills:
            if c.req.state == RUNNING:
                c.req.computed = max(c.req.computed, c.end)
                c.req.pending += c.sample

    def update(self, plan: StepPlan, sampled: dict[int, int], now: float | None = None) -> list[Request]:
        """After the step ran: the chunks' positions are computed; each sampling chunk's request
        gets its sampled token (request id -> token). Returns the requests that finished."""
        now = time.perf_counter() if now is None else now
        done = []
        for c in plan.decodes + plan.prefills:
            req = c.req
            if req.state == FINISHED:            # aborted, or ended while this step ran ahead
                continue
            req.computed = max(req.computed, c.end)
            if c.sample:
                req.pending = max(0, req.pending - 1)
                req.output.append(sampled[req.id])
            known = len(req.prompt) + len(req.output)
            self.blocks.advance(req.id, req.view, min(req.computed, known))
            if not c.sample:
                continue
            tok = req.output[-1]
            if req.first_token_time is None:
                req.first_token_time = now
            p = req.params
            reason = None
            if not p.ignore_stops and tok in p.stop_token_ids:
                reason = "stop"
            elif len(req.output) >= p.max_tokens:
                reason = "length"
            elif known >= self.max_model_len:
                reason = "length"
            if reason:
                self.running.remove(req)
                self.blocks.free(req.id)
                req.state, req.finish_reason = FINISHED, reason
                done.append(req)
        return done
