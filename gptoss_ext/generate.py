"""Token generation: `generate()` runs the prompts as requests of the model's serving engine
(gptoss_ext.engine: chunked prefill, then decode steps from CUDA graphs over a paged KV cache),
sampling on the model's device (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

import secrets
from typing import Iterable, Iterator

import torch


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    if not isinstance(temperature, (int, float)) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64), on the logits' device, without a host sync."""
    if temperature == 0:   # (on bf16 logits as well: the conversion to fp32 is exact and monotonic)
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    # Sampling by exponential races: argmax(p / q), q ~ Exp(1), picks i with probability p_i.
    q = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / q).argmax(dim=-1)


def _check_prompt(prompt, vocab: int) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise ValueError(f"prompt tokens must be 1-D, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    try:
        tokens = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise ValueError("prompt tokens must be a sequence of integers") from None
    if not tokens:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    return tokens


def _is_batch(prompt_tokens) -> bool:
    """A list of prompts (each a sequence of ids) rather than one prompt."""
    if isinstance(prompt_tokens, torch.Tensor):
        return False
    try:
        first = prompt_tokens[0]
    except (TypeError, IndexError, KeyError):
        return False
    return isinstance(first, (list, tuple, torch.Tensor))


def generate(model, prompt_tokens, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_tokens: Iterable[int] | None = None, stream: bool = False, use_graph: bool | None = None):
    """Continue `prompt_tokens`: one prompt (a sequence of ids) or a list of prompts.

    Greedy at temperature 0. Each prompt stops after max_new_tokens, at the context length, or
    after a token in stop_tokens (which is included as its last token). One prompt: returns the
    list of new tokens, or with stream=True an iterator yielding each token as soon as it is
    sampled. Several prompts (batch generation: continuous batching, each ends on its own):
    returns a list of token lists, or with stream=True an iterator of (prompt index, token).
    Decode runs from a CUDA graph on CUDA with the kernels built (use_graph=False: eager)."""
    config = model.config
    batch = _is_batch(prompt_tokens)
    prompts = [_check_prompt(p, model.vocab_size) for p in (prompt_tokens if batch else [prompt_tokens])]
    if not prompts:
        raise ValueError("no prompts given")
    check_sampling(temperature, top_p, top_k)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    for i, tokens in enumerate(prompts):
        if len(tokens) >= config.context_length:
            raise ValueError(f"{'prompt ' + str(i) if batch else 'the prompt'} has {len(tokens)} tokens; the context "
                             f"holds {config.context_length} (and at least one must be left to generate)")
    stops = set(int(t) for t in (stop_tokens or ()))
    it = _generate(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stops, use_graph)
    if batch:
        if stream:
            return it
        out = [[] for _ in prompts]
        for i, tok in it:
            out[i].append(tok)
        return out
    single = (tok for _, tok in it)
    return single if stream else list(single)


def _generate(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stops, use_graph) -> Iterator:
    """(prompt index, token) as the model's generation engine samples them (gptoss_ext.engine: the
    serving engine, sized for these prompts; decode steps from CUDA graphs, one step ahead)."""
    from .engine.scheduler import SamplingParams

    if max_new_tokens == 0:
        return
    ctx = model.config.context_length
    limits = [min(max_new_tokens, ctx - len(p)) for p in prompts]
    engine = model.generation_engine([len(p) + n for p, n in zip(prompts, limits)], use_graph)
    if seed is None:
        seed = secrets.randbits(63)
        if engine._tp is not None:           # every rank of a split model draws rank 0's samples
            seed = engine._tp.broadcast_object(seed)
    engine.reseed(seed)
    stop_ids = tuple(sorted(stops))
    handles = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                                    stop_token_ids=stop_ids))
               for p, n in zip(prompts, limits)]
    index = {h.request.id: i for i, h in enumerate(handles)}
    try:
        while engine.has_work():
            for h in engine.step():
                i = index[h.request.id]
                while h._pending:
                    yield i, h._pending.popleft()
    finally:                  # a caller that stops reading early: its requests end, their blocks go back
        for h in handles:
            if not h.finished:
                engine.abort(h)
