"""The OpenAI-compatible server through the official `openai` SDK (sync and async) and raw HTTP.

Two engines stand behind it: a scripted one (the engine's scheduler and blocks, with the model's
forward replaced by a script of harmony tokens chosen by the prompt, so reasoning, answers and
tool calls are known), and the real tiny random model (concurrency, usage counts, cancellation)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from gptoss_ext import random_model  # noqa: E402
from gptoss_ext import tokenizer as tok  # noqa: E402
from gptoss_ext.config import get_preset  # noqa: E402
from gptoss_ext.engine import Engine  # noqa: E402
from gptoss_ext.server import ServerThread, make_server  # noqa: E402

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# prompt marker -> the reply the scripted model writes (harmony, as gpt-oss writes it); the first
# marker found in the prompt wins
SCRIPTS = [
    ("sunny and 21", "<|channel|>analysis<|message|>Tool says sunny.<|end|><|start|>assistant<|channel|>final"
                     "<|message|>It is sunny in Paris, 21 C.<|return|>"),
    ("weather in Paris", "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant<|channel|>commentary "
                         "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>"),
    ("FORCED", "{\"city\": \"Oslo\"}<|call|>"),                           # continues a forced tool-call header
    ("long story", "<|channel|>final<|message|>" + " once" * 400 + "<|return|>"),
    ("", "<|channel|>analysis<|message|>The user greets.<|end|><|start|>assistant<|channel|>final<|message|>"
         "Hello world! STOP here.<|return|>"),
]


class ScriptedEngine(Engine):
    """The real scheduler and block manager; the forward pass replaced by the scripts above."""

    def __init__(self, model, delay: float = 0.0, **kw):
        super().__init__(model, **kw)
        self.delay = delay
        self.prompts = []
        self.scripts = [(k, tok.encode(v)) for k, v in SCRIPTS]

    def _script(self, req):
        s = getattr(req, "_script", None)
        if s is None:
            text = tok.decode(req.prompt)
            forced = req.prompt[-1] == tok.MESSAGE and "to=functions." in tok.decode(req.prompt[-12:])
            s = next(ids for key, ids in self.scripts if (key == "FORCED") == forced and (forced or key in text))
            req._script = s
            self.prompts.append(req.prompt)
        return s

    def _run(self, plan, prev=None):
        if self.delay:
            time.sleep(self.delay)
        reqs, out = [], []
        for c in plan.decodes + plan.prefills:
            if c.sample:
                s = self._script(c.req)
                n = len(c.req.output)
                reqs.append(c.req)
                out.append(s[n] if n < len(s) else tok.encode(" x")[0])
        return self._emit(plan, reqs, torch.tensor(out, dtype=torch.int64), graph=False)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny").replace(num_hidden_layers=2, sliding_window=16)
    return random_model(cfg, seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def scripted(tiny):
    eng = ScriptedEngine(tiny, num_blocks=256, block_size=16, max_model_len=2048)
    with ServerThread(make_server(tiny, port=0, model_name="gpt-oss-test", engine=eng, log_level="warning")) as url:
        yield url, eng


@pytest.fixture(scope="module")
def client(scripted):
    return openai.OpenAI(base_url=scripted[0], api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def real(tiny):
    with ServerThread(make_server(tiny, port=0, model_name="tiny", num_blocks=128, block_size=16,
                                  max_model_len=512, log_level="warning")) as url:
        yield url


def user(text):
    return [{"role": "user", "content": text}]


def sse_lines(url, path, body, headers=None):
    """The raw bytes of a streamed response, split into SSE records."""
    with httpx.Client(timeout=60) as h:
        r = h.post(url + path, json=body, headers=headers or {})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.text


# ---- chat completions ------------------------------------------------------------------------------

def test_chat_returns_the_final_answer_and_the_reasoning(client):
    r = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_tokens=100)
    m = r.choices[0].message
    assert m.content == "Hello world! STOP here."
    assert m.reasoning_content == "The user greets."
    assert r.choices[0].finish_reason == "stop"
    n = len(tok.encode(SCRIPTS[-1][1]))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    assert 0 < r.usage.completion_tokens_details.reasoning_tokens < n


def test_streamed_chat_equals_the_whole_reply_and_ends_with_done(client, scripted):
    chunks = list(client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_tokens=100,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == "Hello world! STOP here." and reasoning == "The user greets."
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tok.encode(SCRIPTS[-1][1]))
    raw = sse_lines(scripted[0], "/chat/completions", {"messages": user("hi"), "stream": True, "max_tokens": 50})
    assert raw.endswith("data: [DONE]\n\n")
    records = [x for x in raw.split("\n\n") if x]
    assert all(x.startswith("data: ") for x in records)
    assert all(json.loads(x[6:])["object"] == "chat.completion.chunk" for x in records[:-1])


def test_stop_strings_cut_the_answer(client):
    r = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_tokens=100, stop=["STOP"])
    assert r.choices[0].message.content == "Hello world! " and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_tokens=100, stop="STOP",
                                       stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s) == "Hello world! "


def test_length_limit_is_reported(client):
    r = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_n_choices_each_complete(client):
    r = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), max_tokens=100, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "Hello world! STOP here." for c in r.choices)
    assert r.usage.completion_tokens == 3 * len(tok.encode(SCRIPTS[-1][1]))


def test_tool_call_round_trip(client):
    msgs = user("What is the weather in Paris?")
    r = client.chat.completions.create(model="gpt-oss-test", messages=msgs, tools=WEATHER, max_tokens=200)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert ch.message.reasoning_content == "Need the tool."
    msgs = msgs + [ch.message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": "sunny and 21 C"}]
    r2 = client.chat.completions.create(model="gpt-oss-test", messages=msgs, tools=WEATHER, max_tokens=200)
    assert r2.choices[0].message.content == "It is sunny in Paris, 21 C." and r2.choices[0].finish_reason == "stop"


def test_streamed_tool_call_arrives_as_deltas(client, scripted):
    scripted[1].delay = 0.01            # a token a step, as a GPU gives them (tokens that come together merge)
    try:
        chunks = list(client.chat.completions.create(model="gpt-oss-test", messages=user("weather in Paris?"),
                                                     tools=WEATHER, stream=True, max_tokens=200))
    finally:
        scripted[1].delay = 0.0
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert len(calls) > 2                                   # the arguments came in pieces
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == {"city": "Paris"}
    assert {tc.index for tc in calls} == {0}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_variants_shape_the_prompt(client, scripted):
    eng = scripted[1]
    client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), tools=WEATHER, tool_choice="none",
                                   max_tokens=5)
    assert "namespace functions" not in tok.decode(eng.prompts[-1])
    client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), tools=WEATHER, tool_choice="auto",
                                   max_tokens=5)
    assert "namespace functions" in tok.decode(eng.prompts[-1])
    client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), tools=WEATHER,
                                   tool_choice="required", max_tokens=5)
    assert tok.decode(eng.prompts[-1]).endswith("<|start|>assistant<|channel|>commentary to=functions.")
    r = client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), tools=WEATHER, max_tokens=50,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert tok.decode(eng.prompts[-1]).endswith("to=functions.get_weather <|constrain|>json<|message|>")
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage.completion_tokens == len(tok.encode(SCRIPTS[2][1]))   # the forced header is prompt
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-oss-test", messages=user("hi"), tools=WEATHER,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "nope" in e.value.body["message"]


# ---- responses ----------------------------------------------------------------------------------------

def test_responses_with_and_without_streaming(client):
    r = client.responses.create(model="gpt-oss-test", input="hi", max_output_tokens=100)
    assert r.status == "completed" and r.output_text == "Hello world! STOP here."
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "The user greets."
    assert r.usage.output_tokens == len(tok.encode(SCRIPTS[-1][1])) and r.usage.output_tokens_details.reasoning_tokens
    events = list(client.responses.create(model="gpt-oss-test", input="hi", max_output_tokens=100, stream=True))
    names = [e.type for e in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    for n in ("response.output_item.added", "response.reasoning_text.delta", "response.output_text.delta",
              "response.content_part.added", "response.output_text.done", "response.output_item.done"):
        assert n in names, n
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello world! STOP here."
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "Hello world! STOP here."


def test_responses_sse_bytes_name_their_events(scripted):
    raw = sse_lines(scripted[0], "/responses", {"input": "hi", "stream": True})
    for rec in [x for x in raw.split("\n\n") if x]:
        name, data = rec.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        assert json.loads(data[6:])["type"] == name[7:]


def test_responses_tool_call_and_previous_response_id(client, scripted):
    r = client.responses.create(model="gpt-oss-test", input="What is the weather in Paris?", max_output_tokens=200,
                                tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER[0]["function"]
                                        ["parameters"]}])
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    r2 = client.responses.create(model="gpt-oss-test", previous_response_id=r.id, max_output_tokens=200,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "sunny and 21 C"}])
    assert r2.output_text == "It is sunny in Paris, 21 C."
    prompt = tok.decode(scripted[1].prompts[-1])
    assert "What is the weather in Paris?" in prompt and '{"city": "Paris"}' in prompt and "sunny and 21" in prompt
    assert client.responses.retrieve(r2.id).output_text == r2.output_text
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-oss-test", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"
    r3 = client.responses.create(model="gpt-oss-test", input="hi", store=False, max_output_tokens=20)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r3.id)


# ---- completions, models, health, metrics ----------------------------------------------------------------

def test_completions_text_and_token_ids(client):
    r = client.completions.create(model="gpt-oss-test", prompt="hi", max_tokens=100)
    assert r.choices[0].text == SCRIPTS[-1][1][:-len("<|return|>")]    # raw text: no harmony, the end token dropped
    assert r.choices[0].finish_reason == "stop"
    ids = tok.encode("hello there")
    r = client.completions.create(model="gpt-oss-test", prompt=[ids, "other"], n=2, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.prompt_tokens == len(ids) + len(tok.encode("other")) and r.usage.completion_tokens == 16
    s = list(client.completions.create(model="gpt-oss-test", prompt="hi", max_tokens=100, stop=["STOP"], stream=True))
    text = "".join(c.choices[0].text for c in s)
    assert text.endswith("Hello world! ") and "STOP" not in text and s[-1].choices[0].finish_reason == "stop"


def test_models_health_metrics(client, scripted):
    (m,) = client.models.list().data
    assert m.id == "gpt-oss-test" and m.owned_by == "gptoss-ext"
    base = scripted[0][:-3]
    h = httpx.get(base + "/health").json()
    assert h["status"] == "ok"
    text = httpx.get(base + "/metrics").text
    for name in ("gptoss_requests_running", "gptoss_requests_waiting", "gptoss_kv_blocks_used",
                 "gptoss_prefix_cache_hit_rate", "gptoss_prompt_tokens_total", "gptoss_generation_tokens_total",
                 "gptoss_time_to_first_token_seconds_bucket", "gptoss_time_per_output_token_seconds_count"):
        assert name in text, name
    gen = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("gptoss_generation_tokens_total ")]
    assert gen and gen[0] > 0


# ---- bad requests, auth, failures ------------------------------------------------------------------------

BAD = [
    ("/chat/completions", {"model": "gpt-oss-test"}, 400, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/chat/completions", {"messages": user("x"), "temperature": 3}, 400, "temperature"),
    ("/chat/completions", {"messages": user("x"), "top_p": 0}, 400, "top_p"),
    ("/chat/completions", {"messages": user("x " * 3000)}, 400, "messages"),
    ("/chat/completions", {"messages": user("x"), "max_tokens": 100000}, 400, "max_tokens"),
    ("/chat/completions", {"messages": user("x"), "tools": [{"type": "function", "function": {"name": "a b"}}]},
     400, "tools"),
    ("/chat/completions", {"messages": user("x"), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "array"}}}]}, 400, "tools"),
    ("/chat/completions", {"messages": user("x"), "n": 0}, 400, "n"),
    ("/chat/completions", {"messages": user("x"), "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/chat/completions", {"messages": user("x"), "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ("/chat/completions", {"messages": user("x"), "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/chat/completions", {"messages": user("x"), "model": "gpt-5"}, 404, "model"),
    ("/completions", {"prompt": [999999999]}, 400, "prompt"),
    ("/completions", {"prompt": ""}, 400, "prompt"),
    ("/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/responses", {"input": [{"type": "web_search_call"}]}, 400, "input[0]"),
    ("/responses", {"input": "x", "reasoning": {"effort": "max"}}, 400, "reasoning.effort"),
    ("/responses", {}, 400, "input"),
]


def test_bad_requests_get_openai_errors_while_a_good_one_completes(client, scripted):
    url = scripted[0]
    good = {}

    def run_good():
        good["r"] = client.chat.completions.create(model="gpt-oss-test", messages=user("long story"), max_tokens=500)

    t = threading.Thread(target=run_good)
    t.start()
    with httpx.Client(timeout=30) as h:
        for path, body, status, param in BAD:
            r = h.post(url + path, json=body)
            assert r.status_code == status, (path, body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"] and err["type"], (path, err)
        r = h.post(url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert h.get(url + "/nothing").status_code == 404
    t.join(60)
    assert good["r"].choices[0].message.content.count("once") == 400


def test_api_key(tiny):
    eng = ScriptedEngine(tiny, num_blocks=32, block_size=16, max_model_len=512)
    with ServerThread(make_server(tiny, port=0, engine=eng, api_key="sekret", log_level="warning")) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and "--api-key" in e.value.body["message"]
        assert openai.OpenAI(base_url=url, api_key="sekret").models.list().data[0].id == "gpt-oss"
        assert httpx.get(url[:-3] + "/health").status_code == 200


def test_an_engine_error_fails_its_requests_and_the_server_keeps_serving(tiny):
    eng = ScriptedEngine(tiny, num_blocks=32, block_size=16, max_model_len=512)
    with ServerThread(make_server(tiny, port=0, engine=eng, log_level="critical")) as url:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        real_run = eng._run
        eng._run = lambda plan, prev=None: (_ for _ in ()).throw(RuntimeError("device lost"))
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="gpt-oss", messages=user("hi"))
        assert "device lost" in e.value.body["message"] and e.value.body["code"] == "engine_error"
        eng._run = real_run
        assert c.chat.completions.create(model="gpt-oss", messages=user("hi")).choices[0].message.content
        assert eng.blocks.full.in_use() == 0
        text = httpx.get(url[:-3] + "/metrics").text
        assert 'gptoss_requests_total{status="error"} 1' in text and "gptoss_engine_step_errors_total 1" in text


def test_a_client_that_disconnects_frees_its_blocks(tiny):
    eng = ScriptedEngine(tiny, delay=0.01, num_blocks=64, block_size=16, max_model_len=1024)
    with ServerThread(make_server(tiny, port=0, engine=eng, log_level="warning")) as url:
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", url + "/chat/completions",
                          json={"messages": user("long story"), "stream": True, "max_tokens": 600}) as r:
                it = r.iter_lines()
                for _ in range(5):
                    next(it)
                assert eng.blocks.full.in_use() > 0 and len(eng.scheduler.running) == 1
        t0 = time.monotonic()
        while (eng.scheduler.running or eng.blocks.full.in_use()) and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        assert not eng.scheduler.running and eng.blocks.full.in_use() == 0
        assert time.monotonic() - t0 < 2
        assert 'gptoss_requests_total{status="aborted"} 1' in httpx.get(url[:-3] + "/metrics").text


def test_graceful_shutdown_finishes_the_running_streams(tiny):
    eng = ScriptedEngine(tiny, delay=0.005, num_blocks=64, block_size=16, max_model_len=1024)
    st = ServerThread(make_server(tiny, port=0, engine=eng, log_level="warning", shutdown_timeout=20))
    url = st.__enter__()
    got = {}

    def reader():
        got["raw"] = sse_lines(url, "/chat/completions", {"messages": user("long story"), "stream": True,
                                                            "max_tokens": 600})

    t = threading.Thread(target=reader)
    t.start()
    while not eng.scheduler.running:
        time.sleep(0.01)
    st.__exit__(None, None, None)
    t.join(30)
    assert got["raw"].endswith("data: [DONE]\n\n") and got["raw"].count("once") == 400


# ---- the real tiny model under concurrency ----------------------------------------------------------------

def test_32_concurrent_streaming_clients_all_complete(real):
    client = openai.AsyncOpenAI(base_url=real, api_key="x", max_retries=0)

    async def one(i):
        usage, n = None, 0
        stream = await client.chat.completions.create(
            model="tiny", messages=user(f"request {i}"), max_tokens=12, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True})
        async for c in stream:
            if c.choices and c.choices[0].finish_reason:
                n += 1
            if c.usage:
                usage = c.usage
        return n, usage

    async def main():
        return await asyncio.gather(*(one(i) for i in range(32)))

    before = httpx.get(real[:-3] + "/metrics").text
    results = asyncio.run(main())
    assert all(n == 1 for n, _ in results)
    assert all(u.completion_tokens == 12 and u.total_tokens == u.prompt_tokens + 12 for _, u in results)
    after = httpx.get(real[:-3] + "/metrics").text

    def gen(text):
        return float(next(x for x in text.splitlines() if x.startswith("gptoss_generation_tokens_total ")).split()[1])
    assert gen(after) - gen(before) == 32 * 12
    # the same seed gives the same tokens in any batch
    c = openai.OpenAI(base_url=real, api_key="x")
    a = c.completions.create(model="tiny", prompt="x", max_tokens=6, seed=5, temperature=1.0).choices[0].text
    b = c.completions.create(model="tiny", prompt="x", max_tokens=6, seed=5, temperature=1.0).choices[0].text
    assert a == b


# ---- the CLI --------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_starts_answers_and_stops_on_sigint(tmp_path):
    port = free_port()
    env = dict(os.environ, HOME=str(tmp_path))
    log = open(tmp_path / "serve.log", "w+")           # a file, not a pipe nobody reads while it runs
    p = subprocess.Popen([sys.executable, "-m", "gptoss_ext", "serve", "--port", str(port), "--device", "cpu",
                          "--max-model-len", "512", "--served-model-name", "tiny-test"],
                         stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert p.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x")
        r = c.chat.completions.create(model="tiny-test", messages=user("hi"), max_tokens=4)
        assert r.usage.completion_tokens == 4
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)
    out = (tmp_path / "serve.log").read_text()
    assert p.returncode == 0, out
    assert "built-in random" in out and f"http://127.0.0.1:{port}/v1" in out
    assert "in=" in out and "out=4" in out                  # one log line a request


def test_bench_serve_drives_a_server_through_http(real, tmp_path, capsys):
    from gptoss_ext.__main__ import main

    out = tmp_path / "http.json"
    assert main(["bench-serve", "--base-url", real, "--num-requests", "6", "--input-len", "8", "--output-len", "5",
                 "--max-concurrency", "3", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["http"]["requests"] == 6 and res["http"]["output_tokens"] == 30      # ignore_eos: exactly 5 each
    assert res["model"] == "tiny" and res["max_concurrency"] == 3
    assert "output tok/s" in capsys.readouterr().out
    assert main(["bench-serve", "--base-url", "http://127.0.0.1:9/v1", "--num-requests", "1"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def _start(cmd, tmp_path, name, port):
    log = open(tmp_path / f"{name}.log", "w+")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, HOME=str(tmp_path), OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        if p.poll() is not None or time.monotonic() - t0 > 180:
            p.kill()
            raise AssertionError((tmp_path / f"{name}.log").read_text()[-3000:])
        time.sleep(0.3)


def test_serve_under_torchrun_answers_as_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m gptoss_ext serve --tensor-parallel 2`: rank 0 serves, rank 1
    runs its engine's steps; greedy replies (one at a time and concurrent) equal the single-process
    server's; SIGINT stops both ranks cleanly."""
    args = ["serve", "--device", "cpu", "--dtype", "fp32", "--max-model-len", "256", "--served-model-name", "t"]
    ports = free_port(), free_port()
    procs = []
    try:
        procs.append(_start([sys.executable, "-m", "gptoss_ext"] + args + ["--port", str(ports[0])], tmp_path, "one",
                            ports[0]))
        procs.append(_start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "gptoss_ext"] + args + ["--port", str(ports[1]), "--tensor-parallel", "2"],
                            tmp_path, "two", ports[1]))
        replies = []
        for _, url in procs:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x")
            one = c.completions.create(model="t", prompt="Once upon", max_tokens=8, temperature=0).choices[0].text
            with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as ex:
                many = list(ex.map(lambda p: c.completions.create(model="t", prompt=p, max_tokens=6,
                                                                  temperature=0).choices[0].text,
                                   ["a", "bb cc", "Once upon", "the end of"]))
            replies.append((one, many))
        assert replies[0] == replies[1] and replies[0][0]
    finally:
        for p, _ in procs:
            p.send_signal(signal.SIGINT)
        for p, _ in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                raise
    log = (tmp_path / "two.log").read_text()
    # torchrun passes the signal on and then reports it itself (a traceback, exit code 1, by design);
    # the ranks: rank 0 drained and released rank 1, nothing failed
    assert "Application shutdown complete" in log and "Finished server process" in log, log[-3000:]
    assert "error:" not in log and "Connection closed" not in log, log[-3000:]


def test_deltas_that_came_together_go_out_as_one():
    from gptoss_ext.server.chat import merge_deltas

    opening = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "f", "arguments": ""}}]}

    def args(i, text):
        return {"tool_calls": [{"index": i, "function": {"arguments": text}}]}

    got = merge_deltas([{"reasoning_content": "a"}, {"reasoning_content": "b"}, {"content": "c"}, {"content": "d"},
                        opening, args(0, '{"x"'), args(0, ": 1}"), args(1, "{}"), {"content": "e"}])
    assert got == [{"reasoning_content": "ab"}, {"content": "cd"}, opening, args(0, '{"x": 1}'), args(1, "{}"),
                   {"content": "e"}]
    assert merge_deltas(["he", "llo", " w"]) == ["hello w"] and merge_deltas([]) == []
    assert merge_deltas([{"role": "assistant", "content": ""}, {"content": "x"}]) == [
        {"role": "assistant", "content": ""}, {"content": "x"}]


def test_a_failed_step_of_a_split_model_stops_its_engine():
    """With the model split over ranks (a broadcast engine), a step that failed on rank 0 may have
    left the other ranks inside its collectives: the runner stops (health then says the engine is
    down, new requests are refused) rather than step on. A one-process engine carries on."""
    from gptoss_ext.server.runner import EngineDown, EngineRunner

    class Failing:
        def __init__(self, broadcast):
            self.broadcast, self.handles, self.steps = broadcast, {}, 0

        def has_work(self):
            return True

        def step(self):
            self.steps += 1
            raise RuntimeError("injected")

    split, single = EngineRunner(Failing(True)).start(), EngineRunner(Failing(False)).start()
    split._thread.join(timeout=10)
    time.sleep(0.2)
    assert not split.alive and not split.accepting and split.engine.steps == 1
    assert single.alive and single.accepting and single.engine.steps > 1
    with pytest.raises(EngineDown, match=r"engine stopped after a failed step \(RuntimeError: injected\)"):
        split.submit([1, 2], None)
    single._stop.set()
    single._thread.join(timeout=10)


def test_serve_overhead_benchmark_runs(tmp_path):
    """bench/serve_overhead.py (the server's cost over the engine, GPU taken out) at a small size."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "o.json"
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "serve_overhead.py"), "--requests", "4",
                        "--input-len", "16", "--output-len", "5", "--step-ms", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["http"]["output_tokens"] == 20 and res["direct"]["requests"] == 4
    assert "| output tok/s |" in r.stdout
