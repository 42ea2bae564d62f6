"""The engine loop: requests in, a scheduled step at a time through the model over the paged cache,
tokens out to each request as soon as they are sampled.

    engine = Engine(model, num_blocks=512)
    handle = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    for token in engine.stream(handle):          # runs steps until this request is done
        ...
    engine.generate([p1, p2, p3], SamplingParams(...))   # all at once: lists of tokens

Requests can be added between steps at any time (from another thread too: `add_request` and
`abort` take a lock); `step()` runs one scheduled step. Tokens reach a request's handle (an
iterator, an asyncio-friendly `aiter()`, or an `on_token` callback) after each step.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .block_manager import BlockManager
from .cache import PagedKVCache, can_share
from .scheduler import FINISHED, Request, SamplingParams, Scheduler, StepPlan


class EngineStepError(RuntimeError):
    """A step failed: the requests it ran (`request_ids`) are finished with an error reason."""

    def __init__(self, message: str, request_ids: list[int]):
        super().__init__(message)
        self.request_ids = request_ids


@dataclass
class _Launched:
    """A step on its way: its plan, the requests it samples for (in order), the host buffer its
    tokens are copied to and the event that says they are there."""
    plan: StepPlan
    reqs: list
    host: torch.Tensor
    ready: object
    graph: bool
    gpu: tuple | None = None      # CUDA events around the step's launches (its GPU time, for `profile`)


@dataclass
class RequestHandle:
    """What a caller holds of a request: its tokens as they come, and how it ended."""
    request: Request
    on_token: Callable[[int], None] | None = None
    _pending: deque = field(default_factory=deque)
    _waiters: list = field(default_factory=list)        # (loop, asyncio.Event) of async consumers
    # every token is in _pending: set by the delivery that ends the request, after its tokens (the
    # request's state turns finished earlier, on the stepping thread, before its last token is out)
    _closed: bool = False

    @property
    def finished(self) -> bool:
        return self.request.state == FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.request.finish_reason

    def _deliver(self, tokens: list[int], done: bool, wake: dict | None = None) -> None:
        """Queue the tokens and wake the async consumers (or, given `wake`, add their events to it,
        loop -> events, for one wake-up a loop for a whole step)."""
        self._pending.extend(tokens)
        if self.on_token:
            for t in tokens:
                self.on_token(t)
        if done:
            self._closed = True
        for loop, ev in self._waiters:
            if wake is None:
                loop.call_soon_threadsafe(ev.set)
            else:
                wake.setdefault(loop, []).append(ev)


def _set_all(events) -> None:
    for ev in events:
        ev.set()


class Engine:
    def __init__(self, model, *, num_blocks: int | None = None, block_size: int = 128,
                 num_window_blocks: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 max_model_len: int | None = None, memory_fraction: float = 0.9, seed: int = 0,
                 use_graphs: bool | None = None, decode_reserve: float = 0.5,
                 max_prefill_with_decodes: int | None = None, broadcast: bool = False):
        """broadcast (a model split over ranks, gptoss_ext.parallel): rank 0 takes the requests and
        schedules; each step's inputs go to the other ranks once (one message on the group's CPU
        side), which run the same step from `follow()`. Without it every rank drives its own engine
        with the same requests (a program every rank runs alike, as generate() under torchrun)."""
        from .. import ops

        tp = getattr(model, "tp", None)
        self._tp = tp if tp is not None and tp.world > 1 else None
        self.broadcast = bool(broadcast) and self._tp is not None
        self.leader = not self.broadcast or self._tp.rank == 0
        if self.broadcast and self.leader:   # the other ranks make the same engine (follow_engines)
            prev = getattr(self._tp, "engine", None)
            if prev is not None:
                prev.close()
            spec = dict(num_blocks=num_blocks, block_size=block_size, num_window_blocks=num_window_blocks,
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, memory_fraction=memory_fraction, seed=seed, use_graphs=use_graphs,
                        decode_reserve=decode_reserve, max_prefill_with_decodes=max_prefill_with_decodes)
        if not ops.paged_attention_supported(model.device):
            raise NotImplementedError(
                f"the serving engine needs attention kernels that read a paged KV cache, which {model.device} does "
                "not have here (the CUDA extension is not loaded): run the engine on the CPU (--device cpu)")
        if model.device.type == "cuda":
            least = ops.limits()["attention_min_block_rows"]
            if block_size < least or block_size & (block_size - 1):
                raise ValueError(f"block_size {block_size}: the CUDA attention kernels read blocks of a power of two "
                                 f">= {least} positions")
        c = model.config
        self.model, self.config = model, c
        self.block_size = block_size
        self.max_model_len = min(max_model_len or c.context_length, c.context_length)
        window = max((c.layer_window(i) for i in range(c.num_hidden_layers)), default=0)
        # Window blocks: a window's worth (+1 block) for every running sequence, and the blocks a
        # step's prefill chunks write before the older ones go back.
        per_seq = -(-window // block_size) + 1 if window else 0
        win_need = max_num_seqs * per_seq + (-(-max_num_batched_tokens // block_size) + 1 if window else 0)
        # One pool for both groups where a block takes the same bytes in either (gpt-oss), unless
        # the caller sized the window pool: the window group then holds only what the running
        # sequences' windows use, and the full group has every other block.
        shared = can_share(c) and num_window_blocks is None
        if num_window_blocks is None:
            num_window_blocks = win_need if num_blocks is None else min(num_blocks, win_need)
        if num_blocks is None:
            num_blocks = self._blocks_for_memory(memory_fraction, block_size, num_window_blocks)
        if self.broadcast and self.leader:   # (its arguments checked above, on rank 0)
            self._tp.broadcast_object({"engine": spec})
        if self._tp is not None:             # every rank's cache the same size: the smallest rank's
            num_blocks, num_window_blocks = self._tp.agree_min([num_blocks, num_window_blocks])
        self._forget: list[int] = []         # (leader) finished requests the followers can drop
        self._sent: set[int] = set()         # (leader) requests whose sampling parameters they hold
        self._params: dict[int, SamplingParams] = {}   # (follower) those parameters
        self._reseed: int | None = None      # (leader) a reseed the followers have not been told of
        self._stopped = False
        self.num_full_blocks = num_blocks    # (shared: the pool has these and the window's blocks, for either)
        self.cache = PagedKVCache(c, num_blocks, max(num_window_blocks, 1), block_size, model.device, model.dtype,
                                  shared=shared)
        self.blocks = BlockManager(num_blocks, max(num_window_blocks, 1), block_size, window, shared=shared)
        self.scheduler = Scheduler(self.blocks, self.max_model_len, max_num_seqs, max_num_batched_tokens,
                                   decode_reserve, max_prefill_with_decodes)
        self.max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.handles: dict[int, RequestHandle] = {}
        self._lock = threading.Lock()
        self._gen = torch.Generator(device=model.device)
        self._gen.manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}   # seeded requests' own
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "peak_running": 0,
                      "graph_steps": 0, "ahead_steps": 0}
        # Where the step time goes, by kind of step ("decode": decode only, "mixed": with prefill):
        # host seconds scheduling, building the inputs, launching, handing tokens out, waiting for
        # the GPU; GPU seconds between events around the launches; steps; their batch (decodes).
        self.profile = {kind: dict.fromkeys(("steps", "schedule_s", "inputs_s", "launch_s", "resolve_s", "wait_s",
                                             "gpu_s", "batch"), 0.0) for kind in ("decode", "mixed")}
        if use_graphs is None:
            use_graphs = model.device.type == "cuda" and ops.kernels_available() and model.dtype == torch.bfloat16
        if use_graphs and model.device.type != "cuda":
            raise ValueError("use_graphs: CUDA-graph decode steps need the model on a CUDA device")
        self.graphs = None
        self._inflight: _Launched | None = None
        self._host, self._host_turn = None, 0
        self._side = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        self._events, self._event_turn = [], 0
        if use_graphs:
            from .decode_graphs import DecodeGraphs
            model.prepare_kernels()
            self.graphs = DecodeGraphs(model, self.cache, self._groups(), self.max_blocks_per_seq)
        if self.broadcast and self.leader:
            self._tp.engine = self

    def _blocks_for_memory(self, fraction: float, block_size: int, num_window_blocks: int) -> int:
        """Full-attention blocks that fit in `fraction` of the free memory beside the window pool."""
        dev = self.model.device
        if dev.type != "cuda":
            return 256
        # what PyTorch's allocator holds unused (the weights' relayout temporaries, an engine just
        # freed) goes back first: the driver does not count it as free
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(dev)
        per = PagedKVCache.bytes_per_block(self.config, block_size, self.model.dtype)
        return max(16, (int(free * fraction) - num_window_blocks * per["window"]) // max(1, per["full"]))

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None,
                    on_token: Callable[[int], None] | None = None) -> RequestHandle:
        """Queue a request (token ids); it joins the next step. ValueError for a bad request (the
        engine is untouched)."""
        if not self.leader:
            raise RuntimeError(f"rank {self._tp.rank} follows rank 0's engine (broadcast): requests go to rank 0; "
                               "run follow() here")
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        with self._lock:
            req = self.scheduler.add(prompt, params, self.model.vocab_size)
            h = RequestHandle(req, on_token)
            self.handles[req.id] = h
        return h

    def abort(self, handle: RequestHandle, reason: str = "abort") -> None:
        """Cancel a request: it ends now (finish_reason `reason`) and its blocks go back at once."""
        with self._lock:
            self.scheduler.abort(handle.request, reason)
            self.handles.pop(handle.request.id, None)
            self._forget_request(handle.request.id)
        handle._deliver([], True)

    def _forget_request(self, rid: int) -> None:
        """A request ended: its generator goes, and the other ranks are told to drop what they hold."""
        self._generators.pop(rid, None)
        if rid in self._sent:
            self._sent.discard(rid)
            self._forget.append(rid)

    def reseed(self, seed: int) -> None:
        """Seed the generator of the requests that have no seed of their own."""
        self._gen.manual_seed(seed)
        if self.broadcast:
            self._reseed = seed

    # ---- ranks (broadcast) ---------------------------------------------------------------------------
    def follow(self):
        """(a rank other than 0, broadcast) Run the steps rank 0's engine sends until it closes (returns
        None) or rank 0 releases its followers (returns "exit")."""
        if self.leader:
            raise RuntimeError("follow() runs on the ranks other than 0 of a broadcast engine")
        with torch.inference_mode():
            while True:
                msg = self._tp.broadcast_object(None)
                if not isinstance(msg, dict):
                    return msg
                if msg.get("reseed") is not None:
                    self._gen.manual_seed(msg["reseed"])
                for rid in msg.get("forget", ()):
                    self._generators.pop(rid, None)
                    self._params.pop(rid, None)
                self._params.update(msg["params"])
                msg["sampling"] = [(rid, self._params[rid]) for rid in msg["sampling"]]
                self._execute(msg)

    def close(self) -> None:
        """(rank 0, broadcast) Release the other ranks from follow(); the engine takes no more steps."""
        if self.broadcast and self.leader and not self._stopped:
            self._stopped = True
            if self._inflight is not None:   # the step in flight ends first (its tokens handed out)
                prev, self._inflight = self._inflight, None
                self._resolve(prev)
            for h in list(self.handles.values()):
                self.abort(h, "abort")
            self._tp.broadcast_object(None)
            if getattr(self._tp, "engine", None) is self:
                self._tp.engine = None

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # ---- one step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestHandle]:
        """Schedule and launch one step; returns the handles that got tokens or finished.

        Decode-only steps run one ahead on CUDA graphs: while the GPU runs step n, the host has
        already scheduled and launched step n + 1 (its input tokens come from step n's samples on the
        device) and then hands out step n's tokens. A request that stops at step n had one more
        position computed by step n + 1, which is dropped. Any other step (a prefill, a request
        waiting, a block to find) first waits for the step in flight."""
        if self._stopped:
            raise RuntimeError("this engine was closed (its other ranks stopped following it)")
        prev, plan = self._inflight, None
        t0 = time.perf_counter()
        if prev is not None and self.graphs is not None and prev.graph:
            with self._lock:
                plan = self.scheduler.schedule_ahead()
            self.stats["ahead_steps"] += plan is not None
        touched: list[RequestHandle] = []
        if plan is None:
            if prev is not None:
                self._inflight = None
                touched = self._resolve(prev)
                prev = None
            t0 = time.perf_counter()
            with self._lock:
                plan = self.scheduler.schedule()
            if not plan:
                return touched
        self._prof(plan)["schedule_s"] += time.perf_counter() - t0
        self.stats["preemptions"] += len(plan.preempted)   # they resume later, nothing they had is lost
        try:
            launched = self._run(plan, prev)
        except Exception as e:
            self._inflight = None
            if prev is not None:
                touched = self._resolve(prev)
            self._fail(plan, e)
        with self._lock:
            self.scheduler.launched(plan)
        self._inflight = launched
        if prev is not None:
            touched = self._resolve(prev)
        if self.graphs is None or not launched.graph:    # nothing runs ahead of an eager step
            self._inflight = None
            touched += self._resolve(launched)
        return touched

    def _fail(self, plan: StepPlan, e: Exception):
        """The step's requests fail (finish_reason "error: ..."), their blocks go back; the others
        and the engine carry on. The caller sees the error."""
        reason = f"error: {type(e).__name__}: {e}"
        for c in plan.decodes + plan.prefills:
            h = self.handles.get(c.req.id)
            if h is not None:
                self.abort(h, reason)
            else:
                with self._lock:
                    self.scheduler.abort(c.req, reason)
        self.stats["failed_steps"] = self.stats.get("failed_steps", 0) + 1
        raise EngineStepError(reason, [c.req.id for c in plan.decodes + plan.prefills]) from e

    def _resolve(self, launched: "_Launched") -> list[RequestHandle]:
        """Wait for a launched step's tokens and hand them out."""
        plan = launched.plan
        prof = self._prof(plan)
        t0 = time.perf_counter()
        try:
            if launched.ready is not None:
                launched.ready.synchronize()
            t1 = time.perf_counter()
            toks = launched.host[:len(launched.reqs)].tolist()
            if launched.gpu is not None:
                prof["gpu_s"] += launched.gpu[0].elapsed_time(launched.gpu[1]) / 1e3
        except Exception as e:
            self._fail(plan, e)
        prof["wait_s"] += t1 - t0
        sampled = {r.id: t for r, t in zip(launched.reqs, toks)}
        with self._lock:
            finished = self.scheduler.update(plan, sampled)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(plan.decodes)
        self.stats["prefill_tokens"] += sum(c.end - c.start for c in plan.prefills)
        self.stats["peak_running"] = max(self.stats["peak_running"], len(self.scheduler.running) + len(finished))
        touched = []
        wake: dict = {}
        for rid, tok in sampled.items():
            h = self.handles.get(rid)
            if h is not None:
                h._deliver([tok], h.finished, wake)
                touched.append(h)
        for loop, events in wake.items():        # one wake-up a loop (a self-pipe write each, else)
            loop.call_soon_threadsafe(_set_all, events)
        for req in finished:
            self.handles.pop(req.id, None)
            self._forget_request(req.id)
        prof["resolve_s"] += time.perf_counter() - t1
        return touched

    def _tables(self, chunks, group: str) -> list[list[int]]:
        """The chunks' block tables, [len(chunks)][width] (-1 past a table's end); width covers the
        longest, as the decode graphs' buckets do (the kernels read only up to each sequence's end)."""
        from .decode_graphs import width_bucket

        tabs = [getattr(self.blocks.tables(c.req.id), group) for c in chunks]
        width = width_bucket(max((len(t) for t in tabs), default=1), self.max_blocks_per_seq)
        return [(t + [-1] * (width - len(t)))[:width] for t in tabs]

    def _slots(self, chunks, group: str) -> list[int]:
        """The cache rows the chunks' positions are written to (block_table[p // bs] * bs + p % bs)."""
        bs, out = self.block_size, []
        for c in chunks:
            t = getattr(self.blocks.tables(c.req.id), group)
            if c.end - c.start == 1:
                out.append(t[c.start // bs] * bs + c.start % bs)
                continue
            pos = np.arange(c.start, c.end)
            out.extend((np.asarray(t, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
        return out

    def _groups(self) -> list[str]:
        return [g for g in ("full", "window") if self.cache.k[g].shape[0]]

    def _run(self, plan: StepPlan, prev: "_Launched | None" = None) -> "_Launched":
        """Launch the model over the step's tokens and the sampling of each chunk that asks (a
        decode-only step from a CUDA graph; a request whose newest token `prev` is still sampling
        takes it from the device). A broadcast engine sends the step's inputs to the other ranks
        first."""
        prof = self._prof(plan)
        t0 = time.perf_counter()
        inputs, reqs = self._inputs(plan, prev)
        if self.broadcast:
            # the step's inputs as plain ints, and the sampling parameters of requests new to the
            # other ranks (they keep them until told the request ended)
            msg = dict(inputs, sampling=[rid for rid, _ in inputs["sampling"]],
                       params={rid: p for rid, p in inputs["sampling"] if rid not in self._sent})
            self._sent.update(msg["params"])
            if self._reseed is not None:
                msg["reseed"], self._reseed = self._reseed, None
            if self._forget:
                msg["forget"], self._forget = self._forget, []
            self._tp.broadcast_object(msg)
        t1 = time.perf_counter()
        gpu = None
        if self._side is not None:
            # event pairs reused in turn (at most two steps are in flight; a pair is read when its
            # step resolves), not two new CUDA events a step
            if not self._events:
                self._events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                                for _ in range(4)]
            gpu = self._events[self._event_turn]
            self._event_turn = (self._event_turn + 1) % len(self._events)
            gpu[0].record()
        out = self._execute(inputs)
        if gpu is not None:
            gpu[1].record()
        launched = self._emit(plan, reqs, out, graph=inputs["graph"])
        launched.gpu = gpu
        prof["inputs_s"] += t1 - t0
        prof["launch_s"] += time.perf_counter() - t1
        prof["steps"] += 1
        prof["batch"] += len(plan.decodes)
        return launched

    def _prof(self, plan: StepPlan) -> dict:
        return self.profile["mixed" if plan.prefills else "decode"]

    def _inputs(self, plan: StepPlan, prev: "_Launched | None"):
        """The step as plain data (all any rank needs to run it) and the requests it samples for."""
        chunks = plan.decodes + plan.prefills
        groups = self._groups()
        if self.graphs is not None and not plan.prefills:          # decode only: a captured graph
            where = {r.id: i for i, r in enumerate(prev.reqs)} if prev is not None else {}
            tokens, src = [], []
            for c in chunks:
                r = c.req
                if r.pending:
                    tokens.append(0)
                    src.append(where[r.id])
                else:
                    tokens.append(r.token_slice(c.start, c.end)[0])
                    src.append(-1)
            reqs = [c.req for c in chunks]
            return {"graph": True, "tokens": tokens, "src": src, "starts": [c.start for c in chunks],
                    "ends": [c.end for c in chunks], "slots": {g: self._slots(chunks, g) for g in groups},
                    "tables": {g: [getattr(self.blocks.tables(c.req.id), g) for c in chunks] for g in groups},
                    "sampling": [(r.id, r.params) for r in reqs]}, reqs
        tokens, positions = [], []
        for c in chunks:
            tokens.extend(c.req.token_slice(c.start, c.end))
            positions.extend(range(c.start, c.end))
        cu, starts = [0], []
        for c in plan.prefills:
            cu.append(cu[-1] + c.end - c.start)
            starts.append(c.start)
        rows, who = [], []
        row = 0
        for c in chunks:
            row += c.end - c.start
            if c.sample:
                rows.append(row - 1)
                who.append(c.req)
        return {"graph": False, "tokens": tokens, "positions": positions,
                "slots": {g: self._slots(chunks, g) for g in groups}, "cu": cu, "starts": starts,
                "max_q_len": max((c.end - c.start for c in plan.prefills), default=0),
                "seq_lens": [c.end for c in plan.decodes],
                "decode_tables": {g: self._tables(plan.decodes, g) for g in groups},
                "prefill_tables": {g: self._tables(plan.prefills, g) for g in groups},
                "rows": rows, "sampling": [(r.id, r.params) for r in who]}, who

    def _execute(self, d: dict) -> torch.Tensor:
        """Run a step from its inputs (`_inputs`): the sampled tokens, on the device."""
        from ..model import Step

        if d["graph"]:
            logits = self.graphs.run(d["tokens"], d["src"], d["starts"], d["ends"], d["slots"], d["tables"])
            self.stats["graph_steps"] += 1
            out = self._sample(logits, d["sampling"])
            self.graphs.sampled[:out.shape[0]].copy_(out)          # the next step's input tokens
            return out
        dev = self.model.device
        i32 = torch.int32
        step = Step(torch.tensor(d["positions"], dtype=torch.int64, device=dev),
                    slots={g: torch.tensor(v, dtype=torch.int64, device=dev) for g, v in d["slots"].items()},
                    cu_seqlens=torch.tensor(d["cu"], dtype=i32), starts=torch.tensor(d["starts"], dtype=i32),
                    max_q_len=d["max_q_len"], seq_lens=torch.tensor(d["seq_lens"], dtype=i32),
                    paged=self.cache, num_decode=len(d["seq_lens"]),
                    decode_tables={g: torch.tensor(v, dtype=i32) for g, v in d["decode_tables"].items()},
                    prefill_tables={g: torch.tensor(v, dtype=i32) for g, v in d["prefill_tables"].items()})
        rows = d["rows"]
        with torch.inference_mode():
            logits = self.model._run(torch.tensor(d["tokens"], dtype=torch.int64, device=dev), step,
                                     select=torch.tensor(rows, device=dev) if rows else slice(0, 0))
        return self._sample(logits, d["sampling"])

    def _emit(self, plan: StepPlan, reqs: list[Request], out: torch.Tensor, graph: bool) -> "_Launched":
        """Start the copy of the sampled tokens to the host (on a side stream, so the next launch
        does not queue behind it)."""
        n = len(reqs)
        cuda = out.is_cuda
        if self._host is None or self._host[0].numel() < n:
            size = max(n, self.scheduler.max_num_seqs)
            self._host = [torch.empty(size, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        host = self._host[self._host_turn]
        self._host_turn ^= 1
        ready = None
        if cuda:
            sampled = torch.cuda.Event()
            sampled.record()
            self._side.wait_event(sampled)
            with torch.cuda.stream(self._side):
                host[:n].copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._side)
            out.record_stream(self._side)
        else:
            host[:n].copy_(out)
        return _Launched(plan, reqs, host, ready, graph)

    def _sample(self, logits: torch.Tensor, reqs: list[tuple[int, SamplingParams]]) -> torch.Tensor:
        """The next token of each request from its row of logits, by its own sampling parameters,
        on the device (int64 [len(reqs)]): rows sharing (temperature, top-k, top-p) are sampled
        together; a request with a seed draws from its own generator (the same seed gives the same
        tokens in any batch)."""
        from ..generate import sample

        groups: dict[tuple, list[int]] = {}
        seeded = []
        for i, (_, p) in enumerate(reqs):
            if p.seed is not None and p.temperature > 0:
                seeded.append(i)
            else:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        if not seeded and len(groups) == 1:                       # one kind of request: one launch
            (t, k, tp), = groups
            return sample(logits, t, k, tp, self._gen)
        out = torch.empty(len(reqs), dtype=torch.int64, device=logits.device)
        for i in seeded:
            rid, p = reqs[i]
            g = self._generators.get(rid)
            if g is None:
                g = self._generators[rid] = torch.Generator(device=logits.device)
                g.manual_seed(p.seed)
            out[i] = sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, g)[0]
        for (t, k, tp), idx in groups.items():
            sel = torch.tensor(idx, device=logits.device)
            out[sel] = sample(logits[sel], t, k, tp, self._gen)
        return out

    # ---- consuming -----------------------------------------------------------------------------------
    def stream(self, handle: RequestHandle) -> Iterator[int]:
        """The request's tokens as they are sampled, stepping the engine (for every request) until
        this one is done."""
        while True:
            while handle._pending:
                yield handle._pending.popleft()
            if handle.finished:
                return
            if not self.has_work():
                return
            self.step()

    async def aiter(self, handle: RequestHandle):
        """The request's tokens, for asyncio code while another thread or task runs `step()`."""
        async for batch in self.aiter_batches(handle):
            for t in batch:
                yield t

    @staticmethod
    async def aiter_batches(handle: RequestHandle):
        """The request's tokens as lists: all that came since the last wake-up (asyncio code while
        another thread runs `step()`; a consumer that falls behind catches up a list at a time)."""
        loop = asyncio.get_running_loop()
        ev = asyncio.Event()
        handle._waiters.append((loop, ev))
        try:
            while True:
                closed = handle._closed            # read before draining: its tokens are all queued
                batch = []
                while handle._pending:
                    batch.append(handle._pending.popleft())
                if batch:
                    yield batch
                if closed:
                    return
                await ev.wait()
                ev.clear()
        finally:
            handle._waiters.remove((loop, ev))

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts, params: SamplingParams | None = None) -> list[list[int]]:
        """Every prompt's tokens, the requests batched continuously."""
        handles = [self.add_request(p, params) for p in prompts]
        self.run_until_done()
        return [list(h.request.output) for h in handles]

    def metrics(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.blocks.pool.in_use(), "kv_blocks_total": self.blocks.pool.num_blocks,
                "window_blocks_used": self.blocks.in_use()[1], "kv_pool_shared": self.blocks.shared,
                "prefix_hit_rate": self.blocks.hit_rate(), **self.stats}
