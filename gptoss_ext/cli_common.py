"""What the CLI's commands share: the model and sampling options, loading the model they name, the
stop-token option, and the error a command raises for a condition it knows (printed as one line)."""

from __future__ import annotations

import argparse
import sys
import time


class UsageError(Exception):
    """A condition the CLI knows and names (the flag, the file, the missing GPU): one line, exit 2."""


# Default reply lengths: a real model gets room to answer; the built-in random model (which only
# shows that the pipeline runs, on any CPU) gets a length that finishes in seconds.
REAL_MODEL_CHAT_TOKENS = 1024
BUILT_IN_MODEL_TOKENS = 64


def device_arg(name: str):
    """--device: auto, cpu, cuda or cuda:N, checked against this machine (UsageError naming the flag)."""
    from .checkpoint import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(f"--device {name}: {e}") from None


def _dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def tensor_parallel(args, device):
    """(the tensor-parallel group when torchrun started several ranks (WORLD_SIZE > 1), else None;
    the device: on CUDA, this rank's GPU). Ranks other than 0 write nothing to stdout."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = getattr(args, "tensor_parallel", None)
    if want is not None and want < 1:
        raise UsageError(f"--tensor-parallel must be >= 1, got {want}")
    if want is not None and want != world:
        raise UsageError(f"--tensor-parallel {want}: start the ranks with `torchrun --nproc-per-node {want} -m "
                         f"gptoss_ext ...` (this process is one of {world})")
    if world == 1:
        return None, device
    import torch
    import torch.distributed as dist

    from .parallel import TensorParallel

    if device.type == "cuda":                 # one GPU a rank: torchrun's LOCAL_RANK, NCCL between them
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"rank {local} of this host has no GPU: {torch.cuda.device_count()} visible, "
                             f"--nproc-per-node must not exceed that")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    tp = TensorParallel(moe=getattr(args, "moe_split", "expert"))
    if tp.rank != 0:
        sys.stdout = open(os.devnull, "w")
    return tp, device


def load_or_embedded(args):
    """The model named by --model, or the embedded random model (and say so); this rank's shard of it
    when started by torchrun with several ranks (tensor_parallel)."""
    import gptoss_ext as g

    tp, device = tensor_parallel(args, device_arg(args.device))
    if args.model:
        t0 = time.perf_counter()
        model = g.load_model(args.model, device=device, dtype=_dtype(args.dtype), tp=tp)
        info = model.checkpoint_info
        print(f"[loaded {info.path} ({info.layout} layout) on {device} in {time.perf_counter() - t0:.1f} s]",
              file=sys.stderr)
        if info.tokenizer_check:
            print(f"[tokenizer: {info.tokenizer_check}]", file=sys.stderr)
    else:
        # Real-sized presets are drawn on the GPU (minutes on the CPU; other values, same layout).
        init = device if device.type == "cuda" and args.preset.startswith("gpt-oss") else None
        try:
            model = g.random_model(args.preset, seed=args.weights_seed, device=device, dtype=_dtype(args.dtype),
                                   init_device=init, tp=tp)
        except ValueError as e:              # a split the preset cannot take
            raise UsageError(str(e)) from None
        if tp is None or tp.rank == 0:
            print(f"[no --model given: using the built-in random '{args.preset}' model (seed {args.weights_seed}) on "
                  f"{device}; its output is meaningless text. Point --model at a gpt-oss checkpoint folder for real "
                  "output]", file=sys.stderr)
    return model


def add_model_args(p):
    p.add_argument("--model", help="checkpoint folder (original/ or Hugging Face layout); default: built-in random model")
    p.add_argument("--preset", default="tiny", help="preset of the built-in random model (default tiny)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the built-in random model's weights")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one, else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    add_parallel_args(p)


def add_parallel_args(p):
    p.add_argument("--tensor-parallel", type=int, default=None,
                   help="ranks (GPUs) the model is split over; start them with torchrun --nproc-per-node N -m "
                        "gptoss_ext")
    p.add_argument("--moe-split", choices=["expert", "tensor"], default="expert",
                   help="with several ranks: each rank holds whole experts (expert, default) or a slice of every "
                        "expert's intermediate dimension (tensor)")


def add_sampling_args(p, max_new_tokens_help: str = f"default {BUILT_IN_MODEL_TOKENS}"):
    p.add_argument("--max-new-tokens", type=int, default=None, help=max_new_tokens_help)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")


def stop_token(text: str) -> int:
    """--stop: a token id of the vocabulary, or a special token by name (`<|return|>` or `return`)."""
    from . import tokenizer as tok

    names = tok.special_tokens()
    for key in (text, f"<|{text}|>"):
        if key in names:
            return names[key]
    try:
        i = int(text)
    except ValueError:
        known = ", ".join(n for n in names if not n.startswith("<|reserved"))
        raise argparse.ArgumentTypeError(f"{text!r} is neither a token id nor a special token name ({known})") from None
    if not 0 <= i < tok.VOCAB_SIZE:
        raise argparse.ArgumentTypeError(f"token id {i} is outside the vocabulary [0, {tok.VOCAB_SIZE})")
    return i
