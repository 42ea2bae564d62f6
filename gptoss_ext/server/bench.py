"""`python -m gptoss_ext bench-serve --base-url URL`: a running server under load through HTTP, as
vLLM's serving benchmark drives one: N streaming /v1/completions requests of random token prompts
(fixed lengths, `ignore_eos` so each generates exactly --output-len tokens), at most
--max-concurrency in flight, arriving all at once or at a Poisson rate. Reports the same figures as
the engine benchmark (output and total tok/s, TTFT and time per output token p50 / p99), so the
HTTP path can be set beside the engine driven directly in the same GPU run."""

from __future__ import annotations

import asyncio
import json
import random
import time

from ..engine.bench import _pct, make_requests


async def _one(session, url, headers, body, sem, sent_at, out):
    async with sem:
        t0 = time.perf_counter()
        sent_at.append(t0)
        first = last = None
        n = 0
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
            async for raw in r.content:                       # a line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    raise RuntimeError(f"stream error: {d['error']}")
                now = time.perf_counter()
                if d.get("choices") and d["choices"][0].get("text"):
                    first = first or now
                    last = now
                if d.get("usage"):
                    n = d["usage"]["completion_tokens"]
        out.append({"ttft": (first - t0) if first else None,
                    "tpot": (last - first) / (n - 1) if first and n > 1 else None, "tokens": n})


async def _run(base_url, prompts, output_len, rate, concurrency, api_key, seed):
    # aiohttp, as vLLM's serving benchmark uses: httpx's connection pool scans every connection on
    # every event (256 streams: 4.4 M idle checks, a core of the client's CPU; the client, not the
    # server, became the limit)
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        async with session.get(base_url + "/models", headers=headers) as r:
            name = (await r.json())["data"][0]["id"]
        sem = asyncio.Semaphore(concurrency)
        rng = random.Random(seed)
        out: list[dict] = []
        sent: list[float] = []
        tasks = []
        t0 = time.perf_counter()
        for p in prompts:
            body = {"model": name, "prompt": p, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.create_task(_one(session, base_url + "/completions", headers, body, sem, sent, out)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        async with session.get(base_url.rsplit("/v1", 1)[0] + "/metrics") as r:
            metrics = await r.text()
    return name, wall, out, metrics


def run(base_url: str, *, num_requests: int, input_len: int, output_len: int, rate: float, concurrency: int,
        api_key: str | None = None, vocab: int = 201088, shared_prefix: int = 0, seed: int = 0) -> dict:
    prompts = make_requests(num_requests, input_len, vocab, seed, shared_prefix)
    name, wall, out, metrics = asyncio.run(_run(base_url.rstrip("/"), prompts, output_len, rate, concurrency,
                                                api_key, seed))
    ttft = [o["ttft"] for o in out if o["ttft"] is not None]
    tpot = [o["tpot"] for o in out if o["tpot"] is not None]
    out_tokens = sum(o["tokens"] for o in out)
    in_tokens = sum(len(p) for p in prompts)
    return {"model": name, "device": base_url, "input_len": input_len, "output_len": output_len, "rate": rate,
            "max_concurrency": concurrency,
            "http": {"requests": len(prompts), "wall_s": wall, "output_tok_s": out_tokens / wall,
                     "total_tok_s": (out_tokens + in_tokens) / wall, "output_tokens": out_tokens,
                     "ttft_p50_ms": 1e3 * _pct(ttft, 50), "ttft_p99_ms": 1e3 * _pct(ttft, 99),
                     "tpot_p50_ms": 1e3 * _pct(tpot, 50), "tpot_p99_ms": 1e3 * _pct(tpot, 99)},
            "server_metrics": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                               if line and not line.startswith("#") and "{" not in line and len(line.split()) == 2}}


def format_table(res: dict) -> str:
    h = res["http"]
    return "\n".join([
        f"{res['model']} at {res['device']}: {h['requests']} streaming requests, {res['input_len']} in / "
        f"{res['output_len']} out, at most {res['max_concurrency']} in flight, rate {res['rate']}",
        "| metric | through HTTP |", "|---|---:|",
        f"| output tok/s | {h['output_tok_s']:.0f} |", f"| total tok/s | {h['total_tok_s']:.0f} |",
        f"| TTFT p50 / p99 (ms) | {h['ttft_p50_ms']:.0f} / {h['ttft_p99_ms']:.0f} |",
        f"| time per output token p50 / p99 (ms) | {h['tpot_p50_ms']:.2f} / {h['tpot_p99_ms']:.2f} |",
        f"| wall time (s) | {h['wall_s']:.1f} |"])
