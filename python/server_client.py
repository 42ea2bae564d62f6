"""Call gptoss-ext's OpenAI-compatible server with the official `openai` SDK: a streamed chat, a tool
call round trip, and the Responses API.

    python python/server_client.py                                  # starts a server on the built-in
                                                                    # random tiny model in this process
    python -m gptoss_ext serve --model /path/to/gpt-oss-20b &       # or a real one, then:
    python python/server_client.py --base-url http://127.0.0.1:8000/v1

(needs `pip install 'gptoss-ext[serve]' openai`). The random model writes gibberish and rarely
valid JSON; with a real checkpoint the same code gets real answers and tool calls.
"""

import argparse
import contextlib
import json

import openai

p = argparse.ArgumentParser()
p.add_argument("--base-url", help="a running server's /v1 URL; default: start one here on the random tiny model")
p.add_argument("--api-key", default="none")
args = p.parse_args()


@contextlib.contextmanager
def server():
    if args.base_url:
        yield args.base_url
        return
    import gptoss_ext
    from gptoss_ext.server import ServerThread, make_server

    model = gptoss_ext.random_model("tiny", seed=0, device="cpu")
    with ServerThread(make_server(model, port=0, model_name="tiny", max_model_len=2048, log_level="warning")) as url:
        yield url


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def get_weather(city="Paris"):
    return {"city": city, "sky": "sunny", "celsius": 21}


with server() as url:
    client = openai.OpenAI(base_url=url, api_key=args.api_key)
    model = client.models.list().data[0].id
    print(f"server {url}, model {model}")

    # 1. a streamed chat: reasoning and answer arrive as deltas
    print("\n-- streamed chat --")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Explain MXFP4 in one sentence."}],
        reasoning_effort="low", max_tokens=24, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            print(getattr(delta, "reasoning_content", None) or delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n[usage: {chunk.usage.prompt_tokens} in, {chunk.usage.completion_tokens} out]")

    # 2. a tool call round trip (tool_choice forces the call, so even the random model makes one)
    print("\n-- tool call --")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = {}                       # the random model's arguments are rarely JSON
    print(f"model called {call.function.name}({call.function.arguments!r}) -> finish_reason {r.choices[0].finish_reason}")
    messages += [r.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps(get_weather(**{k: v for k, v in arguments.items() if k == "city"}))}]
    r = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=24)
    print(f"answer after the tool: {r.choices[0].message.content!r}")

    # 3. the Responses API, continued with previous_response_id
    print("\n-- responses --")
    first = client.responses.create(model=model, input="Name a prime number.", max_output_tokens=16)
    second = client.responses.create(model=model, previous_response_id=first.id, input="And another?",
                                     max_output_tokens=16)
    print(f"{first.id}: {first.output_text!r}\n{second.id}: {second.output_text!r} "
          f"({second.usage.input_tokens} tokens in: the first turn came along)")
