"""The engine behind the server: one thread steps it while there is work; the HTTP handlers (on the
asyncio loop) add requests, read their tokens as they come (`tokens()`), and cancel them. A failed
step fails the requests it ran and the thread carries on. Also the counters and histograms of
`/metrics` (Prometheus text format)."""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time

from ..engine import Engine, EngineStepError, RequestHandle, SamplingParams

log = logging.getLogger("gptoss_ext.server")


class EngineDown(RuntimeError):
    """The engine thread stopped after a failed step (a model split over ranks): no more requests."""


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return out


_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)


class EngineRunner:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
        self.accepting = True
        self.step_errors = 0
        self.last_error: str | None = None
        self.requests = {"completed": 0, "length": 0, "aborted": 0, "error": 0, "rejected": 0}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "Time from the request's arrival to its "
                              "first token.", _LATENCY)
        self.tpot = Histogram("gptoss_time_per_output_token_seconds", "Mean time between a request's output "
                              "tokens after the first.", _PER_TOKEN)
        self.e2e = Histogram("gptoss_request_latency_seconds", "Time from the request's arrival to its end.",
                             _LATENCY)

    # ---- the stepping thread ----------------------------------------------------------------------------
    def start(self) -> "EngineRunner":
        # The handlers' thread and this one share the GIL: a thread back from a GPU wait gets it
        # when the holder lets go, after up to the switch interval (5 ms by default). 1 ms keeps the
        # engine's steps close to their time driven directly (256 streaming clients, fake engine of
        # 15 ms steps on 2 CPU cores: time per output token p99 31.6 -> 22.7 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._wake.clear()
            if not eng.has_work():
                self._wake.wait(0.05)
                continue
            try:
                eng.step()
            except EngineStepError as e:
                self.step_errors += 1
                self.last_error = str(e)
                log.error("engine step failed (%d requests failed with it): %s", len(e.request_ids), e,
                          exc_info=e.__cause__)
            except Exception as e:       # the engine's own bookkeeping failed: say so, keep the thread
                self.step_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("engine step failed")
                for h in list(eng.handles.values()):
                    eng.abort(h, f"error: {self.last_error}")
            else:
                continue
            if getattr(eng, "broadcast", False):
                # a model split over ranks: the other ranks may have stopped inside the failed step's
                # collectives, so no later step can be trusted; stop (health says so, requests are refused)
                log.error("a step failed on rank 0 of a model split over ranks: the engine stops")
                self.accepting = False
                for h in list(eng.handles.values()):
                    eng.abort(h, f"error: {self.last_error}")
                return

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Stop taking requests, let the running ones finish for up to drain_timeout seconds, cancel
        the rest, stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + drain_timeout
        while self.engine.has_work() and time.monotonic() < deadline and self.alive:
            time.sleep(0.02)
        left = list(self.engine.handles.values())
        for h in left:
            self.engine.abort(h, "abort")
        if left:
            log.warning("shutdown: cancelled %d unfinished requests", len(left))
        self._stop.set()
        self._wake.set()
        if self.alive:
            self._thread.join(timeout=10)
        if getattr(self.engine, "broadcast", False) and not self.alive:
            self.engine.close()              # a model split over ranks: the other ranks stop following it

    # ---- requests -------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; ValueError (the request's own fault), EngineDown, or RuntimeError (shutting
        down)."""
        if not self.accepting:
            if not self.alive and self.last_error:
                raise EngineDown(f"the engine stopped after a failed step ({self.last_error})")
            raise RuntimeError("the server is shutting down")
        h = self.engine.add_request(prompt, params)
        self._wake.set()
        return h

    def abort(self, h: RequestHandle, reason: str = "abort") -> None:
        if not h.finished:
            self.engine.abort(h, reason)

    async def tokens(self, h: RequestHandle):
        async for t in self.engine.aiter(h):
            yield t

    async def token_batches(self, h: RequestHandle):
        async for batch in self.engine.aiter_batches(h):
            yield batch

    def record(self, h: RequestHandle, arrival: float, first: float | None, end: float, n_out: int,
               status: str) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        self.prompt_tokens += len(h.request.prompt)
        self.generation_tokens += n_out
        if first is not None:
            self.ttft.observe(first - arrival)
            if n_out > 1:
                self.tpot.observe((end - first) / (n_out - 1))
        self.e2e.observe(end - arrival)

    # ---- /metrics ---------------------------------------------------------------------------------------
    def prometheus(self, model_name: str) -> str:
        m = self.engine.metrics()
        out = []

        def metric(name, kind, help, value, labels=""):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"])

        metric("gptoss_requests_running", "gauge", "Requests in the engine's running batch.", m["running"])
        metric("gptoss_requests_waiting", "gauge", "Requests queued for admission.", m["waiting"])
        metric("gptoss_kv_blocks_used", "gauge", "KV-cache blocks in use (full-attention layers; with one pool for "
               "both kinds of layer, all).", m["kv_blocks_used"])
        metric("gptoss_kv_blocks_total", "gauge", "KV-cache blocks (full-attention layers; with one pool for both "
               "kinds of layer, all).", m["kv_blocks_total"])
        metric("gptoss_kv_window_blocks_used", "gauge", "KV-cache blocks in use (sliding-window layers).",
               m["window_blocks_used"])
        metric("gptoss_prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt "
               "tokens admitted.", f"{m['prefix_hit_rate']:.6f}")
        metric("gptoss_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
        metric("gptoss_generation_tokens_total", "counter", "Tokens generated for finished requests.",
               self.generation_tokens)
        metric("gptoss_engine_steps_total", "counter", "Engine steps run.", m["steps"])
        metric("gptoss_preemptions_total", "counter", "Requests preempted (to be recomputed) for lack of blocks.",
               m["preemptions"])
        metric("gptoss_engine_step_errors_total", "counter", "Engine steps that failed.", self.step_errors)
        out += ["# HELP gptoss_requests_total Finished requests by how they ended.",
                "# TYPE gptoss_requests_total counter"]
        out += [f'gptoss_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())]
        for h in (self.ttft, self.tpot, self.e2e):
            out += h.lines()
        out += ["# HELP gptoss_model_info The model this server serves.", "# TYPE gptoss_model_info gauge",
                f'gptoss_model_info{{model="{model_name}"}} 1']
        return "\n".join(out) + "\n"
