"""Tensor parallelism over torch.distributed: one model spread over the ranks of a process group.

Each rank holds a slice of every large weight and the ranks' partial results are summed or
gathered at four points of the forward pass:
  * embedding: split by vocabulary; a rank looks up the tokens in its range, the ranks' rows summed;
  * attention: query heads split with their KV heads (8 KV heads: at most 8 ranks) and their
    sinks; the qkv projection column-parallel, the out projection row-parallel (its bias on rank 0),
    the block's outputs summed (one all-reduce);
  * MoE: every rank routes every token over all experts (the gate is replicated), then either
    - moe="expert" (the default): the experts are split (rank r holds experts [r E/N, (r+1) E/N)
      whole, with their biases); a rank computes the (token, expert) pairs of its experts, or
    - moe="tensor": each expert's intermediate dimension is split (mlp1's rows in SwiGLU pairs,
      mlp2's columns in 32-column MXFP4 blocks, mlp2's bias on rank 0);
    each rank sums its pairs' weighted outputs per token and the ranks' sums are added (one
    all-reduce, fp32). The expert split keeps every expert's GEMM at its full size (what the CUDA
    kernels serve: gpt-oss's 2880-wide intermediate halves to 1440, not a multiple of their 64);
  * unembedding: split by vocabulary, the logits gathered.
A sharded model is a `GptOss` of the local shapes (`local_config`) with `tp` set, so the engine,
`generate()` and the KV cache see a model with fewer heads and run unchanged; every rank runs the
same steps on the same tokens and gets the same (gathered) logits.

    tp = TensorParallel()                       # the default process group (torchrun / gloo / nccl)
    model = shard_model(random_model("tiny"), tp)
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from ..config import ModelConfig

MOE_SPLITS = ("expert", "tensor")
MESSAGE_TIMEOUT = datetime.timedelta(days=365)


class TensorParallel:
    """This rank's place in a tensor-parallel group and the collectives the model runs."""

    def __init__(self, group=None, moe: str = "expert"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("tensor parallel needs torch.distributed initialised (torchrun, or "
                               "torch.distributed.init_process_group) before the model is sharded")
        if moe not in MOE_SPLITS:
            raise ValueError(f"moe split must be one of {', '.join(MOE_SPLITS)}, got {moe!r}")
        self.group = group
        self.moe = moe
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # Host-side messages (the engine's step inputs, agreed sizes) go over a gloo group of the
        # same ranks, made here (when every rank makes its TensorParallel), with no practical
        # timeout: the other ranks of a server wait for rank 0's next step as long as it is idle
        # (the default 30 minutes would end them); a rank that dies closes its connections, which
        # the others see at once.
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
        self.cpu_group = dist.new_group(ranks, backend="gloo", timeout=MESSAGE_TIMEOUT)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank (the others pass anything, None)."""
        box = [obj]
        dist.broadcast_object_list(box, src=self._src, group=self.cpu_group)
        return box[0]

    def agree_min(self, values: list[int]) -> list[int]:
        """Each of `values` replaced by its smallest over the ranks."""
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return t.tolist()

    def experts(self, config: ModelConfig) -> tuple[int, int] | None:
        """(first, count) of the experts this rank holds whole (expert split), else None."""
        if self.moe != "expert":
            return None
        n = config.num_experts // self.world
        return self.rank * n, n

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in place."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """The ranks' tensors side by side along the last dimension (rank order)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def local_config(config: ModelConfig, world: int, moe: str = "expert") -> ModelConfig:
    """The shapes one rank of `world` holds (with the expert split, every expert keeps its shapes and
    the rank holds num_experts / world of them: the model's `experts` argument). ValueError naming
    the dimension a split cannot divide."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor parallel size must be an integer >= 1, got {world!r}")
    if moe not in MOE_SPLITS:
        raise ValueError(f"moe split must be one of {', '.join(MOE_SPLITS)}, got {moe!r}")
    c = config
    problems = []
    if c.num_key_value_heads % world:
        problems.append(f"num_key_value_heads ({c.num_key_value_heads}) is not a multiple of {world}: the KV heads "
                        f"split across the ranks (at most {c.num_key_value_heads} ranks)")
    if c.num_attention_heads % world:
        problems.append(f"num_attention_heads ({c.num_attention_heads}) is not a multiple of {world}")
    if moe == "tensor" and c.intermediate_size % (32 * world):
        problems.append(f"intermediate_size ({c.intermediate_size}) is not a multiple of 32 x {world}: each rank "
                        "takes whole 32-column MXFP4 blocks of every expert (the expert split has no such limit)")
    if moe == "expert" and c.num_experts % world:
        problems.append(f"num_experts ({c.num_experts}) is not a multiple of {world}: each rank holds "
                        f"num_experts / {world} whole experts")
    if c.vocab_size % world:
        problems.append(f"vocab_size ({c.vocab_size}) is not a multiple of {world}")
    if problems:
        raise ValueError(f"cannot split this model over {world} ranks: " + "; ".join(problems))
    return c.replace(num_attention_heads=c.num_attention_heads // world,
                     num_key_value_heads=c.num_key_value_heads // world,
                     intermediate_size=c.intermediate_size // (world if moe == "tensor" else 1),
                     vocab_size=c.vocab_size // world)


def shard_tensor(name: str, t: torch.Tensor, config: ModelConfig, rank: int, world: int,
                 moe: str = "expert") -> torch.Tensor:
    """This rank's part of the full model's tensor `name` (the model's names, checkpoint layout)."""
    c = config
    if world == 1:
        return t
    D = c.head_dim
    hq, hkv = c.num_attention_heads // world, c.num_key_value_heads // world
    i_loc, v_loc = c.intermediate_size // world, c.vocab_size // world
    leaf = name.split(".", 2)[-1] if name.startswith("block.") else name

    def zeros_off_rank0(x):
        return x if rank == 0 else torch.zeros_like(x)

    if leaf in ("embedding.weight", "unembedding.weight"):
        return t[rank * v_loc:(rank + 1) * v_loc]
    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
        q0, k0 = c.q_dim, c.q_dim + c.kv_dim
        rows = [t[rank * hq * D:(rank + 1) * hq * D],
                t[q0 + rank * hkv * D:q0 + (rank + 1) * hkv * D],
                t[k0 + rank * hkv * D:k0 + (rank + 1) * hkv * D]]
        return torch.cat(rows)
    if leaf == "attn.sinks":
        return t[rank * hq:(rank + 1) * hq]
    if leaf == "attn.out.weight":
        return t[:, rank * hq * D:(rank + 1) * hq * D]
    if moe == "expert" and leaf.startswith("mlp.") and leaf not in ("mlp.gate.weight", "mlp.gate.bias",
                                                                     "mlp.norm.scale"):
        n = c.num_experts // world                                            # experts' tensors: [E, ...]
        return t[rank * n:(rank + 1) * n]
    if leaf in ("attn.out.bias", "mlp.mlp2_bias"):
        return zeros_off_rank0(t)
    if leaf in ("mlp.mlp1_weight.blocks", "mlp.mlp1_weight.scales", "mlp.mlp1_bias"):
        return t[:, 2 * rank * i_loc:2 * (rank + 1) * i_loc]                 # SwiGLU pairs are adjacent rows
    if leaf in ("mlp.mlp2_weight.blocks", "mlp.mlp2_weight.scales"):
        return t[:, :, rank * i_loc // 32:(rank + 1) * i_loc // 32]          # whole 32-column blocks
    if leaf in ("mlp.mlp1_weight.weight",):                                   # dense experts [E, 2I, H]
        return t[:, 2 * rank * i_loc:2 * (rank + 1) * i_loc]
    if leaf in ("mlp.mlp2_weight.weight",):                                   # dense experts [E, H, I]
        return t[:, :, rank * i_loc:(rank + 1) * i_loc]
    return t                                                                  # norms, the gate: every rank


def shard_rows(name: str, config: ModelConfig, rank: int, world: int, moe: str = "expert") -> slice | None:
    """The rows (first dimension) of tensor `name` that are this rank's whole share of it, when it
    is one such range (the vocabulary's rows, a sink range, whole experts), else None: the loader
    then reads only those rows of the file. Agrees with shard_tensor."""
    c = config
    if world == 1:
        return None
    leaf = name.split(".", 2)[-1] if name.startswith("block.") else name
    if leaf in ("embedding.weight", "unembedding.weight"):
        n = c.vocab_size // world
    elif leaf == "attn.sinks":
        n = c.num_attention_heads // world
    elif moe == "expert" and leaf.startswith("mlp.") and leaf not in ("mlp.gate.weight", "mlp.gate.bias",
                                                                       "mlp.norm.scale"):
        n = c.num_experts // world
    else:
        return None
    return slice(rank * n, (rank + 1) * n)


def shard_model(model, tp: TensorParallel):
    """A copy of `model` (a full GptOss) holding only this rank's slices, with `tp` set."""
    from ..model import GptOss

    c = model.config
    local = local_config(c, tp.world, tp.moe)
    check_kernels_serve(local, model.device, model.quantized, tp)
    if any(b.mlp.mlp1_weight.kernel is not None for b in model.block):
        raise ValueError("shard_model takes a model whose experts are in the checkpoint layout (before "
                         "prepare_kernels); shard first, the sharded model prepares its own")
    with torch.device("meta"):
        out = GptOss(local, dtype=model.dtype, quantized=model.quantized, experts=tp.experts(c))
    state = {k: shard_tensor(k, v, c, tp.rank, tp.world, tp.moe).clone() for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=True, assign=True)
    out.eval()
    out.tp = tp
    out.checkpoint_info = model.checkpoint_info
    out.prepare_kernels()
    return out


def check_kernels_serve(local: ModelConfig, device, quantized: bool, tp: TensorParallel) -> None:
    """On a GPU with the MoE kernels, a tensor split they cannot serve (each rank's intermediate
    slice not a multiple of their column multiple) is an error, not a silent reference MoE."""
    from .. import ops

    device = torch.device(device)
    if device.type != "cuda" or not quantized or tp.moe != "tensor" or not ops.kernels_available():
        return
    col = ops.limits()["moe_experts_col_multiple"]
    if local.intermediate_size % col:
        raise ValueError(f"moe split 'tensor' over {tp.world} ranks leaves each expert {local.intermediate_size} "
                         f"intermediate columns, not a multiple of the MoE kernels' {col}: use the expert split "
                         "(moe='expert', --moe-split expert)")


def follow_engines(model) -> None:
    """(ranks other than 0) Run the broadcast engines rank 0 makes over `model` (each one's steps, as
    rank 0 sends them) until rank 0 calls `release_followers`."""
    from ..engine import Engine

    tp = model.tp
    if tp is None or tp.rank == 0:
        raise RuntimeError("follow_engines runs on the ranks other than 0 of a split model")
    while True:
        msg = tp.broadcast_object(None)
        if msg == "exit":
            break
        if msg is None:                      # the close of an engine whose making failed on rank 0
            continue
        if not isinstance(msg, dict) or "engine" not in msg:
            raise RuntimeError(f"rank {tp.rank}: expected an engine from rank 0, got {msg!r:.200}")
        engine = Engine(model, broadcast=True, **msg["engine"])
        end = engine.follow()
        del engine
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        if end == "exit":
            break
    # both sides past their last message before anyone tears a group down (a rank destroying its
    # groups while the other's last send was still in flight aborted a process now and then)
    dist.barrier(group=tp.cpu_group)


def release_followers(model) -> None:
    """(rank 0) Close the open broadcast engine, if any, and end the other ranks' follow_engines."""
    tp = model.tp
    if tp is None or tp.rank != 0:
        return
    if getattr(tp, "engine", None) is not None:
        tp.engine.close()
    tp.broadcast_object("exit")
    dist.barrier(group=tp.cpu_group)          # (follow_engines' side of it: see there)
