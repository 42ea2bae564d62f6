"""POST /v1/chat/completions: messages rendered by `harmony.render`, the engine's tokens parsed by
`harmony.ChatStream` into the final answer (`content`), the analysis channel (`reasoning_content`,
as vLLM and SGLang return it) and tool calls (`tool_calls`, arguments streamed as generated).

tool_choice: "auto" (the default with tools) lets the model choose; "none" leaves the tools out of
the prompt; "required" starts the reply with `<|channel|>commentary to=functions.` so the model can
only name a function; a named function starts it with that function's whole call header."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

from .. import harmony
from .. import tokenizer as tok
from .protocol import ApiError, Body, StopStrings, bad, common_checks, new_id, now, sampling, stop_strings

CHAT_STOPS = (tok.RETURN, tok.CALL, tok.ENDOFTEXT)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def forced_prefix(tool_choice, tools) -> tuple[list[int], bool]:
    """tool_choice -> (tokens forced after `<|start|>assistant`, whether tool calls are reported)."""
    enc = tok.get_tokenizer()
    names = [t["name"] for t in harmony._normalize_tools(tools)] if tools else []
    if tool_choice is None or tool_choice == "auto":
        return [], bool(names)
    if tool_choice == "none":
        return [], False
    if tool_choice == "required":
        if not names:
            raise bad("tool_choice", "tool_choice 'required' needs at least one tool in tools")
        return [tok.CHANNEL] + enc.encode_ordinary("commentary to=functions."), True
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function", tool_choice) if tool_choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise bad("tool_choice", "tool_choice must be 'auto', 'none', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if name not in names:
            raise bad("tool_choice", f"tool_choice names function {name!r}, which is not in tools "
                      f"({', '.join(names) or 'none given'})")
        return ([tok.CHANNEL] + enc.encode_ordinary(f"commentary to=functions.{name}") + enc.encode_ordinary(" ")
                + [tok.CONSTRAIN] + enc.encode_ordinary("json") + [tok.MESSAGE]), True
    raise bad("tool_choice", f"tool_choice must be 'auto', 'none', 'required' or a named function, got {tool_choice!r}")


def render_prompt(messages, tools, effort: str, messages_param: str = "messages") -> list[int]:
    """harmony.render with its errors as HTTP 400s naming the field."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    try:
        return harmony.render(messages, tools=tools, reasoning_effort=effort, current_date=date)
    except harmony.HarmonyError as e:
        msg = str(e)
        raise bad("tools" if msg.startswith("tools") else messages_param, msg) from None
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        if tools:                               # the JSON schema of a tool is what could not be rendered
            raise bad("tools", f"a tool's parameters schema could not be rendered: {type(e).__name__}: {e}") from None
        raise


def check_tools(tools, param: str = "tools"):
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad(param, f"{param} must be a list of function tools")
    try:
        norm = harmony._normalize_tools(tools)
    except harmony.HarmonyError as e:
        raise bad(param, str(e)) from None
    for i, t in enumerate(norm):
        p = t["parameters"]
        if p is not None and p.get("type", "object") != "object":
            raise bad(param, f"{param}[{i}] ({t['name']}): parameters must be a JSON schema of type 'object', "
                      f"got type {p.get('type')!r}")
    return tools


class ChatOutput:
    """One choice's tokens -> OpenAI chat deltas (dicts for `delta`), and the whole message at the end.
    Text of the final, commentary-preamble and unknown channels goes to `content` (stop strings
    apply to it); when the output holds no harmony message at all (a random model), `content` is the
    raw decoded text."""

    def __init__(self, prefix: list[int], stops: list[str], tools_on: bool):
        self.stream = harmony.ChatStream(prefix)
        self.stopper = StopStrings(stops)
        self.tools_on = tools_on
        self.content = ""
        self.reasoning = ""
        self.calls: list[dict] = []
        self.result: harmony.ChatResult | None = None

    @property
    def stopped(self) -> bool:
        return self.stopper.hit

    def push(self, token: int) -> list[dict]:
        out = []
        for ev in self.stream.push(token):
            d = self._event(ev)
            if d:
                out.append(d)
        return out

    def _event(self, ev) -> dict | None:
        if ev.kind == "reasoning":
            self.reasoning += ev.text
            return {"reasoning_content": ev.text}
        if ev.kind == "tool_call":
            if not self.tools_on:
                return None
            call = {"id": new_id("call_"), "name": ev.name, "arguments": ""}
            self.calls.append(call)
            return {"tool_calls": [{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                    "function": {"name": call["name"], "arguments": ""}}]}
        if ev.kind == "tool_call_arguments":
            if not self.tools_on or not self.calls:
                return None
            self.calls[-1]["arguments"] += ev.text
            return {"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": ev.text}}]}
        piece = self.stopper.feed(ev.text)          # text, commentary preamble, unknown channel
        if piece:
            self.content += piece
            return {"content": piece}
        return None

    def finish(self) -> list[dict]:
        self.result = self.stream.finish().result
        out = []
        piece = self.stopper.flush()
        if not (self.content or piece or self.reasoning or self.calls or self.stopper.hit):
            raw = tok.decode([t for t in self.result.tokens if t not in CHAT_STOPS])
            piece = self.stopper.feed(raw) + self.stopper.flush()
        if piece:
            self.content += piece
            out.append({"content": piece})
        return out

    def finish_reason(self, engine_reason: str | None) -> str:
        if self.stopper.hit:
            return "stop"
        if engine_reason == "length":
            return "length"
        if self.calls and self.stream.stop == "call":
            return "tool_calls"
        return "stop"

    def message(self) -> dict:
        m = {"role": "assistant", "content": self.content or None, "reasoning_content": self.reasoning or None}
        if self.calls:
            m["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]
        return m


def merge_deltas(deltas: list) -> list:
    """Consecutive deltas of one kind as one (a stream's tokens that came together go out in one
    chunk): text pieces joined, {"content"} / {"reasoning_content"} joined, a tool call's argument
    pieces joined; anything else (a tool call's opening with its id and name) kept as it is."""
    out: list = []
    for d in deltas:
        p = out[-1] if out else None
        if isinstance(d, str) and isinstance(p, str):
            out[-1] = p + d
            continue
        if isinstance(d, dict) and isinstance(p, dict) and len(d) == 1 and d.keys() == p.keys():
            key = next(iter(d))
            if key in ("content", "reasoning_content") and isinstance(d[key], str) and isinstance(p[key], str):
                out[-1] = {key: p[key] + d[key]}
                continue
            if key == "tool_calls" and len(d[key]) == len(p[key]) == 1:
                a, b = p[key][0], d[key][0]
                if (a.get("index") == b.get("index") and a.keys() == b.keys() == {"index", "function"}
                        and a["function"].keys() == b["function"].keys() == {"arguments"}):
                    f = {**a["function"], "arguments": a["function"]["arguments"] + b["function"]["arguments"]}
                    out[-1] = {key: [{**a, "function": f}]}
                    continue
        out.append(d)
    return out


async def fan_in(n: int, run_one):
    """Run `run_one(i, put)` for i in range(n) concurrently; yield what they put, as it comes. Leaving
    the loop early (the client went away) cancels them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def wrap(i):
        try:
            await run_one(i, queue.put_nowait)
        except Exception as e:            # a bug, not a request error: the stream says so and ends
            queue.put_nowait(sse(ApiError(500, f"{type(e).__name__}: {e}").body()))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(wrap(i)) for i in range(n)]
    left = n
    try:
        while left:
            items = [await queue.get()]
            while not queue.empty():             # what piled up meanwhile goes out in one write
                items.append(queue.get_nowait())
            left -= items.count(None)
            out = "".join(x for x in items if x is not None)
            if out:
                yield out
    finally:
        for t in tasks:
            t.cancel()


async def drive(ctx, rid: str, arrival: float, h, out, on_deltas=None):
    """Feed a request's tokens to its output adapter until it ends (or a stop string cuts it, or the
    caller is cancelled), and record it (metrics, the log line) however it ended. Returns (finish
    reason of the engine, tokens generated); an engine failure is an ApiError 500."""
    first, n = None, 0
    try:
        async for batch in ctx.runner.token_batches(h):    # what came since the last wake-up
            if first is None:
                first = time.perf_counter()
            deltas = []
            for t in batch:
                n += 1
                deltas += out.push(t)
                if out.stopped:
                    break
            if on_deltas and deltas:
                on_deltas(deltas)
            if out.stopped:
                ctx.runner.abort(h, "stop")
                break
    finally:
        if not h.finished:
            ctx.runner.abort(h)
        ctx.finished(rid, h, arrival, first, n, h.finish_reason)
    reason = h.finish_reason
    if reason and reason.startswith("error"):
        raise ApiError(500, f"the engine failed while running this request ({reason[len('error: '):]})",
                       code="engine_error")
    return reason, n


class Choices:
    """The n choices of a chat or text completion request, their engine requests and output adapters,
    answered whole (`respond`) or streamed as SSE records (`stream`). `obj` / `field`: the response
    object and where a choice's output goes ("chat.completion" + "message" / "delta", or
    "text_completion" + "text"); `usage(counts)` the usage object from the tokens each generated."""

    def __init__(self, ctx, prefix: str, obj: str, handles, outs, usage):
        self.ctx, self.obj, self.handles, self.outs, self.usage = ctx, obj, handles, outs, usage
        self.id, self.created, self.arrival = new_id(prefix), now(), time.perf_counter()

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.ctx.model_name,
                "choices": choices, **extra}

    async def respond(self, request, field: str, value) -> dict:
        """Every choice to its end (cancelled if the client goes away): the whole response, with
        `value(out)` as each choice's `field`."""
        ctx, hs, outs = self.ctx, self.handles, self.outs

        async def one(i):
            _, n = await drive(ctx, self.id, self.arrival, hs[i], outs[i])
            outs[i].finish()
            return n

        counts = await ctx.await_or_cancel(request, [one(i) for i in range(len(hs))], hs)
        return self._envelope(self.obj, [{"index": i, field: value(o), "logprobs": None,
                                          "finish_reason": o.finish_reason(hs[i].finish_reason)}
                                         for i, o in enumerate(outs)], usage=self.usage(counts))

    def stream(self, obj: str, field: str, opening, closing, include_usage: bool):
        """The SSE records of every choice as they come (`opening` first if not None, `closing` with
        the finish reason last), the usage record if asked, then `data: [DONE]`. The client going
        away cancels the choices."""
        ctx, hs, outs = self.ctx, self.handles, self.outs
        counts = [0] * len(hs)
        extra = {"usage": None} if include_usage else {}

        def chunk(i, d, finish=None):
            return sse(self._envelope(obj, [{"index": i, field: d, "logprobs": None, "finish_reason": finish}],
                                      **extra))

        async def one(i, put):
            def emit(deltas):
                for d in merge_deltas(deltas):
                    put(chunk(i, d))
            if opening is not None:
                emit([opening])
            try:
                reason, counts[i] = await drive(ctx, self.id, self.arrival, hs[i], outs[i], emit)
                emit(outs[i].finish())
                put(chunk(i, closing, outs[i].finish_reason(reason)))
            except ApiError as e:
                put(sse(e.body()))

        async def events():
            try:
                async for item in fan_in(len(hs), one):
                    yield item
                if include_usage:
                    yield sse(self._envelope(obj, [], usage=self.usage(counts)))
                yield "data: [DONE]\n\n"
            finally:                              # the client went away, or the server is stopping
                for h in hs:
                    ctx.runner.abort(h)

        return events()


def parse(ctx, body: Body):
    """Validate a chat request -> everything needed to run it."""
    common_checks(body)
    ctx.check_model(body)
    messages = body.data.get("messages")
    if messages is None:
        raise bad("messages", "messages is required", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of messages")
    tools = check_tools(body.data.get("tools"))
    effort = body.string("reasoning_effort", "medium", harmony.EFFORTS)
    prefix, tools_on = forced_prefix(body.data.get("tool_choice"), tools)
    tools_in_prompt = tools if body.data.get("tool_choice") != "none" else None
    prompt = render_prompt(messages, tools_in_prompt, effort) + prefix
    n, stream, include_usage = body.choices_and_streaming()
    if body.data.get("logprobs") or body.data.get("top_logprobs"):
        raise bad("logprobs", "logprobs are not supported by this server", code="unsupported_parameter")
    rf = body.data.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported (no constrained decoding)",
                  code="unsupported_parameter")
    mt_param = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
    max_tokens = body.number(mt_param, None, 1, 1 << 30, integer=True)
    stops = stop_strings(body)
    params = [sampling(body, max_tokens=max_tokens, prompt_len=len(prompt), max_model_len=ctx.max_model_len,
                       stop_ids=CHAT_STOPS, max_tokens_param=mt_param, prompt_param="messages", choice=i)
              for i in range(n)]
    return prompt, prefix, tools_on, stops, params, stream, include_usage


async def chat_completions(ctx, body: Body, request):
    prompt, prefix, tools_on, stops, params, stream, include_usage = parse(ctx, body)
    handles = ctx.submit(prompt, params, "messages")
    outs = [ChatOutput(prefix, stops, tools_on) for _ in handles]

    def usage(counts):
        return {"prompt_tokens": len(prompt), "completion_tokens": sum(counts), "total_tokens": len(prompt) + sum(counts),
                "prompt_tokens_details": {"cached_tokens": handles[0].request.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": sum(o.stream.reasoning_tokens for o in outs)}}

    choices = Choices(ctx, "chatcmpl-", "chat.completion", handles, outs, usage)
    if not stream:
        return await choices.respond(request, "message", ChatOutput.message)
    return choices.stream("chat.completion.chunk", "delta", {"role": "assistant", "content": ""}, {}, include_usage)
