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
    sampled. Several prompts (batch generation: one padding-free prefill, then batched decode):
    returns a list of token lists, or with stream=True an iterator of (prompt index, token).
    Decode runs from a CUDA graph on CUDA with the kernels built (use_graph=False: eager)."""
    config = model.config
    batch = _is_batch(prompt_tokens)
    prompts = [_check_prompt(p, config.vocab_size) for p in (prompt_tokens if batch else [prompt_tokens])]
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


class DecodeRunner:
    """Batched decode with static buffers over its own KV cache (batch rows x max_len).

    A step reads the tokens in `tokens`, advances the lengths of the active rows, writes their
    keys/values, and returns float32 logits [batch, V], all on the device. With use_graph the step
    is captured once in a CUDA graph and replayed (no per-token launches from Python)."""

    def __init__(self, model, batch: int, max_len: int, use_graph: bool):
        dev = model.device
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.cache = model.new_cache(max_len, batch)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.active = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(batch, dtype=torch.int32, device=dev)
        self.row0 = torch.arange(batch, device=dev) * max_len
        self.positions = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((batch,), -1, dtype=torch.int64, device=dev)
        self.use_graph = use_graph
        self.graph = None
        self.logits = None

    def _step(self) -> torch.Tensor:
        from . import ops

        ops.decode_prep(self.seq_lens, self.active, self.row0, self.positions, self.slots)
        return self.model.decode(self.tokens, self.cache, self.seq_lens, self.slots, positions=self.positions,
                                 float_logits=False)

    def begin(self, lengths: list[int]) -> None:
        """Rows 0 .. len(lengths)-1 hold prefilled sequences of these lengths; the rest idle."""
        n = len(lengths)
        lens = torch.ones(self.batch, dtype=torch.int32)
        lens[:n] = torch.tensor(lengths, dtype=torch.int32).clamp_min(1)
        act = torch.zeros(self.batch, dtype=torch.int32)
        act[:n] = 1
        self.seq_lens.copy_(lens)
        self.active.copy_(act)

    def deactivate(self, rows: list[int]) -> None:
        self.active[torch.tensor(rows, device=self.active.device)] = 0

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step on `tokens` (the first rows); float32 logits [batch, V]."""
        return self.step_raw(tokens).float()

    def step_raw(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """step() with the logits in the model's dtype (no conversion launch); tokens None: they are
        already in self.tokens (a greedy sample written there)."""
        if tokens is not None:
            self.tokens[:tokens.numel()].copy_(tokens)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        saved = self.active.clone()
        self.active.zero_()                      # warm-up and capture change nothing: no row active
        side = torch.cuda.Stream(self.tokens.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.active.copy_(saved)
        self.graph = graph


def _generate(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stops, use_graph) -> Iterator:
    if max_new_tokens == 0:
        return
    config = model.config
    device = model.device
    B = len(prompts)
    limits = [min(max_new_tokens, config.context_length - len(p)) for p in prompts]
    # +1: a step is launched before the previous tokens are read, so a row may write one more.
    runner = model.decode_runner(B, max(len(p) + n for p, n in zip(prompts, limits)) + 1, use_graph)
    cache = runner.cache
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else secrets.randbits(63))
    logits = model.prefill([torch.tensor(p) for p in prompts], cache)           # [B, V]
    runner.begin(cache.lengths[:B])
    cuda = device.type == "cuda"
    host = torch.empty(B, dtype=torch.int64, pin_memory=cuda)
    ready = torch.cuda.Event() if cuda else None
    # The tokens go to the host on a side stream, so the next step's launch does not queue behind
    # the device-to-host copy.
    sampled = torch.cuda.Event() if cuda else None
    side = torch.cuda.Stream(device) if cuda else None
    produced, active = [0] * B, [True] * B
    # Greedy: the argmax goes straight into the runner's token buffer (no copy launch a step).
    greedy = temperature == 0

    def pick(lg):
        if greedy:
            return torch.argmax(lg[:B], dim=-1, out=runner.tokens[:B])
        return sample(lg[:B], temperature, top_k, top_p, gen)

    nxt = pick(logits)                                                             # [B]
    while True:
        if cuda:
            sampled.record()
            side.wait_event(sampled)
            with torch.cuda.stream(side):
                host.copy_(nxt, non_blocking=True)
                ready.record(side)
            nxt.record_stream(side)
        else:
            host.copy_(nxt)
        if any(a and p + 1 < n for a, p, n in zip(active, produced, limits)):
            logits = runner.step_raw(None if greedy else nxt)   # the GPU runs on while we read
        if cuda:
            ready.synchronize()
        toks = host.tolist()
        finished = []
        for b in range(B):
            if not active[b]:
                continue
            yield b, toks[b]
            produced[b] += 1
            if toks[b] in stops or produced[b] >= limits[b]:
                active[b] = False
                finished.append(b)
        if not any(active):
            return
        if finished:
            runner.deactivate(finished)
        nxt = pick(logits)
