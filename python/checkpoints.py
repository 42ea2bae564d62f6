"""Write random checkpoints in both released layouts, load them back, and check they agree.

    python python/checkpoints.py [--preset tiny] [--out DIR]
"""

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

import torch

import gptoss_ext

p = argparse.ArgumentParser()
p.add_argument("--preset", default="tiny")
p.add_argument("--out", help="folder to write into (default: a temporary one, removed at exit)")
args = p.parse_args()

if args.out:
    root = Path(args.out)
else:  # a temporary folder, removed when the script ends (a tiny checkpoint is ~200 MB a layout)
    root = Path(tempfile.mkdtemp(prefix="gptoss_ckpt_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
original = gptoss_ext.make_checkpoint(args.preset, root / "original", layout="original", seed=0, overwrite=True)
hf = gptoss_ext.make_checkpoint(args.preset, root / "hf", layout="hf", seed=0, overwrite=True)
print(f"wrote {original} and {hf}")

tokens = torch.tensor([200006, 1428, 200008, 13225, 11, 2375, 0])
logits = {}
for path in (original, hf):
    info = gptoss_ext.inspect_checkpoint(path)
    model = gptoss_ext.load_model(path)
    logits[info.layout] = model(tokens)
    print(f"{info.layout:9s} layout: {len(info.files)} file(s), next token {logits[info.layout][-1].argmax().item()}")
assert torch.equal(logits["original"], logits["hf"]), "the two layouts should give identical logits"
print("identical logits from both layouts")
