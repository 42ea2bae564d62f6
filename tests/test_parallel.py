"""Tensor parallelism on the CPU: two gloo ranks (spawned processes) against one process."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptoss_ext.config import get_preset
from gptoss_ext.parallel import local_config, shard_tensor


def _rank(rank: int, world: int, store: str, out: str, moe: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from gptoss_ext import load_model, random_model
        from gptoss_ext.parallel import TensorParallel, shard_model

        cfg = get_preset("tiny").replace(num_hidden_layers=2, sliding_window=16)
        full = random_model(cfg, seed=0, dtype=torch.float32)
        tp = TensorParallel(moe=moe)
        local = shard_model(full, tp)
        g = torch.Generator().manual_seed(3)
        toks = torch.randint(0, cfg.vocab_size, (40,), generator=g)
        loaded = {}
        for layout in ("original", "hf"):         # the sharded loader: this rank's slices only
            m = load_model(os.path.join(os.path.dirname(store), layout), device="cpu", dtype=torch.float32, tp=tp)
            loaded[layout] = (m(toks), m.memory_bytes())
        drawn = random_model(cfg, seed=0, dtype=torch.float32, tp=tp)       # drawn a tensor at a time, sliced
        loaded["drawn"] = (drawn(toks), drawn.memory_bytes())
        res = {"logits": local(toks), "want": full(toks), "loaded": loaded, "full_bytes": full.memory_bytes(),
               "gen": local.generate(toks[:30].tolist(), max_new_tokens=12, temperature=0.0),
               "gen_want": full.generate(toks[:30].tolist(), max_new_tokens=12, temperature=0.0),
               "heads": local.block[0].attn.n_heads, "vocab": local.vocab_size,
               "qkv_rows": local.block[0].attn.qkv.weight.shape[0],
               "experts": tuple(local.block[0].mlp.mlp1_bias.shape), "gate": tuple(local.block[0].mlp.gate.weight.shape)}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("moe", ["expert", "tensor"])
def test_two_ranks_give_the_single_process_logits_and_tokens(moe):
    world = 2
    from gptoss_ext.synthetic import make_checkpoint

    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out")
        cfg2 = get_preset("tiny").replace(num_hidden_layers=2, sliding_window=16)
        for layout in ("original", "hf"):
            make_checkpoint(cfg2, os.path.join(d, layout), layout=layout, seed=0)
        mp.spawn(_rank, args=(world, store, out, moe), nprocs=world, join=True)
        res = [torch.load(f"{out}.{r}") for r in range(world)]
    cfg = get_preset("tiny")
    for r in res:
        assert r["heads"] == cfg.num_attention_heads // world and r["vocab"] == cfg.vocab_size
        assert r["qkv_rows"] == cfg.qkv_dim // world
        assert r["gate"] == (cfg.num_experts, cfg.hidden_size)              # every rank scores every expert
        E, I = cfg.num_experts, cfg.intermediate_size
        assert r["experts"] == ((E // world, 2 * I) if moe == "expert" else (E, 2 * I // world))
        assert r["logits"].shape == r["want"].shape
        assert torch.allclose(r["logits"], r["want"], rtol=1e-4, atol=1e-4), (r["logits"] - r["want"]).abs().max()
        assert r["gen"] == r["gen_want"]
        for layout, (logits, nbytes) in r["loaded"].items():
            assert torch.allclose(logits, r["want"], rtol=1e-4, atol=1e-4), layout
            assert nbytes < 0.6 * r["full_bytes"], (layout, nbytes, r["full_bytes"])   # about half each
    assert torch.equal(res[0]["logits"], res[1]["logits"])


def _engine_rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from gptoss_ext import random_model
        from gptoss_ext.engine import Engine
        from gptoss_ext.parallel import TensorParallel, follow_engines, release_followers, shard_model

        cfg = get_preset("tiny").replace(num_hidden_layers=2, sliding_window=16)
        full = random_model(cfg, seed=0, dtype=torch.float32)
        local = shard_model(full, TensorParallel())
        res = {}
        if rank != 0:
            try:
                Engine(local, num_blocks=8, block_size=16, broadcast=True).add_request([1, 2])
            except RuntimeError as e:               # (this engine is never rank 0's: made alone, first)
                res["follower_add"] = str(e)
            follow_engines(local)                   # every engine rank 0 makes, until it releases us
        else:
            Engine(local, num_blocks=8, block_size=16, broadcast=False)     # a rank-local engine: nothing sent
            res = _drive_engines(full, local, cfg)
            release_followers(local)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _drive_engines(full, local, cfg):
    from gptoss_ext.engine import Engine, SamplingParams

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 40, 17, 23)]
    params = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=1.0, seed=4),
              SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=9), SamplingParams(max_tokens=14, temperature=1.0)]
    res = {}
    # the second: 6 blocks a group, so requests wait and are preempted
    for i, kw in enumerate([dict(num_blocks=24, block_size=16, max_num_batched_tokens=32),
                            dict(num_blocks=6, num_window_blocks=6, block_size=16)]):
        outs = []
        for eng in (Engine(full, **kw), Engine(local, broadcast=True, **kw)):
            eng.reseed(77 + i)                      # the unseeded sampling: rank 0's reseed reaches rank 1
            hs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
            eng.run_until_done()
            outs.append([h.request.output for h in hs])
        res[f"engine{i}"] = (outs[1], outs[0], dict(eng.stats))
        res[f"held{i}"] = len(eng._sent)            # parameters the other rank still holds for rank 0
    return res


def test_a_broadcast_engine_runs_rank_0s_schedule_on_every_rank():
    """Rank 0 takes the requests and schedules; the other rank runs each step from the inputs rank 0
    sends (one message a step): tokens equal a single process's, with sampling, chunked prefill and
    preemption; a second engine replaces the first on both ranks."""
    world = 2
    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out")
        mp.spawn(_engine_rank, args=(world, store, out), nprocs=world, join=True)
        res = [torch.load(f"{out}.{r}") for r in range(world)]
    assert "requests go to rank 0" in res[1]["follower_add"]
    for key in ("engine0", "engine1"):
        got, want, stats = res[0][key]
        assert got == want, key
        assert stats["steps"] > 1
    assert res[0]["engine1"][2]["preemptions"] >= 1
    assert res[0]["held0"] == res[0]["held1"] == 0                   # ended requests: dropped there too


def _idle_rank(rank: int, world: int, store: str, out: str) -> None:
    import datetime
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=2))
    try:
        from gptoss_ext import random_model
        from gptoss_ext.engine import Engine, SamplingParams
        from gptoss_ext.parallel import TensorParallel, follow_engines, release_followers

        cfg = get_preset("tiny").replace(num_hidden_layers=1, sliding_window=16)
        model = random_model(cfg, seed=0, dtype=torch.float32, tp=TensorParallel())
        res = {}
        if rank == 0:
            time.sleep(5)                       # idle longer than the group's own timeout
            eng = Engine(model, num_blocks=8, block_size=16, broadcast=True)
            h = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
            eng.run_until_done()
            time.sleep(5)                       # and again, between two requests
            h2 = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
            eng.run_until_done()
            res = {"out": h.request.output, "out2": h2.request.output}
            release_followers(model)
        else:
            follow_engines(model)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_other_ranks_wait_out_an_idle_rank_0():
    """A server's other ranks wait for rank 0's next step as long as it has nothing to do: longer
    than the process group's timeout (2 s here; 30 minutes by default)."""
    with tempfile.TemporaryDirectory() as d:
        store, out = os.path.join(d, "store"), os.path.join(d, "out")
        mp.spawn(_idle_rank, args=(2, store, out), nprocs=2, join=True)
        res = torch.load(f"{out}.0")
    assert len(res["out"]) == 3 and res["out"] == res["out2"]


def test_a_split_the_model_cannot_take_is_refused_naming_the_dimension():
    cfg = get_preset("gpt-oss-20b")
    assert local_config(cfg, 2).num_key_value_heads == 4
    with pytest.raises(ValueError, match=r"intermediate_size \(2880\) is not a multiple of 32 x 4"):
        local_config(cfg, 4, "tensor")       # 90 MXFP4 blocks an expert row: 2 ranks at most
    assert local_config(cfg, 4).intermediate_size == 2880     # the expert split: 8 whole experts a rank
    assert local_config(get_preset("gpt-oss-120b"), 8).intermediate_size == 2880
    with pytest.raises(ValueError, match=r"num_experts \(8\) is not a multiple of 16.*whole experts"):
        local_config(get_preset("tiny").replace(num_key_value_heads=16, num_attention_heads=64, vocab_size=1024), 16)
    with pytest.raises(ValueError, match="moe split must be one of expert, tensor"):
        local_config(cfg, 2, "pipeline")
    with pytest.raises(ValueError, match=r"num_key_value_heads \(8\) is not a multiple of 16.*at most 8 ranks"):
        local_config(cfg, 16)
    with pytest.raises(ValueError, match="num_key_value_heads.*multiple of 3"):
        local_config(cfg, 3)
    with pytest.raises(ValueError, match="intermediate_size"):
        local_config(get_preset("tiny").replace(intermediate_size=96), 2, "tensor")
    with pytest.raises(ValueError, match="integer >= 1"):
        local_config(cfg, 0)


def test_shards_cover_every_weight_once():
    """The ranks' slices of the qkv projection are the query heads, KV heads and values of their
    heads; of the experts, whole SwiGLU row pairs and 32-column blocks; concatenated they give the
    whole tensor back."""
    cfg = get_preset("tiny")
    qkv = torch.arange(cfg.qkv_dim, dtype=torch.float32)
    parts = [shard_tensor("block.0.attn.qkv.bias", qkv, cfg, r, 2) for r in range(2)]
    q, kv = cfg.q_dim // 2, cfg.kv_dim // 2
    got = torch.cat([p[:q] for p in parts] + [p[q:q + kv] for p in parts] + [p[q + kv:] for p in parts])
    assert torch.equal(got, qkv)
    w2 = torch.arange(8 * 256 * 8 * 16).view(8, 256, 8, 16)
    halves = [shard_tensor("block.1.mlp.mlp2_weight.blocks", w2, cfg, r, 2, "tensor") for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=2), w2)
    b2 = torch.ones(8, 256)
    assert torch.equal(shard_tensor("block.0.mlp.mlp2_bias", b2, cfg, 1, 2, "tensor"), torch.zeros(8, 256))
    # the expert split: whole experts (weights and both biases), the gate and norm on every rank
    for name in ("block.1.mlp.mlp2_weight.blocks", "block.1.mlp.mlp2_bias"):
        t = w2 if "blocks" in name else torch.arange(8 * 256.).view(8, 256)
        parts = [shard_tensor(name, t, cfg, r, 2) for r in range(2)]
        assert parts[0].shape[0] == 4 and torch.equal(torch.cat(parts), t)
    gate = torch.randn(8, 256)
    assert torch.equal(shard_tensor("block.0.mlp.gate.weight", gate, cfg, 1, 2), gate)


def test_the_cli_under_torchrun_prints_the_single_process_text_once():
    import subprocess
    import sys

    cmd = ["-m", "gptoss_ext", "generate", "--device", "cpu", "--dtype", "fp32", "--temperature", "0",
           "--max-new-tokens", "6", "Hello there"]
    one = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] + cmd
                         + ["--tensor-parallel", "2"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    bad = subprocess.run([sys.executable] + cmd + ["--tensor-parallel", "2"], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "torchrun --nproc-per-node 2" in bad.stderr
    zero = subprocess.run([sys.executable] + cmd + ["--tensor-parallel", "0"], capture_output=True, text=True,
                          timeout=600)
    assert zero.returncode == 2 and "--tensor-parallel must be >= 1" in zero.stderr


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_the_loader_reads_only_a_ranks_rows_of_the_large_tensors(tmp_path, monkeypatch, layout):
    """With the expert split, no rank reads an expert tensor or the vocabulary's matrices whole:
    only its rows come off the file (safetensors slices); what it keeps equals the slices of the
    whole model."""
    import safetensors

    from gptoss_ext import load_model
    from gptoss_ext.synthetic import make_checkpoint

    cfg = get_preset("tiny").replace(num_hidden_layers=1)
    make_checkpoint(cfg, tmp_path / layout, layout=layout, seed=0)
    whole = load_model(tmp_path / layout, device="cpu", dtype=torch.float32)
    read_whole = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def get_tensor(self, name):
            read_whole.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self.f, attr)

    class Rank:                               # what load_model uses of a TensorParallel
        world, rank, moe = 2, 1, "expert"

        def experts(self, config):
            return (4, 4)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    part = load_model(tmp_path / layout, device="cpu", dtype=torch.float32, tp=Rank())
    big = [n for n in read_whole if "expert" in n or "mlp1" in n or "mlp2" in n or "embed" in n or "lm_head" in n]
    assert not big, big
    assert read_whole                          # (the rest: norms, the gate, attention, read whole)
    full = whole.state_dict()
    for k, v in part.state_dict().items():
        assert torch.equal(v, shard_tensor(k, full[k], cfg, 1, 2)), k
