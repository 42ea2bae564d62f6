"""What the CLI's commands share: the model and sampling options, and loading the model they name."""

from __future__ import annotations

import sys
import time


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def load_or_embedded(args):
    """The model named by --model, or the embedded random tiny model (and say so)."""
    import gptoss_ext as g

    device = _device(args.device)
    if args.model:
        t0 = time.perf_counter()
        model = g.load_model(args.model, device=device, dtype=_dtype(args.dtype))
        info = model.checkpoint_info
        print(f"[loaded {info.path} ({info.layout} layout) on {device} in {time.perf_counter() - t0:.1f} s]",
              file=sys.stderr)
    else:
        model = g.random_model(args.preset, seed=args.weights_seed, device=device, dtype=_dtype(args.dtype))
        print(f"[no --model given: using the built-in random '{args.preset}' model (seed {args.weights_seed}); "
              "its output is meaningless text. Point --model at a gpt-oss checkpoint folder for real output]",
              file=sys.stderr)
    return model


def add_model_args(p):
    p.add_argument("--model", help="checkpoint folder (original/ or Hugging Face layout); default: built-in random model")
    p.add_argument("--preset", default="tiny", help="preset of the built-in random model (default tiny)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the built-in random model's weights")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
