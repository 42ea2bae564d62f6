"""End-to-end benchmark (`python -m gptoss_ext bench`): what users feel from `generate()`.

On one CUDA GPU, for a model at real shapes (a checkpoint folder, or a preset with random weights
drawn on the GPU: the same layout, bytes and speed as a released checkpoint):
  * prefill tokens/s for a 2048-token prompt, and time to first token (prefill + first sample);
  * decode tokens/s at batch 1 with 2k and 8k context, and at batch 32 (2k context each), from
    `generate()` itself (CUDA-graph decode, GPU sampling, the per-token hand-off included);
  * the decode floor: bytes a step must read (config.decode_bytes_per_step) / copy bandwidth
    measured in the same run, and the % of it achieved;
  * peak GPU memory;
  * Hugging Face transformers' GptOssForCausalLM (eager, bf16 experts) on the same shapes as a
    peer, where it fits in GPU memory (said so where it does not).
"""

from __future__ import annotations

import gc
import time

import torch


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        s.record()
        for _ in range(5):
            b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        best = min(best, s.elapsed_time(e) / 5e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def _timed_generate(model, prompts, new_tokens: int) -> dict:
    """Greedy generate of `new_tokens` for each prompt, streamed: time to the first token of every
    prompt and the decode rate after it."""
    from .generate import generate

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first, last, count = None, None, 0
    B = len(prompts)
    for _ in generate(model, prompts, max_new_tokens=new_tokens, temperature=0.0, stream=True):
        count += 1
        now = time.perf_counter()
        if count == B:
            first = now
        last = now
    decode_tokens = count - B
    return {"ttft_s": first - t0, "decode_s": last - first, "decode_tokens": decode_tokens,
            "decode_tok_s": decode_tokens / (last - first) if last > first else 0.0}


def _prefill_rate(model, T: int, reps: int = 3) -> dict:

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab_size, (T,), generator=g)
    cache = model.new_cache(T + 1)
    times = []
    for _ in range(reps + 1):
        cache.reset()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.prefill([prompt], cache)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    return {"tokens": T, "s": best, "tok_s": T / best}


def _prompts(model, B: int, T: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.vocab_size, (T,), generator=g).tolist() for _ in range(B)]


def bench_ours(model, bw: float, new_tokens: int = 64, config=None) -> dict:
    """bw: the bandwidth the floor divides by (several GPUs: theirs together); config: the whole
    model's (a split model's own is a rank's share)."""
    c = config or model.config
    # What a single-sequence 8k-context session holds: the weights plus an 8192-token cache.
    load_peak = torch.cuda.max_memory_allocated()
    model.generation_engine([8192])
    res = {"load_peak_bytes": load_peak, "resident_with_8k_cache_bytes": torch.cuda.memory_allocated(),
           "prefill_2048": _prefill_rate(model, 2048)}
    for name, B, ctx in (("b1_ctx2k", 1, 2048), ("b1_ctx8k", 1, 8192), ("b32_ctx2k", 32, 2048)):
        prompts = _prompts(model, B, ctx - new_tokens)
        _timed_generate(model, prompts, new_tokens)                           # warm-up: same shapes, graph captured
        r = _timed_generate(model, prompts, new_tokens)
        floor_s = c.decode_bytes_per_step(ctx, B) / bw
        step_s = r["decode_s"] / max(1, r["decode_tokens"] / B)
        r.update(batch=B, context=ctx, floor_ms=floor_s * 1e3, step_ms=step_s * 1e3,
                 pct_of_floor=100 * floor_s / step_s if step_s else 0.0, aggregate_tok_s=r["decode_tok_s"])
        res[name] = r
    # Ablation in the same run: B=1 2k with plain stream-ordered launches (no programmatic launch).
    from . import ops
    prev = ops.set_pdl(False)
    try:
        model.release_decode_state()
        prompts = _prompts(model, 1, 2048 - new_tokens)
        _timed_generate(model, prompts, new_tokens)
        r = _timed_generate(model, prompts, new_tokens)
        step_s = r["decode_s"] / max(1, r["decode_tokens"])
        floor_s = c.decode_bytes_per_step(2048, 1) / bw
        res["b1_ctx2k_no_pdl"] = dict(r, step_ms=step_s * 1e3, floor_ms=floor_s * 1e3,
                                      pct_of_floor=100 * floor_s / step_s if step_s else 0.0,
                                      aggregate_tok_s=r["decode_tok_s"])
    finally:
        ops.set_pdl(prev)
        model.release_decode_state()
    res["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return res


def bench_transformers(config, new_tokens: int = 16) -> dict:
    """HF GptOssForCausalLM, eager attention, bf16 (its experts dequantised), random weights."""
    try:
        import transformers
        from transformers import GptOssConfig, GptOssForCausalLM
    except ImportError as e:
        return {"skipped": f"transformers not importable: {e}"}
    need = config.num_params() * 2
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        return {"skipped": f"bf16 weights need {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free on the GPU"}
    hf_cfg = GptOssConfig(**config.to_hf_dict(quantized=False))
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GptOssForCausalLM._from_config(hf_cfg, dtype=torch.bfloat16)
    model.eval()
    g = torch.Generator().manual_seed(2)
    res = {"version": transformers.__version__}
    with torch.inference_mode():
        ids = torch.randint(0, config.vocab_size, (1, 2048), generator=g).cuda()
        model(input_ids=ids[:, :64])                                            # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        res["prefill_2048"] = {"s": time.perf_counter() - t0, "tok_s": 2048 / (time.perf_counter() - t0)}
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res["b1_ctx2k"] = {"decode_tok_s": new_tokens / dt, "step_ms": dt / new_tokens * 1e3}
    del model, out, past
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run(preset: str | None = None, model_dir: str | None = None, peers: bool = True, new_tokens: int = 64,
        tp=None) -> dict:
    """tp (a gptoss_ext.parallel.TensorParallel; every rank runs this alike, on its own GPU): the
    model split over the ranks; the floor is then the bytes a rank reads (the whole step's / ranks)
    over one GPU's bandwidth, and the transformers peer is skipped."""
    import gptoss_ext as g
    from .config import get_preset

    if not torch.cuda.is_available():
        raise RuntimeError("the end-to-end benchmark needs a CUDA GPU")
    if not g.ops.kernels_available():
        raise RuntimeError("the CUDA kernels are not available: build them first (pip install --no-build-isolation -e .)")
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    bw = copy_bandwidth()
    ranks = tp.world if tp is not None else 1
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if model_dir:
        model = g.load_model(model_dir, device=dev, tp=tp)
        config, source = model.checkpoint_info.config, f"checkpoint {model_dir}"
    else:
        config = get_preset(preset)
        model = g.random_model(config, device=dev, init_device=dev, tp=tp)
        source = f"preset {preset}, random weights drawn on the GPU"
    if tp is not None:
        source += f", {ranks} GPUs (MoE split: {tp.moe})"
    load_s = time.perf_counter() - t0
    res = {"device": props.name, "memory_bytes": props.total_memory, "copy_bw_bytes_s": bw * ranks, "model": source,
           "ranks": ranks, "load_s": load_s, "weight_bytes": model.memory_bytes(),
           "ours": bench_ours(model, bw * ranks, new_tokens, config)}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if tp is not None:
        res["transformers"] = {"skipped": "several GPUs (the peer runs on one)"}
    else:
        res["transformers"] = bench_transformers(config) if peers else {"skipped": "--no-peers"}
    return res


def format_table(res: dict) -> str:
    o, hf = res["ours"], res["transformers"]
    per = " a GPU" if res.get("ranks", 1) > 1 else ""
    together = f", the {res['ranks']} GPUs together" if res.get("ranks", 1) > 1 else ""
    lines = [f"{res['model']} on {res['device']} (copy {res['copy_bw_bytes_s'] / 1e12:.2f} TB/s{together}); weights{per} "
             f"{res['weight_bytes'] / 1e9:.2f} GB; peak while loading {o['load_peak_bytes'] / 1e9:.2f} GB; "
             f"resident with an 8k-token cache {o['resident_with_8k_cache_bytes'] / 1e9:.2f} GB; peak over the "
             f"whole benchmark (B=32 included) {o['peak_memory_bytes'] / 1e9:.2f} GB",
             "| metric | gptoss_ext | floor / peer |", "|---|---:|---|"]
    p = o["prefill_2048"]
    peer = hf.get("prefill_2048", {}).get("tok_s")
    lines.append(f"| prefill 2048 tokens | {p['tok_s']:.0f} tok/s | "
                 + (f"transformers {peer:.0f} tok/s ({p['tok_s'] / peer:.1f}x)" if peer else hf.get("skipped", "")) + " |")
    for k, label in (("b1_ctx2k", "decode B=1, 2k context"), ("b1_ctx8k", "decode B=1, 8k context"),
                     ("b32_ctx2k", "decode B=32, 2k context"),
                     ("b1_ctx2k_no_pdl", "decode B=1, 2k, without programmatic launch")):
        if k not in o:
            continue
        r = o[k]
        extra = ""
        if k == "b1_ctx2k" and "b1_ctx2k" in hf:
            extra = f"; transformers {hf['b1_ctx2k']['decode_tok_s']:.1f} tok/s"
        lines.append(f"| {label} | {r['aggregate_tok_s']:.1f} tok/s ({r['step_ms']:.2f} ms/step) | floor "
                     f"{r['floor_ms']:.3f} ms/step: {r['pct_of_floor']:.0f}% of floor{extra} |")
    lines.append(f"| time to first token (2k prompt, B=1) | {o['b1_ctx2k']['ttft_s'] * 1e3:.0f} ms | |")
    return "\n".join(lines)
