"""POST /v1/completions: raw text or token ids in, text out, no harmony. `prompt` is a string, a list
of token ids, or a list of either (a batch); each prompt gets `n` choices (index = prompt * n + i).
Generation stops at <|endoftext|>, <|return|> or <|call|> (the checkpoint's end tokens), the stop
strings, or the token limit (16 by default, as OpenAI's)."""

from __future__ import annotations


from .. import tokenizer as tok
from .chat import Choices
from .protocol import Body, StopStrings, bad, common_checks, sampling, stop_strings

END_IDS = (tok.ENDOFTEXT, tok.RETURN, tok.CALL)


class TextOutput:
    """Tokens -> text pieces (whole UTF-8 characters), stop strings applied."""

    def __init__(self, stops: list[str]):
        self.decoder = tok.StreamDecoder()
        self.stopper = StopStrings(stops)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.stopper.hit

    def push(self, token: int) -> list[str]:
        if token in END_IDS:
            return []
        piece = self.stopper.feed(self.decoder.push(token))
        self.text += piece
        return [piece] if piece else []

    def finish(self) -> list[str]:
        piece = self.stopper.feed(self.decoder.flush()) + self.stopper.flush()
        self.text += piece
        return [piece] if piece else []

    def finish_reason(self, engine_reason: str | None) -> str:
        return "length" if engine_reason == "length" and not self.stopper.hit else "stop"


def prompts_of(value, vocab: int) -> list[list[int]]:
    if value is None:
        raise bad("prompt", "prompt is required", code="missing_required_parameter")
    if isinstance(value, str):
        batch = [value]
    elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        batch = [value]
    elif isinstance(value, list) and value:
        batch = value
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")
    out = []
    for i, p in enumerate(batch):
        if isinstance(p, str):
            ids = tok.encode(p, allow_special=True)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = p
        else:
            raise bad("prompt", f"prompt[{i}] must be a string or a list of token ids")
        if not ids:
            raise bad("prompt", f"prompt{'' if len(batch) == 1 else f'[{i}]'} is empty: give at least one token")
        badtok = next((t for t in ids if not 0 <= t < vocab), None)
        if badtok is not None:
            raise bad("prompt", f"token id {badtok} is outside the vocabulary [0, {vocab})")
        out.append(ids)
    return out


async def completions(ctx, body: Body, request):
    common_checks(body)
    ctx.check_model(body)
    for name in ("echo", "best_of", "suffix", "logprobs"):
        body.unsupported(name, ok=(None, False, 1) if name in ("echo", "best_of") else (None,))
    prompts = prompts_of(body.data.get("prompt"), ctx.vocab_size)
    n, stream, include_usage = body.choices_and_streaming()
    max_tokens = body.number("max_tokens", 16, 1, 1 << 30, integer=True)
    stops = stop_strings(body)
    jobs = []
    for p in prompts:
        for i in range(n):
            jobs.append((p, sampling(body, max_tokens=max_tokens, prompt_len=len(p), max_model_len=ctx.max_model_len,
                                     stop_ids=END_IDS, max_tokens_param="max_tokens", prompt_param="prompt",
                                     choice=i)))
    handles = []
    try:
        for p, params in jobs:
            handles += ctx.submit(p, [params], "prompt")
    except Exception:
        for h in handles:
            ctx.runner.abort(h)
        raise
    pt = sum(len(p) for p in prompts)
    choices = Choices(ctx, "cmpl-", "text_completion", handles, [TextOutput(stops) for _ in handles],
                      lambda counts: {"prompt_tokens": pt, "completion_tokens": sum(counts),
                                      "total_tokens": pt + sum(counts)})
    if not stream:
        return await choices.respond(request, "text", lambda o: o.text)
    return choices.stream("text_completion", "text", None, "", include_usage)
