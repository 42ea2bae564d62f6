"""A tool-calling loop: the model asks for the weather, a local Python function answers, the model
replies. With --model it runs a real gpt-oss checkpoint; without one a scripted stand-in replays what
gpt-oss answers (the random built-in model never calls tools), so the loop itself is shown.

    python python/tool_calling.py [--model /path/to/gpt-oss-20b/original]
"""

import argparse
import json
import sys

import gptoss_ext
from gptoss_ext import tokenizer


def get_current_weather(location: str, format: str = "celsius") -> dict:
    """The local function the model may call."""
    return {"location": location, "temperature": 21 if format == "celsius" else 70, "sky": "sunny"}


TOOLS = [{"type": "function", "function": {
    "name": "get_current_weather",
    "description": "Gets the current weather in the provided location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
        "required": ["location"]}}}]
FUNCTIONS = {"get_current_weather": get_current_weather}

class ScriptedModel:
    """Stands in for a model without --model: each generate() returns the next canned reply."""

    def __init__(self, replies):
        self.replies = [tokenizer.encode(r) for r in replies]

    def generate(self, prompt, stream=False, **kwargs):
        reply = self.replies.pop(0)
        return iter(reply) if stream else reply


p = argparse.ArgumentParser()
p.add_argument("--model")
args = p.parse_args()
if args.model:
    try:
        model = gptoss_ext.load_model(args.model)          # on the GPU if there is one, else the CPU
    except gptoss_ext.CheckpointError as e:
        sys.exit(f"error: {e}")
else:
    model = ScriptedModel([
        "<|channel|>analysis<|message|>The user wants the weather in Tokyo; call the tool.<|end|>"
        "<|start|>assistant to=functions.get_current_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"location": "Tokyo, Japan"}<|call|>',
        "<|channel|>final<|message|>It is sunny and 21 °C in Tokyo.<|return|>",
    ])

messages = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the weather like in Tokyo?"}]
for _ in range(5):
    reply = gptoss_ext.chat(model, messages, tools=TOOLS, reasoning_effort="low", temperature=0)
    messages.append(reply.as_assistant_message())
    if not reply.tool_calls:
        print("assistant:", reply.text)
        break
    for call in reply.tool_calls:
        if call.arguments is None:
            result = {"error": call.error}
        else:
            result = FUNCTIONS[call.name](**call.arguments)
        print(f"tool call: {call.name}({call.raw}) -> {result}")
        messages.append({"role": "tool", "name": call.name, "content": json.dumps(result)})
