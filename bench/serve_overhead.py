"""What the HTTP server costs over the engine driven directly, with the GPU taken out: an engine
whose forward pass is a fixed sleep (--step-ms, like a GPU step it releases the GIL) and whose
tokens are fixed, behind the real scheduler, server and SSE path. The same requests run twice:
through `bench.run_engine` in this process, and through HTTP (`bench-serve --base-url`'s client)
against `serve`'s app in a child process. Runs on any machine (CPU only):

    python bench/serve_overhead.py [--step-ms 15] [--requests 256] [--input-len 1024] [--output-len 256]

The issue's target (HTTP within 10 % of direct) applies to the real model on the GPU; this
isolates the part of it that is the server's own CPU work."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gptoss_ext.engine import Engine  # noqa: E402


class SleepEngine(Engine):
    """The real engine with the forward pass replaced by a sleep of `step_s` (token 1000 for all)."""

    def __init__(self, model, step_s: float, **kw):
        super().__init__(model, **kw)
        self.step_s = step_s

    def _run(self, plan, prev=None):
        time.sleep(self.step_s)
        reqs = [c.req for c in plan.decodes + plan.prefills if c.sample]
        return self._emit(plan, reqs, torch.full((len(reqs),), 1000, dtype=torch.int64), graph=False)


def engine(step_ms: float, seqs: int) -> SleepEngine:
    from gptoss_ext import random_model

    return SleepEngine(random_model("tiny"), step_ms / 1e3, num_blocks=8192, block_size=128, max_num_seqs=seqs,
                       max_num_batched_tokens=8192)


def serve(port: int, step_ms: float, seqs: int) -> None:
    from gptoss_ext.server import make_server

    eng = engine(step_ms, seqs)
    make_server(eng.model, engine=eng, port=port, model_name="sleep", log_level="warning").run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step-ms", type=float, default=15.0)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--json")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)          # (the child: serve on this port)
    a = p.parse_args()
    if a.serve:
        serve(a.serve, a.step_ms, a.requests)
        return 0
    import httpx

    from gptoss_ext.engine import bench
    from gptoss_ext.server import bench as http_bench

    prompts = bench.make_requests(a.requests, a.input_len, 201088, 0)
    direct = bench.run_engine(engine(a.step_ms, a.requests), prompts, a.output_len)
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--step-ms", str(a.step_ms),
                              "--requests", str(a.requests)])
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if child.poll() is not None or time.monotonic() - t0 > 120:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        http = http_bench.run(f"http://127.0.0.1:{port}/v1", num_requests=a.requests, input_len=a.input_len,
                              output_len=a.output_len, rate=float("inf"), concurrency=a.requests)["http"]
    finally:
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
    res = {"step_ms": a.step_ms, "requests": a.requests, "input_len": a.input_len, "output_len": a.output_len,
           "cpus": os.cpu_count(), "direct": direct, "http": http,
           "http_over_direct": http["output_tok_s"] / direct["output_tok_s"]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"sleep engine ({a.step_ms} ms steps), {a.requests} streaming requests, {a.input_len} in / "
          f"{a.output_len} out, {os.cpu_count()} CPUs")
    print("| | direct | HTTP |\n|---|---:|---:|")
    print(f"| output tok/s | {direct['output_tok_s']:.0f} | {http['output_tok_s']:.0f} "
          f"({100 * res['http_over_direct']:.0f} %) |")
    for label, k in (("TTFT p50 / p99 (ms)", "ttft"), ("time per output token p50 / p99 (ms)", "tpot")):
        print(f"| {label} | {direct[k + '_p50_ms']:.1f} / {direct[k + '_p99_ms']:.1f} | "
              f"{http[k + '_p50_ms']:.1f} / {http[k + '_p99_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
