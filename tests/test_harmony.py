"""Harmony: golden renders for every message kind, token identity with OpenAI's reference renderer
(openai-harmony, an optional test dependency), parsing (one-shot and streaming), chat()."""

import json
import os
from pathlib import Path

import pytest

from gptoss_ext import harmony as h
from gptoss_ext import tokenizer as tok
from replay import ReplayModel

pytestmark = pytest.mark.usefixtures("tokenizer_file")

SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\n\nReasoning: {effort}\n\n# Valid channels: analysis, commentary, final. "
          "Channel must be included for every message.{calls}<|end|>")
CALLS = "\nCalls to these tools must go to the commentary channel: 'functions'."

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Gets the current weather in the provided location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]}}}
LOCATION = {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user."}}
COMPLEX = {"type": "function", "function": {
    "name": "search", "description": "Searches the catalogue.\nReturns at most `limit` items.",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "description": "What to look for", "examples": ["red shoes"]},
        "limit": {"type": "integer", "default": 10},
        "filters": {"type": "object", "description": "Optional filters", "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "price": {"type": ["number", "null"], "description": "Max price"},
            "in_stock": {"type": "boolean", "default": True}}, "required": ["tags"]},
        "sort": {"oneOf": [{"type": "string", "enum": ["asc", "desc"]}, {"type": "null"}],
                 "description": "Order"}},
        "required": ["query"]}}}


def text(tokens):
    return tok.decode(tokens)


def system(effort="medium", calls=False):
    return SYSTEM.format(effort=effort, calls=CALLS if calls else "")


# ---- golden renders -----------------------------------------------------------------------------

def test_system_becomes_developer_instructions():
    got = text(h.render([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]))
    assert got == (system() + "<|start|>developer<|message|># Instructions\n\nBe terse.<|end|>"
                   "<|start|>user<|message|>Hi<|end|><|start|>assistant")


def test_no_instructions_no_developer_message():
    got = text(h.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False))
    assert got == system() + "<|start|>user<|message|>Hi<|end|>"


def test_tools_with_enums_optional_and_defaults():
    got = text(h.render([{"role": "developer", "content": "Always respond in riddles"},
                         {"role": "user", "content": "What is the weather like in SF?"}],
                        tools=[LOCATION, WEATHER]))
    dev = ("<|start|>developer<|message|># Instructions\n\nAlways respond in riddles\n\n# Tools\n\n## functions\n\n"
           "namespace functions {\n\n// Gets the location of the user.\ntype get_location = () => any;\n\n"
           "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
           "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
           "format?: \"celsius\" | \"fahrenheit\", // default: celsius\n}) => any;\n\n} // namespace functions<|end|>")
    assert got == (system(calls=True) + dev + "<|start|>user<|message|>What is the weather like in SF?<|end|>"
                   "<|start|>assistant")


def test_nested_arrays_nullable_oneof_examples():
    got = text(h.render([{"role": "user", "content": "x"}], tools=[COMPLEX]))
    assert ("// Searches the catalogue.\n// Returns at most `limit` items.\ntype search = (_: {\n"
            "// What to look for\n// Examples:\n// - \"red shoes\"\nquery: string,\n"
            "limit?: number, // default: 10\n"
            "// Optional filters\nfilters?:     // Optional filters\n{\n"
            "    tags: string[],\n    // Max price\n    price?: number | null,\n"
            "    in_stock?: boolean, // default: true\n    },\n"
            "// Order\nsort?:\n | \"asc\" | \"desc\"\n | any\n,\n}) => any;") in got


def test_multi_turn_drops_earlier_analysis_keeps_open_chain():
    msgs = [{"role": "user", "content": "Q1"},
            {"role": "assistant", "thinking": "T1", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "thinking": "T2", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_location", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Paris"}]
    got = text(h.render(msgs, tools=[LOCATION]))
    assert "T1" not in got and "<|channel|>analysis<|message|>T2<|end|>" in got
    assert got.endswith(
        "<|start|>user<|message|>Q1<|end|><|start|>assistant<|channel|>final<|message|>A1<|end|>"
        "<|start|>user<|message|>Q2<|end|><|start|>assistant<|channel|>analysis<|message|>T2<|end|>"
        "<|start|>assistant to=functions.get_location<|channel|>commentary <|constrain|>json<|message|>{}<|call|>"
        "<|start|>functions.get_location to=assistant<|channel|>commentary<|message|>Paris<|end|>"
        "<|start|>assistant")
    # once the chain ends in a final answer, its analysis is dropped too
    done = text(h.render(msgs + [{"role": "assistant", "content": "It is Paris."}]))
    assert "T2" not in done and "It is Paris." in done


def test_tool_call_arguments_dict_and_result_name():
    msgs = [{"role": "user", "content": "w?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_current_weather",
                                                               "arguments": {"location": "Tokyo"}}}]},
            {"role": "tool", "name": "get_current_weather", "content": '{"temperature": 20}'}]
    got = text(h.render(msgs, tools=[WEATHER], add_generation_prompt=False))
    assert got.endswith('<|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json'
                        '<|message|>{"location": "Tokyo"}<|call|><|start|>functions.get_current_weather to=assistant'
                        '<|channel|>commentary<|message|>{"temperature": 20}<|end|>')


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_reasoning_effort(effort):
    assert text(h.render([], reasoning_effort=effort, add_generation_prompt=False)) == system(effort)


def test_identity_date_cutoff():
    got = text(h.render([], model_identity="You are a pirate.", current_date="2025-08-05",
                        knowledge_cutoff="2023-10", add_generation_prompt=False))
    assert got.startswith("<|start|>system<|message|>You are a pirate.\nKnowledge cutoff: 2023-10\n"
                          "Current date: 2025-08-05\n\nReasoning: medium\n\n")


@pytest.mark.parametrize("bad,match", [
    (dict(messages=[{"role": "wizard", "content": "x"}]), "unknown role"),
    (dict(messages=[{"content": "x"}]), "role"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "tool result needs"),
    (dict(messages=[], reasoning_effort="max"), "reasoning_effort"),
    (dict(messages=[], tools=[{"type": "function", "function": {"name": "a b"}}]), "function name"),
    (dict(messages=[], tools=[{"type": "browser"}]), "only function tools"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text"),
])
def test_render_errors(bad, match):
    with pytest.raises(h.HarmonyError, match=match):
        h.render(**bad)


# ---- token identity with the reference renderer ----------------------------------------------

@pytest.fixture(scope="module")
def oracle(tokenizer_file):
    oh = pytest.importorskip("openai_harmony", reason="openai-harmony (reference renderer) is not installed")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(Path(tokenizer_file).parent)
    return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def reference_tokens(oh, enc, convo, tools, effort, identity=None, date=None, cutoff="2024-06"):
    """The same conversation built with openai_harmony's own objects."""
    msgs = []
    for m in convo:
        if m.role == "system":
            sc = oh.SystemContent.new().with_reasoning_effort(
                {"low": oh.ReasoningEffort.LOW, "medium": oh.ReasoningEffort.MEDIUM, "high": oh.ReasoningEffort.HIGH}[effort])
            if identity:
                sc = sc.with_model_identity(identity)
            if date:
                sc = sc.with_conversation_start_date(date)
            sc = sc.with_knowledge_cutoff(cutoff)
            msgs.append(oh.Message.from_role_and_content(oh.Role.SYSTEM, sc))
        elif m.role == "developer":
            dc = oh.DeveloperContent.new()
            if m.text.startswith("# Instructions\n\n"):
                instr = m.text[len("# Instructions\n\n"):].split("\n\n# Tools\n\n")[0]
                dc = dc.with_instructions(instr)
            if tools:
                dc = dc.with_function_tools([oh.ToolDescription.new(
                    t["function"]["name"], t["function"].get("description", ""),
                    parameters=t["function"].get("parameters")) for t in tools])
            msgs.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dc))
        else:
            if m.role == "tool":
                msg = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, m.name), m.text)
            else:
                msg = oh.Message.from_role_and_content(oh.Role(m.role), m.text)
            if m.channel:
                msg = msg.with_channel(m.channel)
            if m.recipient:
                msg = msg.with_recipient(m.recipient)
            if m.content_type:
                msg = msg.with_content_type(m.content_type)
            msgs.append(msg)
    return enc.render_conversation_for_completion(oh.Conversation.from_messages(msgs), oh.Role.ASSISTANT)


CASES = [
    dict(messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]),
    dict(messages=[{"role": "developer", "content": "Riddles."}, {"role": "user", "content": "SF?"}],
         tools=[LOCATION, WEATHER]),
    dict(messages=[{"role": "user", "content": "x"}], tools=[COMPLEX], reasoning_effort="high"),
    dict(messages=[{"role": "user", "content": "Q1"}, {"role": "assistant", "thinking": "T1", "content": "A1"},
                   {"role": "user", "content": "Q2 ünïcode 🙂"},
                   {"role": "assistant", "thinking": "T2", "tool_calls": [
                       {"id": "c1", "function": {"name": "get_current_weather", "arguments": '{"location":"Oslo"}'}}]},
                   {"role": "tool", "tool_call_id": "c1", "content": '{"t": -3}'}], tools=[WEATHER],
         reasoning_effort="low", current_date="2025-08-05"),
    dict(messages=[{"role": "user", "content": "a"}], model_identity="You are a pirate.", current_date="2025-01-01"),
]


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_token_identical_to_reference_renderer(oracle, case):
    oh, enc = oracle
    ours = h.render(**case)
    kwargs = {k: v for k, v in case.items() if k not in ("messages", "tools")}
    convo = h.to_harmony(case["messages"], tools=case.get("tools"), **kwargs)
    want = reference_tokens(oh, enc, convo, case.get("tools"), case.get("reasoning_effort", "medium"),
                            case.get("model_identity"), case.get("current_date"))
    assert ours == list(want)


# ---- parsing -------------------------------------------------------------------------------------

def gen(s):
    return tok.encode(s)


def test_parse_analysis_and_final():
    ms = h.parse(gen("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>"
                     "Answer.<|return|>"))
    assert [(m.role, m.channel, m.text, m.end) for m in ms] == [
        ("assistant", "analysis", "Think.", "end"), ("assistant", "final", "Answer.", "return")]


def test_parse_tool_call_with_constrain():
    m, = h.parse(gen(" to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
                     '{"location": "SF"}<|call|>'))
    assert (m.recipient, m.channel, m.content_type, m.text, m.end) == (
        "functions.get_weather", "commentary", "<|constrain|>json", '{"location": "SF"}', "call")


def test_parse_cut_mid_message_and_mid_header():
    m, = h.parse(gen("<|channel|>final<|message|>Hello wor"))
    assert (m.text, m.end) == ("Hello wor", None)
    m, = h.parse(gen("<|channel|>fin"))
    assert m.end is None and m.recipient is None


def test_parse_stray_and_unknown():
    p = h.StreamParser()
    for t in gen("<|channel|>final<|message|>A<|end|>junk<|reserved_200100|><|start|>assistant<|channel|>weird"
                 "<|message|>B<|end|><|start|>assistant<|channel|>final<|message|>C<|start|>assistant"
                 "<|channel|>final<|message|>D<|return|>"):
        p.push(t)
    ms = p.finish()
    assert [(m.channel, m.text, m.end) for m in ms] == [
        ("final", "A", "end"), ("weird", "B", "end"), ("final", "C", None), ("final", "D", "return")]
    assert p.stray_tokens == len(gen("junk")) + 1


def test_parse_tool_author_and_header_cut_by_end():
    ms = h.parse(gen("<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>{}<|end|>"
                     "<|start|>assistant<|channel|>final<|end|>"), role=None)
    assert (ms[0].role, ms[0].name, ms[0].recipient) == ("tool", "functions.lookup", "assistant")
    assert (ms[1].channel, ms[1].text, ms[1].end) == ("final", "", "end")


def test_parse_never_raises_on_garbage():
    import random
    rng = random.Random(0)
    specials = [tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.CALL, tok.RETURN, tok.CONSTRAIN]
    for _ in range(200):
        toks = [rng.choice(specials) if rng.random() < 0.3 else rng.randrange(0, 199998) for _ in range(40)]
        h.parse(toks)
        h.parse(toks, role=None)


def test_streaming_equals_one_shot_and_reference(oracle):
    oh, enc = oracle
    s = ("<|channel|>analysis<|message|>Hm, 世界 🙂 ok.<|end|><|start|>assistant to=functions.f<|channel|>commentary "
         "<|constrain|>json<|message|>{\"a\": [1, 2]}<|call|>")
    toks = gen(s)
    p = h.StreamParser()
    pieces = {}
    for t in toks:
        d = p.push(t)
        if d:
            pieces[d.index] = pieces.get(d.index, "") + d.text
    ms = p.finish()
    assert [m.text for m in ms] == [pieces[0], pieces[1]] == [m.text for m in h.parse(toks)]
    ref = enc.parse_messages_from_completion_tokens(toks, oh.Role.ASSISTANT)
    assert [(r.channel, r.recipient, r.content_type, r.content[0].text) for r in ref] == [
        (m.channel, m.recipient, m.content_type, m.text) for m in ms]


# ---- chat() --------------------------------------------------------------------------------------

class Scripted(ReplayModel):
    """The stand-in model, also recording the prompts it is given."""

    def __init__(self, *replies):
        super().__init__(list(replies))
        self.prompts = []

    def generate(self, prompt, **kw):
        self.prompts.append(prompt)
        return super().generate(prompt, **kw)


def test_chat_final_and_reasoning():
    m = Scripted("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>")
    r = h.chat(m, [{"role": "user", "content": "2+2?"}], reasoning_effort="low")
    assert (r.text, r.reasoning, r.tool_calls, r.stop) == ("4", "Easy.", [], "return")
    assert m.prompts[0] == h.render([{"role": "user", "content": "2+2?"}], reasoning_effort="low")


def test_chat_tool_calls_valid_and_invalid_json():
    m = Scripted(' to=functions.get_current_weather<|channel|>commentary <|constrain|>json<|message|>'
                 '{"location": "Paris"}<|call|>',
                 ' to=functions.get_location<|channel|>commentary <|constrain|>json<|message|>{oops<|call|>')
    r = h.chat(m, [{"role": "user", "content": "w?"}], tools=[WEATHER, LOCATION])
    assert r.stop == "call" and r.tool_calls[0].name == "get_current_weather"
    assert r.tool_calls[0].arguments == {"location": "Paris"} and r.tool_calls[0].error is None
    r2 = h.chat(m, [{"role": "user", "content": "w?"}], tools=[WEATHER, LOCATION])
    assert r2.tool_calls[0].arguments is None and r2.tool_calls[0].raw == "{oops" and "invalid JSON" in r2.tool_calls[0].error
    follow = [{"role": "user", "content": "w?"}, r.as_assistant_message(),
              {"role": "tool", "name": "get_current_weather", "content": "20C"}]
    assert "<|start|>functions.get_current_weather to=assistant" in text(h.render(follow, tools=[WEATHER]))


def test_chat_stream_events():
    m = Scripted("<|channel|>analysis<|message|>ab<|end|><|start|>assistant to=functions.f<|channel|>commentary "
                 "<|constrain|>json<|message|>{}<|call|>")
    evs = list(h.chat(m, [{"role": "user", "content": "x"}], stream=True))
    kinds = [e.kind for e in evs]
    assert kinds[0] == "reasoning" and "tool_call" in kinds and kinds[-1] == "done"
    i = kinds.index("tool_call")
    assert evs[i].name == "f" and kinds[i + 1] == "tool_call_arguments"
    assert "".join(e.text for e in evs if e.kind == "reasoning") == "ab"
    assert evs[-1].result.tool_calls[0].arguments == {}


def test_chat_with_real_model(tiny_bf16):
    r = h.chat(tiny_bf16, [{"role": "user", "content": "Hi"}], max_new_tokens=6, temperature=0)
    assert len(r.tokens) <= 6 and r.stop in ("length", "return", "call")
