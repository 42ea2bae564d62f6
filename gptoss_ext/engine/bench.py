"""`python -m gptoss_ext bench-serve`: the engine under load, as trtllm-bench and vLLM's serving
benchmark drive an engine: N requests of random token prompts (fixed lengths), a fixed number of
output tokens each (stops ignored), arriving all at once or at a Poisson rate. Reports output and
total tokens/s, time to first token and time per output token (p50, p99), the peak concurrency,
KV blocks used and the prefix hit rate; and, on the same requests, today's static batch
`generate()` (every prompt starts together, the batch runs until the last one ends)."""

from __future__ import annotations

import random
import time

import torch

from .engine import Engine
from .scheduler import SamplingParams


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def make_requests(n: int, input_len: int, vocab: int, seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    """n random prompts of input_len tokens (the first shared_prefix tokens the same in all)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(vocab) for _ in range(input_len - shared_prefix)] for _ in range(n)]


def run_engine(engine: Engine, prompts: list[list[int]], output_len: int, rate: float = float("inf"),
               seed: int = 0) -> dict:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in prompts:
        arrivals.append(t)
        if rate != float("inf"):
            t += rng.expovariate(rate)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_stops=True)
    times: dict[int, list[float]] = {}
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    pending = list(range(len(prompts)))
    peak = 0
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and arrivals[pending[0]] <= now:
            i = pending.pop(0)
            stamps: list[float] = []
            times[i] = stamps
            sent[i] = time.perf_counter()
            engine.add_request(prompts[i], params, on_token=lambda tok, s=stamps: s.append(time.perf_counter()))
        if engine.has_work():
            engine.step()
            peak = max(peak, len(engine.scheduler.running))
        elif pending:
            time.sleep(max(0.0, arrivals[pending[0]] - (time.perf_counter() - t0)))
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = [times[i][0] - sent[i] for i in times if times[i]]
    tpot = [(times[i][-1] - times[i][0]) / (len(times[i]) - 1) for i in times if len(times[i]) > 1]
    out_tokens = sum(len(v) for v in times.values())
    in_tokens = sum(len(p) for p in prompts)
    m = engine.metrics()
    return {"requests": len(prompts), "wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + in_tokens) / wall, "ttft_p50_ms": 1e3 * _pct(ttft, 50),
            "ttft_p99_ms": 1e3 * _pct(ttft, 99), "tpot_p50_ms": 1e3 * _pct(tpot, 50), "tpot_p99_ms": 1e3 * _pct(tpot, 99),
            "peak_concurrency": max(peak, m["peak_running"]), "kv_blocks_total": m["kv_blocks_total"],
            "kv_pool_shared": m["kv_pool_shared"],
            "prefix_hit_rate": m["prefix_hit_rate"], "preemptions": m["preemptions"], "steps": m["steps"],
            "step_profile": step_profile(engine)}


def step_profile(engine: Engine) -> dict:
    """Per step, by kind (decode only / with prefill): mean batch and ms of each host phase and of
    the GPU (engine.profile)."""
    out = {}
    for kind, p in engine.profile.items():
        n = p["steps"]
        if n:
            out[kind] = {"steps": int(n), "mean_batch": p["batch"] / n,
                         **{k[:-2] + "_ms": 1e3 * p[k] / n for k in p if k.endswith("_s")}}
    return out


def format_profile(prof: dict) -> list[str]:
    if not prof:
        return []
    keys = ("schedule_ms", "inputs_ms", "launch_ms", "resolve_ms", "wait_ms", "gpu_ms")
    lines = ["", "Where a step's time goes (ms a step; host phases, then the GPU's own time between events):",
             "| steps | count | mean batch | " + " | ".join(k[:-3] for k in keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    for kind, p in prof.items():
        lines.append(f"| {kind} | {p['steps']} | {p['mean_batch']:.0f} | "
                     + " | ".join(f"{p[k]:.2f}" for k in keys) + " |")
    return lines


def run_static(model, prompts: list[list[int]], output_len: int, batch: int) -> dict:
    """Today's static batches of generate(): `batch` prompts start together and run to the end."""
    t0 = time.perf_counter()
    ttft, tpot, out_tokens = [], [], 0
    for s in range(0, len(prompts), batch):
        group = prompts[s:s + batch]
        stamps: dict[int, list[float]] = {i: [] for i in range(len(group))}
        for i, _tok in model.generate(group, max_new_tokens=output_len, temperature=0.0, stream=True):
            stamps[i].append(time.perf_counter())
        for v in stamps.values():
            out_tokens += len(v)
            if v:
                ttft.append(v[0] - t0)            # every request was sent at t0, as for the engine run
                if len(v) > 1:
                    tpot.append((v[-1] - v[0]) / (len(v) - 1))
    wall = time.perf_counter() - t0
    in_tokens = sum(len(p) for p in prompts)
    return {"requests": len(prompts), "batch": batch, "wall_s": wall, "output_tok_s": out_tokens / wall,
            "total_tok_s": (out_tokens + in_tokens) / wall, "ttft_p50_ms": 1e3 * _pct(ttft, 50),
            "ttft_p99_ms": 1e3 * _pct(ttft, 99), "tpot_p50_ms": 1e3 * _pct(tpot, 50), "tpot_p99_ms": 1e3 * _pct(tpot, 99)}


def run_mixed(engine: Engine, *, num_decoding: int, input_len: int, long_len: int, seed: int = 0,
              after: int = 16) -> dict:
    """The mixed load: `num_decoding` requests decode while a `long_len`-token prompt arrives. The
    time between consecutive tokens of the decoding requests (each gap a step, as they see it)
    before it arrives (median) and while it is read (max), and its time to first token."""
    vocab = engine.model.vocab_size
    prompts = make_requests(num_decoding, input_len, vocab, seed)
    long_prompt = make_requests(1, long_len, vocab, seed + 1)[0]
    params = SamplingParams(max_tokens=engine.max_model_len - input_len - 1, temperature=0.0, ignore_stops=True)
    stamps: list[list[float]] = [[] for _ in range(num_decoding)]
    hs = [engine.add_request(p, params, on_token=lambda t, s=s: s.append(time.perf_counter()))
          for p, s in zip(prompts, stamps)]
    while min(len(s) for s in stamps) < after:          # everybody decoding for a while
        engine.step()
    t_arrive = time.perf_counter()
    first: list[float] = []
    long_h = engine.add_request(long_prompt, SamplingParams(max_tokens=after, temperature=0.0, ignore_stops=True),
                                on_token=lambda t: first.append(time.perf_counter()))
    while not long_h.finished:
        engine.step()
    for h in hs:
        engine.abort(h)
    engine.run_until_done()
    before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b <= t_arrive]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t_arrive and a < first[0]]
    med = _pct(before, 50)
    return {"decoding": num_decoding, "input_len": input_len, "long_len": long_len,
            "median_step_ms": 1e3 * med, "max_step_while_reading_ms": 1e3 * max(during, default=float("nan")),
            "max_over_median": max(during, default=float("nan")) / med, "long_ttft_ms": 1e3 * (first[0] - t_arrive),
            "steps_while_reading": len(during) // max(1, num_decoding)}


def format_mixed(res: dict) -> str:
    m = res["mixed"]
    return "\n".join([
        f"{res['model']}: a {m['long_len']}-token prompt arrives while {m['decoding']} requests "
        f"({m['input_len']}-token prompts) decode; prefill cap in decoding steps: "
        f"{res['engine_config'].get('max_prefill_with_decodes') or res['engine_config'].get('max_num_batched_tokens')}",
        "| metric | value |", "|---|---:|",
        f"| median step before it (ms) | {m['median_step_ms']:.2f} |",
        f"| longest step while it is read (ms) | {m['max_step_while_reading_ms']:.2f} |",
        f"| longest / median | {m['max_over_median']:.2f}x |",
        f"| its time to first token (ms) | {m['long_ttft_ms']:.0f} |",
        f"| steps while it is read | {m['steps_while_reading']} |"])


def format_table(res: dict) -> str:
    e, s = res["engine"], res.get("static")
    rows = [("output tok/s", "output_tok_s", "{:.0f}"), ("total tok/s", "total_tok_s", "{:.0f}"),
            ("TTFT p50 / p99 (ms)", ("ttft_p50_ms", "ttft_p99_ms"), "{:.0f} / {:.0f}"),
            ("time per output token p50 / p99 (ms)", ("tpot_p50_ms", "tpot_p99_ms"), "{:.2f} / {:.2f}"),
            ("wall time (s)", "wall_s", "{:.1f}")]
    lines = [f"{res['model']} on {res['device']}: {e['requests']} requests, {res['input_len']} in / "
             f"{res['output_len']} out, rate {res['rate']}", "| metric | engine | static generate() |", "|---|---:|---:|"]
    for label, key, fmt in rows:
        keys = key if isinstance(key, tuple) else (key,)
        lines.append(f"| {label} | {fmt.format(*(e[k] for k in keys))} | "
                     + (fmt.format(*(s[k] for k in keys)) if s else "-") + " |")
    lines.append(f"| peak concurrency | {e['peak_concurrency']} | {s['batch'] if s else '-'} |")
    lines.append(f"| KV blocks{' (one pool for both layer groups)' if e.get('kv_pool_shared') else ''} | "
                 f"{e['kv_blocks_total']} | |")
    lines.append(f"| prefix hit rate | {100 * e['prefix_hit_rate']:.1f}% | |")
    lines.append(f"| preemptions | {e['preemptions']} | |")
    return "\n".join(lines + format_profile(e.get("step_profile", {})))


def run(model, *, num_requests: int, input_len: int, output_len: int, rate: float, static_batch: int,
        engine_kwargs: dict, shared_prefix: int = 0, seed: int = 0, label: str = "") -> dict:
    prompts = make_requests(num_requests, input_len, model.vocab_size, seed, shared_prefix)
    engine = Engine(model, **engine_kwargs)
    res = {"model": label, "device": str(model.device) if model.device.type != "cuda" else
           torch.cuda.get_device_name(model.device), "input_len": input_len, "output_len": output_len,
           "rate": rate, "engine_config": {k: v for k, v in engine_kwargs.items()},
           "engine": run_engine(engine, prompts, output_len, rate, seed)}
    del engine
    if static_batch > 0:
        res["static"] = run_static(model, prompts, output_len, static_batch)
    return res
