"""Token generation: prefill the prompt, then decode one token at a time through the KV cache,
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
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
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


def generate(model, prompt_tokens, max_new_tokens: int = 256, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop_tokens: Iterable[int] | None = None, stream: bool = False):
    """Continue `prompt_tokens` (a sequence of ids).

    Greedy at temperature 0. Stops after max_new_tokens, at the context length, or after a token
    in stop_tokens (which is included as the last token). Returns the list of new tokens, or with
    stream=True an iterator that yields each token as soon as it is sampled."""
    config = model.config
    tokens = _check_prompt(prompt_tokens, config.vocab_size)
    check_sampling(temperature, top_p, top_k)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if len(tokens) >= config.context_length:
        raise ValueError(f"the prompt has {len(tokens)} tokens; the context holds {config.context_length} "
                         "(and at least one must be left to generate)")
    stops = set(int(t) for t in (stop_tokens or ()))
    it = _generate(model, tokens, max_new_tokens, temperature, top_p, top_k, seed, stops)
    return it if stream else list(it)


def _generate(model, tokens, max_new_tokens, temperature, top_p, top_k, seed, stops) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    config = model.config
    device = model.device
    max_len = min(config.context_length, len(tokens) + max_new_tokens)
    cache = model.new_cache(max_len)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    logits = model(torch.tensor(tokens, device=device), cache=cache, last_only=True)
    n = max_len - len(tokens)
    for i in range(n):
        nxt = sample(logits, temperature, top_k, top_p, gen)            # [1]
        token = int(nxt.item())
        yield token
        if token in stops or i == n - 1:
            return
        logits = model(nxt, cache=cache)
