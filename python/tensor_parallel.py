"""One model split over two processes (here: two CPU processes over gloo; on GPUs, one process a GPU
over NCCL, started by `torchrun --nproc-per-node 2 this.py`):

  * every rank loads only its share of the checkpoint (query heads, whole experts, vocabulary);
  * generate() runs alike on every rank and gives every rank the same tokens;
  * a serving engine is driven by rank 0 alone (broadcast=True): the other ranks run its steps.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptoss_ext import load_model, make_checkpoint, tokenizer
from gptoss_ext.engine import Engine, SamplingParams
from gptoss_ext.parallel import TensorParallel, follow_engines, release_followers


def rank_main(rank: int, world: int, folder: str, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tp = TensorParallel()                           # moe="expert": each rank holds half the experts
        model = load_model(folder, device="cpu", tp=tp)
        prompt = tokenizer.encode("The capital of France is")
        tokens = model.generate(prompt, max_new_tokens=8, temperature=0)
        if rank == 0:
            print(f"rank 0 of {world}: {model.block[0].attn.n_heads} query heads, "
                  f"{model.block[0].mlp.mlp1_bias.shape[0]} experts here; generate(): {tokens}")
            engine = Engine(model, num_blocks=16, block_size=16, broadcast=True)   # rank 0 schedules
            handles = [engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0)) for _ in range(3)]
            engine.run_until_done()
            assert all(h.request.output == tokens for h in handles)
            print("the engine on rank 0 gave each of 3 requests the same tokens")
            release_followers(model)                    # the other ranks leave follow_engines
        else:
            follow_engines(model)                       # run rank 0's engine steps until released
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        folder = os.path.join(d, "tiny")
        make_checkpoint("tiny", folder)                 # a small random checkpoint to split
        mp.spawn(rank_main, args=(2, folder, os.path.join(d, "store")), nprocs=2, join=True)
