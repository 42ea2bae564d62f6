"""Where a decode step of a preset's shapes spends GPU time: the kernels of generate()'s CUDA-graph
decode steps (the engine's, batch 1, 2k context) from the torch profiler's trace — per kernel name the calls and
microseconds a step, the step's span, the time no kernel runs, and how much kernels overlap
(programmatic dependent launch). With --eager, eager steps and a 2048-token prefill as well.
Random weights drawn on the GPU. Usage: python bench/profile_decode.py [preset] [--eager] [--json F]"""

import argparse
import collections
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import gptoss_ext as g
from gptoss_ext.engine import SamplingParams


def kernel_events(prof):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            ev = json.load(f)["traceEvents"]
    return sorted(((e["ts"], e["dur"], e["name"]) for e in ev if e.get("cat") == "kernel"), key=lambda e: e[0])


def summarize(events, steps):
    span = events[-1][0] + events[-1][1] - events[0][0]
    busy, end = 0.0, -1e30
    for ts, dur, _ in events:                      # union of the kernels' intervals
        busy += max(0.0, ts + dur - max(ts, end))
        end = max(end, ts + dur)
    # A kernel's share of the critical path: its end minus the previous kernel's end (with
    # programmatic launch a kernel starts early and waits, so its own duration overstates it).
    per = collections.defaultdict(lambda: [0, 0.0, 0.0])
    prev_end = None
    for ts, dur, name in events:
        per[name][0] += 1
        per[name][1] += dur
        per[name][2] += (ts + dur - prev_end) if prev_end is not None else dur
        prev_end = ts + dur if prev_end is None else max(prev_end, ts + dur)
    rows = sorted(((v[2] / steps, v[1] / steps, v[0] / steps, n) for n, v in per.items()), reverse=True)
    return {"span_us": span / steps, "busy_us": busy / steps, "kernel_sum_us": sum(r[1] for r in rows),
            "kernels_per_step": len(events) / steps,
            "kernels": [{"name": n[:90], "critical_us_per_step": round(cp, 2), "us_per_step": round(t, 2),
                         "calls_per_step": c} for cp, t, c, n in rows]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", nargs="?", default="gpt-oss-20b")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()
    m = g.random_model(args.preset, device="cuda", init_device="cuda")
    prompt = torch.randint(0, 200000, (2048,))
    out = {"preset": args.preset, "device": torch.cuda.get_device_name()}
    for mode in (("graph", "eager") if args.eager else ("graph",)):
        # generate()'s engine: one request, prefilled, then decode steps as it runs them
        eng = m.generation_engine([3000], use_graph=mode == "graph")
        h = eng.add_request(prompt.tolist(), SamplingParams(max_tokens=900, temperature=0.0, ignore_stops=True))
        for _ in range(6):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
        eng.abort(h)
        eng.run_until_done()
        s = summarize(kernel_events(prof), args.steps)
        out[mode] = s
        print(f"== {args.preset} decode B=1 2k, {mode}: span {s['span_us']:.0f} us a step, kernels busy "
              f"{s['busy_us']:.0f} us (idle {s['span_us'] - s['busy_us']:.0f}), sum of kernel times "
              f"{s['kernel_sum_us']:.0f} us, {s['kernels_per_step']:.0f} kernels")
        print("  critical-path us a step (end - previous end) | kernel duration | calls | name")
        for k in s["kernels"][:24]:
            print(f"  {k['critical_us_per_step']:9.1f} | {k['us_per_step']:9.1f} | {k['calls_per_step']:5.1f}x | "
                  f"{k['name'][:70]}")
        m.release_decode_state()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
