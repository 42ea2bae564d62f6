"""The harmony chat format of gpt-oss: rendering OpenAI-chat-style messages to tokens, and parsing
generated tokens back into messages (all at once or incrementally, for streaming).

Rendering follows OpenAI's harmony reference renderer (the `openai-harmony` package) token for
token: each header piece is tokenized on its own, special tokens are single ids, the system
message carries identity / knowledge cutoff / date / reasoning effort / valid channels, and the
developer message carries the instructions and the `namespace functions { ... }` tool block.

Chat messages map to harmony messages like this:
  system, developer  -> the developer message's instructions (joined with a blank line)
  user               -> <|start|>user<|message|>TEXT<|end|>
  assistant          -> optional `thinking` on the analysis channel, then either the `content` on
                        the final channel, or each of `tool_calls` as
                        <|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json
                        <|message|>ARGS<|call|> (a `content` next to tool calls is a commentary preamble)
  tool               -> <|start|>functions.NAME to=assistant<|channel|>commentary<|message|>TEXT<|end|>
                        (NAME from the message's `name`, its `tool_call_id`, or the last call)
The analysis of every turn that ended in a final answer is dropped; analysis after the last final
answer (an unfinished tool-calling chain) is kept, as the format requires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from . import tokenizer as tok

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
CHANNELS = ("analysis", "commentary", "final")
EFFORTS = ("low", "medium", "high")
CONSTRAIN = "<|constrain|>"
# Tokens that end a message inside generated output; the last two also end generation.
END_TOKENS = {tok.END: "end", tok.RETURN: "return", tok.CALL: "call"}
GENERATION_STOPS = (tok.RETURN, tok.CALL)


class HarmonyError(ValueError):
    """Messages or tools that cannot be rendered; the message says which and why."""


@dataclass
class Message:
    """One harmony message. `author` is the role, or the tool's name for tool results."""
    role: str
    text: str = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None          # tool author name, e.g. "functions.get_weather"
    end: str | None = None           # parse result: "end", "return", "call", or None if cut off

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


# ---- JSON schema -> TypeScript-like declarations (as the harmony renderer writes them) ---------

def _is_enum(schema: dict) -> bool:
    e = schema.get("enum")
    return isinstance(e, list) and len(e) > 0


def _json_compact(v) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def _default_text(schema: dict, default, quote_enum_strings: bool) -> str:
    """`default: ...` as harmony writes it: quoted strings unless the schema is an enum."""
    if isinstance(default, str):
        if not _is_enum(schema):
            return f'default: "{default}"'
        return f"default: {_json_compact(default)}" if quote_enum_strings else f"default: {default}"
    return f"default: {_json_compact(default)}"


def _with_null(schema: dict, text: str) -> str:
    if schema.get("nullable") is True and "null" not in text:
        return f"{text} | null"
    return text


def schema_to_typescript(schema, indent: str = "") -> str:
    if not isinstance(schema, dict):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            variant = variant if isinstance(variant, dict) else {}
            out += f"\n{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
            notes = []
            if isinstance(variant.get("description"), str):
                notes.append(variant["description"])
            if "default" in variant:
                notes.append(_default_text(variant, variant["default"], quote_enum_strings=True))
            if notes:
                out += " // " + " ".join(notes)
        return out
    ty = schema.get("type")
    if isinstance(ty, list):
        names = [{"integer": "number"}.get(t, t) for t in ty if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(ty, str):
        return "any"
    if ty == "object":
        return _object_to_typescript(schema, indent)
    if ty == "string":
        if _is_enum(schema):
            names = [f'"{v}"' for v in schema["enum"] if isinstance(v, str)]
            if names:
                return " | ".join(names)
        return "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        items = schema.get("items")
        return f"{schema_to_typescript(items, indent)}[]" if items is not None else "Array<any>"
    return "any"


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    if isinstance(schema.get("description"), str):
        out += f"{indent}// {schema['description']}\n"
    out += "{\n"
    props = schema.get("properties")
    required = {r for r in schema.get("required", []) if isinstance(r, str)} if isinstance(
        schema.get("required"), list) else set()
    for key, val in (props.items() if isinstance(props, dict) else []):
        val = val if isinstance(val, dict) else {}
        opt = "" if key in required else "?"
        if isinstance(val.get("title"), str):
            out += f"{indent}// {val['title']}\n{indent}//\n"
        one_of = val.get("oneOf")
        if one_of is None and isinstance(val.get("description"), str):
            out += f"{indent}// {val['description']}\n"
        examples = val.get("examples")
        if isinstance(examples, list) and examples:
            out += f"{indent}// Examples:\n"
            for ex in examples:
                if isinstance(ex, str):
                    out += f'{indent}// - "{ex}"\n'
        if isinstance(one_of, list):
            out += _one_of_property(key, val, one_of, opt, indent)
            continue
        out += f"{indent}{key}{opt}: " + _with_null(val, schema_to_typescript(val, indent + "    ")) + ","
        if "default" in val:
            out += " // " + _default_text(val, val["default"], quote_enum_strings=False)
        out += "\n"
    return out + f"{indent}}}"


def _one_of_property(key: str, val: dict, variants: list, opt: str, indent: str) -> str:
    out = ""
    desc = val.get("description") if isinstance(val.get("description"), str) else None
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    skip = desc is not None and first.get("description") == desc
    above = False
    if desc is not None and not skip:
        out += f"{indent}// {desc}\n"
        above = True
    if "default" in val:
        out += f"{indent}// " + _default_text(val, val["default"], quote_enum_strings=False) + "\n"
    out += f"{indent}{key}{opt}:\n"
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | " + _with_null(variant, schema_to_typescript(variant, indent + "   "))
        notes = []
        vdesc = variant.get("description")
        if not (i == 0 and above) and isinstance(vdesc, str) and vdesc != desc:
            notes.append(vdesc)
        if "default" in variant:
            notes.append(_default_text(variant, variant["default"], quote_enum_strings=False))
        if notes:
            out += " // " + " ".join(notes)
        out += "\n"
    return out + f"{indent},\n"


def _lines(text: str) -> list[str]:
    """Lines as Rust's str::lines splits them (no empty last line for a trailing newline)."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def _normalize_tools(tools) -> list[dict]:
    """OpenAI function tools -> [{name, description, parameters}]."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise HarmonyError(f"tools[{i}] must be a dict, got {type(t).__name__}")
        if t.get("type", "function") != "function":
            raise HarmonyError(f"tools[{i}]: only function tools are supported, got type {t.get('type')!r}")
        fn = t.get("function", t)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise HarmonyError(f"tools[{i}] needs a function name without spaces, got {name!r}")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise HarmonyError(f"tools[{i}] ({name}): parameters must be a JSON schema object")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise HarmonyError(f"tools[{i}] ({name}): description must be a string")
        out.append({"name": name, "description": desc, "parameters": params})
    return out


def tools_section(tools: list[dict]) -> str:
    """The `# Tools` block declaring function tools in `namespace functions`."""
    body = ["## functions\n", "namespace functions {\n"]
    for t in tools:
        body += [f"// {line}" for line in _lines(t["description"])]
        if t["parameters"] is not None:
            body.append(f"type {t['name']} = (_: {schema_to_typescript(t['parameters'])}) => any;\n")
        else:
            body.append(f"type {t['name']} = () => any;\n")
    body.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(body)


# ---- chat messages -> harmony messages ----------------------------------------------------------

def _text_of(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(p.get("text", "")))
            else:
                raise HarmonyError(f"{where}: only text content is supported, got {p!r:.60}")
        return "".join(parts)
    raise HarmonyError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def to_harmony(messages, *, tools=None, reasoning_effort: str = "medium", model_identity: str | None = None,
               current_date: str | None = None, knowledge_cutoff: str | None = "2024-06") -> list[Message]:
    """OpenAI-chat-style dicts -> the harmony conversation (system, developer, then the turns)."""
    if reasoning_effort not in EFFORTS:
        raise HarmonyError(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {reasoning_effort!r}")
    if not isinstance(messages, (list, tuple)):
        raise HarmonyError(f"messages must be a list of dicts, got {type(messages).__name__}")
    fn_tools = _normalize_tools(tools)

    instructions, turns = [], []
    calls_by_id: dict[str, str] = {}
    last_call = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise HarmonyError(f"messages[{i}] must be a dict with a 'role'")
        role = m["role"]
        where = f"messages[{i}] ({role})"
        if role in ("system", "developer"):
            instructions.append(_text_of(m.get("content"), where))
        elif role == "user":
            turns.append(Message("user", _text_of(m.get("content"), where)))
        elif role == "assistant":
            thinking = m.get("thinking", m.get("reasoning_content"))
            if thinking:
                turns.append(Message("assistant", _text_of(thinking, where), channel="analysis"))
            content = _text_of(m.get("content"), where)
            calls = m.get("tool_calls") or []
            if calls:
                if content:
                    turns.append(Message("assistant", content, channel="commentary"))
                for j, call in enumerate(calls):
                    fn = call.get("function", call) if isinstance(call, dict) else None
                    name = fn.get("name") if isinstance(fn, dict) else None
                    if not isinstance(name, str) or not name:
                        raise HarmonyError(f"{where}: tool_calls[{j}] has no function name")
                    args = fn.get("arguments", "{}")
                    if not isinstance(args, str):
                        args = json.dumps(args, ensure_ascii=False)
                    recipient = name if "." in name else f"functions.{name}"
                    turns.append(Message("assistant", args, channel="commentary", recipient=recipient,
                                         content_type=f"{CONSTRAIN}json"))
                    last_call = recipient
                    if isinstance(call, dict) and call.get("id"):
                        calls_by_id[call["id"]] = recipient
            elif content or not thinking:
                turns.append(Message("assistant", content, channel="final"))
        elif role == "tool":
            name = m.get("name")
            if name:
                author = name if "." in name else f"functions.{name}"
            elif m.get("tool_call_id") in calls_by_id:
                author = calls_by_id[m["tool_call_id"]]
            elif last_call:
                author = last_call
            else:
                raise HarmonyError(f"{where}: a tool result needs a 'name' or an earlier tool call")
            turns.append(Message("tool", _text_of(m.get("content"), where), channel="commentary",
                                 recipient="assistant", name=author))
        else:
            raise HarmonyError(f"{where}: unknown role {role!r} (system, developer, user, assistant, tool)")

    # Drop the analysis of every turn that ended in a final answer.
    last_final = max((k for k, t in enumerate(turns) if t.role == "assistant" and t.channel == "final"), default=-1)
    turns = [t for k, t in enumerate(turns) if not (t.channel == "analysis" and k < last_final)]

    system = Message("system", _system_text(model_identity, knowledge_cutoff, current_date, reasoning_effort,
                                            has_function_tools=bool(fn_tools)))
    out = [system]
    if instructions or fn_tools:
        sections = []
        if instructions:
            sections += ["# Instructions", "\n\n".join(instructions)]
        if fn_tools:
            sections.append(tools_section(fn_tools))
        out.append(Message("developer", "\n\n".join(sections)))
    return out + turns


def _system_text(identity, cutoff, date, effort, has_function_tools: bool) -> str:
    top = [t for t in (identity if identity is not None else DEFAULT_IDENTITY,
                       f"Knowledge cutoff: {cutoff}" if cutoff else "",
                       f"Current date: {date}" if date else "") if t]
    channels = f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections = (["\n".join(top)] if top else []) + [f"Reasoning: {effort}", channels]
    return "\n\n".join(sections)


# ---- harmony messages -> tokens -----------------------------------------------------------------

def encode_message(m: Message) -> list[int]:
    """One message as the reference renderer tokenizes it (header pieces encoded separately)."""
    enc = tok.get_tokenizer()
    out = [tok.START]
    if m.role == "tool":
        out += enc.encode_ordinary(m.name or "")
    else:
        out += enc.encode_ordinary(m.role)
    if m.recipient and m.recipient != "all":
        out += enc.encode_ordinary(f" to={m.recipient}")
    if m.channel:
        out.append(tok.CHANNEL)
        out += enc.encode_ordinary(m.channel)
    if m.content_type:
        if m.content_type.startswith(CONSTRAIN):
            out += enc.encode_ordinary(" ")
            out.append(tok.CONSTRAIN)
            rest = m.content_type[len(CONSTRAIN):]
            if rest:
                out += enc.encode_ordinary(rest)
        else:
            out += enc.encode_ordinary(f" {m.content_type}")
    out.append(tok.MESSAGE)
    out += enc.encode_ordinary(m.text)
    out.append(tok.CALL if m.role == "assistant" and m.recipient else tok.END)
    return out


def render(messages, *, tools=None, reasoning_effort: str = "medium", model_identity: str | None = None,
           current_date: str | None = None, knowledge_cutoff: str | None = "2024-06",
           add_generation_prompt: bool = True) -> list[int]:
    """Render a chat (OpenAI-style message dicts, optional function tools) to harmony tokens,
    ending with `<|start|>assistant` when add_generation_prompt."""
    convo = to_harmony(messages, tools=tools, reasoning_effort=reasoning_effort, model_identity=model_identity,
                       current_date=current_date, knowledge_cutoff=knowledge_cutoff)
    out = []
    for m in convo:
        out += encode_message(m)
    if add_generation_prompt:
        out.append(tok.START)
        out += tok.get_tokenizer().encode_ordinary("assistant")
    return out


# ---- parsing --------------------------------------------------------------------------------------

@dataclass
class Delta:
    """A piece of streamed output: `text` appended to message number `index`."""
    index: int
    message: Message
    text: str


class StreamParser:
    """Incremental harmony parser. Feed generated tokens with `push`; it returns the text delta
    (if any) of the message being written. Malformed output never raises: stray tokens between
    messages are skipped (and counted), a header cut by an end token gives a message with empty
    text, a new <|start|> inside a message closes it, and `finish()` closes a message cut off by
    the token limit (its `end` stays None).

    role: the role whose header comes next (generation starts after `<|start|>assistant`), or None
    when the tokens begin with `<|start|>`."""

    def __init__(self, role: str | None = "assistant"):
        self._enc = tok.get_tokenizer()
        self.messages: list[Message] = []
        self.stray_tokens = 0
        self._role = role
        self._state = "header" if role else "start"
        self._header: list[int] = []
        self._current: Message | None = None
        self._decoder: tok.StreamDecoder | None = None

    @property
    def current(self) -> Message | None:
        """The message whose content is being written, if any."""
        return self._current

    def push(self, token: int) -> Delta | None:
        token = int(token)
        if self._state == "start":
            if token == tok.START:
                self._state, self._header, self._role = "header", [], None
            else:
                self.stray_tokens += 1
            return None
        if self._state == "header":
            if token == tok.MESSAGE:
                self._open(self._parse_header(self._header, self._role))
            elif token in END_TOKENS:    # a header cut short: what follows the channel is text
                m = self._parse_header(self._header, self._role, full=False)
                m.end = END_TOKENS[token]
                self.messages.append(m)
                self._state, self._role = "start", None
            elif token == tok.START:
                self._header, self._role = [], None
            else:
                self._header.append(token)
            return None
        # content
        if token in END_TOKENS:
            self._close(END_TOKENS[token])
            return None
        if token == tok.START:
            self._close(None)
            self._state, self._header, self._role = "header", [], None
            return None
        piece = self._decoder.push(token)
        if piece:
            self._current.text += piece
            return Delta(len(self.messages) - 1, self._current, piece)
        return None

    def finish(self) -> list[Message]:
        """End of output: close what is open. Returns all messages."""
        if self._state == "content":
            self._close(None)
        elif self._state == "header" and self._header:
            self.messages.append(self._parse_header(self._header, self._role, full=False))
        self._state = "start"
        return self.messages

    def _open(self, m: Message) -> None:
        self.messages.append(m)
        self._current, self._decoder = m, tok.StreamDecoder()
        self._state, self._role = "content", None

    def _close(self, end: str | None) -> None:
        if self._current is not None:
            self._current.text += self._decoder.flush()
            self._current.end = end
        self._current = None
        self._state = "start"

    def _parse_header(self, tokens: list[int], role: str | None, full: bool = True) -> Message:
        """Header tokens -> Message (empty text). full=False (a header that never reached
        <|message|>): only role and channel are read, the rest becomes the text."""
        text = self._enc.decode(tokens)
        channel = None
        i = text.find("<|channel|>")
        if i >= 0:
            rest = text[i + len("<|channel|>"):]
            j = 0
            while j < len(rest) and not rest[j].isspace() and rest[j] != "<":
                j += 1
            channel = rest[:j] or None
            text = text[:i] + rest[j:]
        text = text.replace(CONSTRAIN, f" {CONSTRAIN}").strip()
        parts = text.split()
        name = None
        if role is None:
            first = parts.pop(0) if parts else "assistant"
            if first in ("system", "developer", "user", "assistant"):
                role = first
            else:                                   # a tool speaking: its name is the author
                role, name = "tool", first
        elif parts and parts[0] == role:
            parts.pop(0)
        recipient = content_type = None
        if not full:
            return Message(role, " ".join(parts), channel=channel, name=name)
        if parts:
            n, last = len(parts), parts.pop()
            if last.startswith("to="):
                recipient = last[3:]
            elif n == 1 and not last.startswith(CONSTRAIN):
                recipient = last
            else:
                content_type = last
                if parts:
                    r = parts.pop()
                    recipient = r[3:] if r.startswith("to=") else r
        return Message(role, "", channel=channel, recipient=recipient, content_type=content_type, name=name)


def parse(tokens: Iterable[int], role: str | None = "assistant") -> list[Message]:
    """Parse generated tokens (by default what follows `<|start|>assistant`) into messages."""
    p = StreamParser(role)
    for t in tokens:
        p.push(t)
    return p.finish()


# ---- chat() ---------------------------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str                    # function name (without "functions.")
    arguments: dict | list | None  # parsed JSON, or None when the text is not valid JSON
    raw: str                     # the arguments exactly as generated
    recipient: str = ""
    error: str | None = None     # why the JSON did not parse


@dataclass
class ChatResult:
    text: str = ""               # the final answer
    reasoning: str = ""          # analysis channel
    commentary: str = ""         # commentary without a recipient (preambles)
    tool_calls: list[ToolCall] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stop: str = "length"         # "return", "call", or "length"

    def as_assistant_message(self) -> dict:
        """This reply as a chat message to append to the history."""
        m = {"role": "assistant", "content": self.text}
        if self.reasoning:
            m["thinking"] = self.reasoning
        if self.tool_calls:
            m["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.raw}}
                               for c in self.tool_calls]
        return m


@dataclass
class ChatDelta:
    """A streamed event: kind is "reasoning", "text", "commentary", "tool_call" (a call starts:
    `name`), "tool_call_arguments" (`text` appended to the call's arguments), "other" (an unknown
    channel), or "done" (`result` holds the ChatResult)."""
    kind: str
    text: str = ""
    name: str | None = None
    result: ChatResult | None = None


def _kind(m: Message) -> str:
    if m.recipient and m.role == "assistant":
        return "tool_call_arguments"
    return {"analysis": "reasoning", "final": "text", "commentary": "commentary"}.get(m.channel or "", "other")


def _tool_call(m: Message) -> ToolCall:
    name = m.recipient[len("functions."):] if m.recipient.startswith("functions.") else m.recipient
    try:
        args, err = json.loads(m.text), None
    except ValueError as e:
        args, err = None, f"invalid JSON arguments: {e}"
    return ToolCall(name, args, m.text, m.recipient, err)


def _result(messages: list[Message], tokens: list[int], stop: str) -> ChatResult:
    r = ChatResult(messages=messages, tokens=tokens, stop=stop)
    for m in messages:
        k = _kind(m)
        if k == "tool_call_arguments":
            r.tool_calls.append(_tool_call(m))
        elif k == "reasoning":
            r.reasoning += m.text
        elif k == "text":
            r.text += m.text
        elif k == "commentary":
            r.commentary += m.text
    return r


def chat(model, messages, *, tools=None, reasoning_effort: str = "medium", stream: bool = False,
         max_new_tokens: int = 1024, model_identity: str | None = None, current_date: str | None = None,
         **sampling):
    """Render the chat, generate until <|return|> or <|call|>, and parse the reply.

    Returns a ChatResult (final text, reasoning, tool calls with parsed JSON arguments). With
    stream=True returns an iterator of ChatDelta events, the last one of kind "done"."""
    prompt = render(messages, tools=tools, reasoning_effort=reasoning_effort, model_identity=model_identity,
                    current_date=current_date)
    stops = set(sampling.pop("stop_tokens", None) or ()) | set(GENERATION_STOPS) | {tok.ENDOFTEXT}
    gen = model.generate(prompt, max_new_tokens=max_new_tokens, stop_tokens=sorted(stops), stream=True,
                         **sampling)
    events = _chat_events(gen)
    if stream:
        return events
    for ev in events:
        if ev.kind == "done":
            return ev.result
    raise RuntimeError("chat ended without a result")  # pragma: no cover


class ChatStream:
    """Incremental chat output, the one road from generated tokens to chat events (used by `chat()`
    and by the server): `push(token)` returns the ChatDelta events that token completes, `finish()`
    the final "done" event with the ChatResult.

    prefix: tokens the caller forced after `<|start|>assistant` (e.g. the header of a tool call,
    `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>`): parsed as if generated
    (their events come with the first pushed token), not counted as output. `reasoning_tokens` counts the tokens of analysis messages (header to end)."""

    def __init__(self, prefix: Iterable[int] = ()):
        self.parser = StreamParser("assistant")
        self.tokens: list[int] = []
        self.stop = "length"
        self.reasoning_tokens = 0
        self._announced = None
        self._header: list[int] = []
        self._queued: list[ChatDelta] = []       # the prefix's events, handed out with the first token
        for t in prefix:
            self._queued += self._push(int(t), count=False)

    def push(self, token: int) -> list[ChatDelta]:
        token = int(token)
        self.tokens.append(token)
        queued, self._queued = self._queued, []
        return queued + self._push(token, count=True)

    def _push(self, t: int, count: bool) -> list[ChatDelta]:
        if t in GENERATION_STOPS:
            self.stop = END_TOKENS[t]
        before = self.parser.current
        d = self.parser.push(t)
        cur = self.parser.current
        if count:
            self._header.append(t)
            if cur is not None and cur is not before:          # a header just completed
                if cur.channel == "analysis":
                    self.reasoning_tokens += len(self._header)
                self._header = []
            elif cur is not None:                               # content
                self._header = []
                if cur.channel == "analysis":
                    self.reasoning_tokens += 1
            elif before is not None:                            # the token that closed a message
                if before.channel == "analysis":
                    self.reasoning_tokens += 1
                self._header = []
        out = []
        if cur is not None and cur is not self._announced and cur.recipient and cur.role == "assistant":
            self._announced = cur
            name = cur.recipient[len("functions."):] if cur.recipient.startswith("functions.") else cur.recipient
            out.append(ChatDelta("tool_call", name=name))
        if d is not None:
            out.append(ChatDelta(_kind(d.message), d.text))
        return out

    def finish(self) -> ChatDelta:
        return ChatDelta("done", result=_result(self.parser.finish(), self.tokens, self.stop))


def _chat_events(gen) -> Iterator[ChatDelta]:
    s = ChatStream()
    for t in gen:
        yield from s.push(t)
    yield s.finish()
