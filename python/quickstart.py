"""Generate text with gptoss-ext from Python.

    python python/quickstart.py                    # built-in random tiny model
    python python/quickstart.py --model /path/to/gpt-oss-20b/original
"""

import argparse
import sys

import gptoss_ext
from gptoss_ext import tokenizer

p = argparse.ArgumentParser()
p.add_argument("--model", help="checkpoint folder; default: a random tiny model")
p.add_argument("--prompt", default="The capital of France is")
p.add_argument("--max-new-tokens", type=int, default=12)
args = p.parse_args()

try:
    if args.model:
        model = gptoss_ext.load_model(args.model)                        # on the GPU if there is one
    else:
        model = gptoss_ext.random_model("tiny", seed=0, device="auto")   # random weights: gibberish out
except gptoss_ext.CheckpointError as e:                                  # missing, truncated, mis-shaped...
    sys.exit(f"error: {e}")

prompt = tokenizer.encode(args.prompt)
stream = tokenizer.StreamDecoder()
print(args.prompt, end="", flush=True)
for token in model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0.0, stream=True):
    print(stream.push(token), end="", flush=True)
print(stream.flush())

# The same call without streaming returns the token ids; greedy decoding is deterministic.
again = model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=0.0)
print(f"{len(again)} tokens: {again}")
