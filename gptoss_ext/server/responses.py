"""POST /v1/responses (and GET / DELETE /v1/responses/{id}): OpenAI's Responses API on the same road
as chat completions. `input` (a string or items: messages, function_call, function_call_output,
reasoning) becomes chat messages for `harmony.render`; the reply's harmony messages become output
items (reasoning, message, function_call), streamed as the documented events. Responses with
store=true (the default) are kept in memory, the oldest dropped past --max-stored-responses, so a
later request can continue one with previous_response_id."""

from __future__ import annotations

import json
import time
from collections import OrderedDict

from .. import harmony
from .chat import CHAT_STOPS, check_tools, drive, fan_in, forced_prefix, render_prompt
from .protocol import ApiError, Body, bad, common_checks, new_id, now, sampling


class ResponseStore:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: OrderedDict[str, dict] = OrderedDict()

    def put(self, rid: str, response: dict, conversation: list[dict]) -> None:
        self.items[rid] = {"response": response, "conversation": conversation}
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, rid: str) -> dict | None:
        return self.items.get(rid)


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, p in enumerate(content):
            if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text", "reasoning_text"):
                out.append(str(p.get("text", "")))
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise bad(where, f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
        return "".join(out)
    raise bad(where, f"{where}.content must be a string or a list of text parts")


def input_messages(inp) -> list[dict]:
    """Responses `input` -> chat messages (function calls as assistant tool_calls, their outputs as
    tool messages, reasoning as the next assistant message's thinking)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list):
        raise bad("input", "input must be a string or a list of input items")
    msgs: list[dict] = []
    thinking = None
    for i, item in enumerate(inp):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(where, f"{where} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad(where, f"{where}.role must be user, system, developer or assistant, got {role!r}")
            m = {"role": role, "content": _text(item.get("content", ""), where)}
            if role == "assistant" and thinking:
                m["thinking"], thinking = thinking, None
            msgs.append(m)
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            thinking = (thinking or "") + _text(parts, where)
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
            if not isinstance(name, str) or not name:
                raise bad(where, f"{where}: a function_call needs a name")
            if not isinstance(args, str):
                raise bad(where, f"{where}: function_call arguments must be a JSON string")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            last = msgs[-1] if msgs else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not thinking:
                last["tool_calls"].append(call)
            else:
                m = {"role": "assistant", "content": "", "tool_calls": [call]}
                if thinking:
                    m["thinking"], thinking = thinking, None
                msgs.append(m)
        elif kind == "function_call_output":
            out = item.get("output")
            if not isinstance(out, (str, list)):
                raise bad(where, f"{where}: function_call_output needs an output string")
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(out, where)})
        else:
            raise bad(where, f"{where}: input items of type {kind!r} are not supported (message, reasoning, "
                      "function_call, function_call_output)", code="unsupported_parameter")
    return msgs


class ResponsesOutput:
    """The reply's tokens -> output items and the stream's events (each a (name, data) pair)."""

    def __init__(self, prefix: list[int], tools_on: bool):
        self.stream = harmony.ChatStream(prefix)
        self.tools_on = tools_on
        self.items: list[dict] = []
        self.open: dict | None = None
        self.seq = 0
        self.stopped = False          # (no stop strings in the Responses API)

    def event(self, kind: str, **data) -> tuple[str, dict]:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return kind, data

    def _close(self) -> list:
        it, self.open = self.open, None
        if it is None:
            return []
        idx = self.items.index(it)
        it["status"] = "completed"
        ev = []
        if it["type"] == "message":
            text = it["content"][0]["text"]
            ev.append(self.event("response.output_text.done", item_id=it["id"], output_index=idx, content_index=0,
                                 text=text, logprobs=[]))
            ev.append(self.event("response.content_part.done", item_id=it["id"], output_index=idx, content_index=0,
                                 part=it["content"][0]))
        elif it["type"] == "reasoning":
            ev.append(self.event("response.reasoning_text.done", item_id=it["id"], output_index=idx, content_index=0,
                                 text=it["content"][0]["text"]))
        else:
            ev.append(self.event("response.function_call_arguments.done", item_id=it["id"], output_index=idx,
                                 name=it["name"], arguments=it["arguments"]))
        ev.append(self.event("response.output_item.done", output_index=idx, item=it))
        return ev

    def _start(self, item: dict) -> list:
        ev = self._close()
        self.items.append(item)
        self.open = item
        idx = len(self.items) - 1
        shown = {**item, "content": []} if "content" in item else dict(item)
        ev.append(self.event("response.output_item.added", output_index=idx, item=shown))
        if item["type"] == "message":
            ev.append(self.event("response.content_part.added", item_id=item["id"], output_index=idx,
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return ev

    def push(self, token: int) -> list:
        ev = []
        for d in self.stream.push(token):
            ev += self._delta(d)
        return ev

    def _delta(self, d) -> list:
        ev = []
        if d.kind == "tool_call":
            if self.tools_on:
                ev += self._start({"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_"),
                                   "name": d.name, "arguments": "", "status": "in_progress"})
            return ev
        if d.kind == "tool_call_arguments":
            if self.tools_on and self.open and self.open["type"] == "function_call":
                self.open["arguments"] += d.text
                ev.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                     output_index=len(self.items) - 1, delta=d.text))
            return ev
        want = "reasoning" if d.kind == "reasoning" else "message"
        if not self.open or self.open["type"] != want:
            if want == "reasoning":
                ev += self._start({"type": "reasoning", "id": new_id("rs_"), "summary": [],
                                   "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
            else:
                ev += self._start({"type": "message", "id": new_id("msg_"), "role": "assistant", "status": "in_progress",
                                   "content": [{"type": "output_text", "text": "", "annotations": []}]})
        it = self.open
        it["content"][0]["text"] += d.text
        name = "response.reasoning_text.delta" if want == "reasoning" else "response.output_text.delta"
        extra = {} if want == "reasoning" else {"logprobs": []}
        ev.append(self.event(name, item_id=it["id"], output_index=len(self.items) - 1, content_index=0,
                             delta=d.text, **extra))
        return ev

    def finish(self) -> list:
        self.stream.finish()
        ev = []
        if not self.items:            # no harmony message at all (a random model): the raw text
            from .. import tokenizer as tok
            raw = tok.decode([t for t in self.stream.tokens if t not in CHAT_STOPS])
            if raw:
                ev += self._delta(harmony.ChatDelta("text", raw))
        return ev + self._close()

    def conversation_tail(self) -> list[dict]:
        """The reply as chat messages, for a later previous_response_id."""
        thinking = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        m = {"role": "assistant", "content": text}
        if thinking:
            m["thinking"] = thinking
        if calls:
            m["tool_calls"] = calls
        return [m]


def parse(ctx, body: Body):
    common_checks(body)
    ctx.check_model(body)
    if body.data.get("input") is None:
        raise bad("input", "input is required", code="missing_required_parameter")
    msgs = input_messages(body.data["input"])
    prev_id = body.string("previous_response_id")
    history: list[dict] = []
    if prev_id is not None:
        prev = ctx.responses.get(prev_id)
        if prev is None:
            raise ApiError(400, f"previous response {prev_id!r} is not stored here (store=false, evicted, or never "
                           "made)", param="previous_response_id", code="previous_response_not_found")
        history = prev["conversation"]
    instructions = body.string("instructions")
    tools = check_tools(body.data.get("tools"))
    reasoning = body.data.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad("reasoning", "reasoning must be an object like {\"effort\": \"medium\"}")
    effort = (reasoning or {}).get("effort") or "medium"
    if effort not in harmony.EFFORTS:
        raise bad("reasoning.effort", f"reasoning.effort must be one of {', '.join(harmony.EFFORTS)}, got {effort!r}")
    tc = body.data.get("tool_choice")
    if isinstance(tc, dict) and "name" in tc and "function" not in tc:
        tc = {"type": "function", "function": {"name": tc["name"]}}
    prefix, tools_on = forced_prefix(tc, tools)
    conversation = history + msgs
    if not conversation:
        raise bad("input", "input has no items")
    head = [{"role": "developer", "content": instructions}] if instructions else []
    prompt = render_prompt(head + conversation, tools if tc != "none" else None, effort, "input") + prefix
    max_tokens = body.number("max_output_tokens", None, 1, 1 << 30, integer=True)
    params = sampling(body, max_tokens=max_tokens, prompt_len=len(prompt), max_model_len=ctx.max_model_len,
                      stop_ids=CHAT_STOPS, max_tokens_param="max_output_tokens", prompt_param="input")
    store = body.boolean("store", True)
    stream = body.boolean("stream")
    shape = {"instructions": instructions, "max_output_tokens": max_tokens, "previous_response_id": prev_id,
             "reasoning": {"effort": effort, "summary": None}, "store": store,
             "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
             "tools": body.get("tools", []), "tool_choice": body.get("tool_choice", "auto"),
             "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "truncation": "disabled",
             "metadata": body.get("metadata", {}), "user": body.get("user")}
    return prompt, prefix, tools_on, params, conversation, store, stream, shape


async def create_response(ctx, body: Body, request):
    prompt, prefix, tools_on, params, conversation, store, stream, shape = parse(ctx, body)
    arrival = time.perf_counter()
    (h,) = ctx.submit(prompt, [params], "input")
    out = ResponsesOutput(prefix, tools_on)
    rid = new_id("resp_")
    base = {"id": rid, "object": "response", "created_at": now(), "model": ctx.model_name, **shape,
            "error": None, "incomplete_details": None}

    def final(reason: str | None, n: int) -> dict:
        r = dict(base, output=out.items, status="completed", usage={
            "input_tokens": len(prompt), "input_tokens_details": {"cached_tokens": h.request.cached_tokens},
            "output_tokens": n, "output_tokens_details": {"reasoning_tokens": out.stream.reasoning_tokens},
            "total_tokens": len(prompt) + n})
        if reason == "length":
            r["status"], r["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        if store:
            ctx.responses.put(rid, r, conversation + out.conversation_tail())
        return r

    if not stream:
        async def run():
            reason, n = await drive(ctx, rid, arrival, h, out)
            out.finish()
            return reason, n

        ((reason, n),) = await ctx.await_or_cancel(request, [run()], [h])
        return final(reason, n)

    async def run(_, put):
        def send(evs):
            for name, data in evs:
                put(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n")

        start = dict(base, output=[], status="in_progress", usage=None)
        send([out.event("response.created", response=start), out.event("response.in_progress", response=start)])
        try:
            reason, n = await drive(ctx, rid, arrival, h, out, send)
            send(out.finish())
            r = final(reason, n)
            send([out.event("response.incomplete" if r["status"] == "incomplete" else "response.completed",
                            response=r)])
        except ApiError as e:
            send([out.event("error", code=e.code, message=e.message, param=e.param),
                  out.event("response.failed", response=dict(base, output=out.items, status="failed",
                                                             error={"code": e.code, "message": e.message}))])

    async def events():
        try:
            async for item in fan_in(1, run):
                yield item
        finally:
            ctx.runner.abort(h)

    return events()
