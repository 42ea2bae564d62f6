"""The engine on the reference path (CPU, tiny random model): one request alone gives generate()'s
greedy tokens; requests joining and leaving at different steps each get the tokens they would get
alone; preemption and prefix reuse change nothing; aborts free every block."""

import asyncio
import threading

import pytest
import torch

from gptoss_ext.engine.engine import Engine
from gptoss_ext.engine.scheduler import SamplingParams

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    from gptoss_ext import random_model
    from gptoss_ext.config import get_preset

    # 4 layers (two windowed), a window of 16 so short prompts cross it
    cfg = get_preset("tiny").replace(num_hidden_layers=4, sliding_window=16)
    return random_model(cfg, seed=0, dtype=torch.float32)


def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 200000, (n,), generator=g).tolist() for n in (5, 37, 20)]


def alone(model, prompt, n):
    return model.generate(prompt, max_new_tokens=n, temperature=0.0, use_graph=False)


def test_one_request_alone_equals_generate(model):
    p = prompts()[1]
    eng = Engine(model, num_blocks=32, block_size=16, max_num_batched_tokens=64)
    out = eng.generate([p], SamplingParams(max_tokens=8, **GREEDY))[0]
    assert out == alone(model, p, 8)
    assert eng.blocks.full.in_use() == 0 and eng.blocks.win.in_use() == 0


def test_requests_joining_at_different_steps_get_their_own_tokens(model):
    ps = prompts()
    eng = Engine(model, num_blocks=32, block_size=16, max_num_batched_tokens=16)   # prompts read in chunks
    handles = [eng.add_request(ps[0], SamplingParams(max_tokens=6, **GREEDY))]
    eng.step()
    handles.append(eng.add_request(ps[1], SamplingParams(max_tokens=6, **GREEDY)))
    eng.step()
    eng.step()
    handles.append(eng.add_request(ps[2], SamplingParams(max_tokens=3, **GREEDY)))
    eng.run_until_done()
    for h, p, n in zip(handles, ps, (6, 6, 3)):
        assert h.request.output == alone(model, p, n), h.request.id
    assert eng.stats["peak_running"] >= 2


def test_preemption_and_resumption_give_the_same_tokens(model):
    """Three 16-position blocks: A (10 + 30 tokens) ends up needing all three while B (20 + 10)
    holds two, so B, the newest, gives way and is recomputed after A."""
    g = torch.Generator().manual_seed(1)
    pa, pb = torch.randint(0, 200000, (10,), generator=g).tolist(), torch.randint(0, 200000, (20,), generator=g).tolist()
    eng = Engine(model, num_blocks=3, num_window_blocks=6, block_size=16, max_num_batched_tokens=64,
                 decode_reserve=0.0)     # admit B whenever its prompt fits
    a = eng.add_request(pa, SamplingParams(max_tokens=30, **GREEDY))
    eng.step()
    b = eng.add_request(pb, SamplingParams(max_tokens=10, **GREEDY))
    eng.run_until_done()
    assert eng.stats["preemptions"] > 0 and b.request.preemptions > 0
    assert a.request.output == alone(model, pa, 30) and b.request.output == alone(model, pb, 10)


def test_prefix_reuse_gives_the_same_tokens(model):
    p = prompts()[1]
    eng = Engine(model, num_blocks=32, block_size=8, max_num_batched_tokens=64)
    first = eng.generate([p + [1, 2]], SamplingParams(max_tokens=4, **GREEDY))[0]
    again = eng.generate([p + [1, 2]], SamplingParams(max_tokens=4, **GREEDY))[0]
    assert eng.blocks.hit_tokens >= 32 and first == again == alone(model, p + [1, 2], 4)


def test_abort_frees_blocks_and_others_continue(model):
    ps = prompts()
    eng = Engine(model, num_blocks=32, block_size=16, max_num_batched_tokens=16)
    a = eng.add_request(ps[1], SamplingParams(max_tokens=20, **GREEDY))
    b = eng.add_request(ps[0], SamplingParams(max_tokens=4, **GREEDY))
    eng.step()
    eng.abort(a)
    assert a.finished and a.finish_reason == "abort"
    eng.run_until_done()
    assert b.request.output == alone(model, ps[0], 4)
    assert eng.blocks.full.in_use() == 0 and eng.blocks.win.in_use() == 0


def test_bad_request_is_refused_and_the_engine_keeps_serving(model):
    eng = Engine(model, num_blocks=32, block_size=16)
    ok = eng.add_request(prompts()[0], SamplingParams(max_tokens=2, **GREEDY))
    for bad, params, match in (([], SamplingParams(), "empty"), ([10 ** 9], SamplingParams(), "vocabulary"),
                               ([1], SamplingParams(temperature=-1.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            eng.add_request(bad, params)
    eng.run_until_done()
    assert len(ok.request.output) == 2


def test_seeded_sampling_is_per_request(model):
    p = prompts()[0]
    eng = Engine(model, num_blocks=32, block_size=16)
    a = eng.add_request(p, SamplingParams(max_tokens=5, temperature=1.0, seed=7))
    eng.add_request(p, SamplingParams(max_tokens=5, temperature=1.0, seed=8))
    eng.run_until_done()
    alone_eng = Engine(model, num_blocks=32, block_size=16)
    c = alone_eng.add_request(p, SamplingParams(max_tokens=5, temperature=1.0, seed=7))
    alone_eng.run_until_done()
    assert a.request.output == c.request.output


def test_stream_and_async_consumers(model):
    p = prompts()[0]
    eng = Engine(model, num_blocks=32, block_size=16)
    h = eng.add_request(p, SamplingParams(max_tokens=4, **GREEDY))
    assert list(eng.stream(h)) == alone(model, p, 4)

    async def consume(handle):
        return [t async for t in eng.aiter(handle)]

    h2 = eng.add_request(p, SamplingParams(max_tokens=4, **GREEDY))
    worker = threading.Thread(target=eng.run_until_done)
    got = asyncio.run(_start_then_consume(worker, consume(h2)))
    assert got == alone(model, p, 4)


async def _start_then_consume(worker, coro):
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    worker.start()
    out = await task
    worker.join()
    return out


def test_async_consumer_gets_the_last_token_when_the_finish_is_seen_first():
    """The stepping thread marks a request finished before it hands out the token that finished it:
    an async consumer woken in between still gets that token (it once lost it)."""
    from gptoss_ext.engine.engine import RequestHandle
    from gptoss_ext.engine.scheduler import FINISHED, Request

    h = RequestHandle(Request(0, [1, 2], SamplingParams(max_tokens=2)))
    got = []

    async def consume():
        async for batch in Engine.aiter_batches(h):
            got.extend(batch)

    async def main():
        task = asyncio.ensure_future(consume())
        h._deliver([7], False)
        await asyncio.sleep(0.01)
        h.request.state = FINISHED               # as scheduler.update does, under the engine's lock
        h._waiters[0][1].set()                   # a wake-up from elsewhere lands in between
        await asyncio.sleep(0.01)
        threading.Thread(target=h._deliver, args=([9], True)).start()   # then the last token comes
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert got == [7, 9]


def test_bench_serve_runs_and_reports(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gptoss_ext", "bench-serve", "--preset", "tiny", "--device", "cpu",
                        "--num-requests", "4", "--input-len", "12", "--output-len", "3", "--static-batch", "2",
                        "--num-blocks", "8", "--block-size", "16", "--shared-prefix", "8",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["engine"]["requests"] == 4 and d["engine"]["output_tok_s"] > 0 and d["static"]["output_tok_s"] > 0
    assert "time per output token" in r.stdout and "prefix hit rate" in r.stdout
    prof = d["engine"]["step_profile"]                  # where the step time goes, by kind of step
    assert prof["decode"]["steps"] >= 1 and prof["mixed"]["steps"] >= 1
    assert prof["decode"]["launch_ms"] > 0 and prof["decode"]["mean_batch"] >= 1
    assert "Where a step's time goes" in r.stdout


def test_a_step_that_decodes_caps_its_prefill(model):
    """max_prefill_with_decodes: a long prompt arriving while others decode is read a capped chunk a
    step (the decoders' steps stay short); alone it takes the whole budget. Tokens are unchanged."""
    ps = prompts()
    eng = Engine(model, num_blocks=64, block_size=16, max_num_batched_tokens=256, max_prefill_with_decodes=24)
    a = eng.add_request(ps[0], SamplingParams(max_tokens=30, **GREEDY))
    eng.step()
    long = ps[1] * 5                                           # 185 tokens
    b = eng.add_request(long, SamplingParams(max_tokens=3, **GREEDY))
    sizes = []
    while not b.request.output:
        plan_sizes = eng.scheduler.schedule
        with eng._lock:
            plan = plan_sizes()
        sizes.append(sum(c.end - c.start for c in plan.prefills))
        eng._resolve(eng._run(plan))
    assert max(sizes) == 24 and len(sizes) == 8                # ceil(185 / 24)
    eng.run_until_done()
    assert a.request.output == alone(model, ps[0], 30) and b.request.output == alone(model, long, 3)
    alone_eng = Engine(model, num_blocks=64, block_size=16, max_num_batched_tokens=256, max_prefill_with_decodes=24)
    alone_eng.add_request(long, SamplingParams(max_tokens=1, **GREEDY))
    with alone_eng._lock:
        assert sum(c.end - c.start for c in alone_eng.scheduler.schedule().prefills) == 185


def test_bench_serve_mixed_load_reports_the_longest_step(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gptoss_ext", "bench-serve", "--preset", "tiny", "--device", "cpu",
                        "--num-requests", "3", "--input-len", "8", "--mixed", "200", "--max-prefill-with-decodes", "64",
                        "--num-blocks", "64", "--block-size", "16", "--json", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "m.json").read_text())["mixed"]
    assert m["decoding"] == 3 and m["steps_while_reading"] >= 3 and m["max_over_median"] > 0
    assert "longest / median" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "gptoss_ext", "bench-serve", "--preset", "tiny", "--device", "cpu",
                          "--mixed", "200", "--input-len", "200000"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--input-len 200000" in bad.stderr and "Traceback" not in bad.stderr


def test_a_failed_step_fails_its_requests_and_the_engine_carries_on(model):
    from gptoss_ext.engine import EngineStepError

    ps = prompts()
    eng = Engine(model, num_blocks=32, block_size=16, max_num_batched_tokens=64)
    a = eng.add_request(ps[0], SamplingParams(max_tokens=4, **GREEDY))
    real, calls = eng._run, []

    def broken(plan, prev=None):
        calls.append(plan)
        raise RuntimeError("injected")

    eng._run = broken
    with pytest.raises(EngineStepError, match="injected") as ei:
        eng.step()
    assert ei.value.request_ids == [a.request.id]
    assert a.finished and a.finish_reason == "error: RuntimeError: injected"
    assert eng.blocks.full.in_use() == 0 and not eng.has_work()
    eng._run = real
    b = eng.add_request(ps[0], SamplingParams(max_tokens=4, **GREEDY))
    eng.run_until_done()
    assert b.request.output == alone(model, ps[0], 4)


@pytest.mark.gpu
def test_on_cuda_the_engine_checks_the_block_size():
    from gptoss_ext import ops, random_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = random_model("tiny", seed=0, device="cuda")
    with pytest.raises(ValueError, match="power of two"):
        Engine(m, num_blocks=8, block_size=16)
    assert ops.paged_attention_supported(m.device)


@pytest.mark.gpu
def test_engine_on_cuda_gives_generates_greedy_tokens():
    """The paged kernels under the engine (requests joining at different steps, a prompt longer than
    a block and the window; decode steps eager and from CUDA graphs, padded batches) give each
    request the tokens generate() gives it alone, up to near-ties (batches pick other kernel tilings,
    see test_model_gpu.test_batch_generation_equals_one_at_a_time)."""
    from gptoss_ext import random_model
    from gpu_helpers import assert_same_up_to_near_ties, fp32_logits

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = random_model("tiny", seed=0, device="cuda")
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(0, 200000, (n,), generator=g).tolist() for n in (5, 300, 140)]
    with fp32_logits(m):
        alone = [m.generate(p, max_new_tokens=24, temperature=0.0) for p in ps]
        for graphs in (False, True):
            eng = Engine(m, num_blocks=32, block_size=128, max_num_batched_tokens=256, use_graphs=graphs)
            hs = [eng.add_request(ps[0], SamplingParams(max_tokens=24, **GREEDY))]
            eng.step()
            hs += [eng.add_request(p, SamplingParams(max_tokens=n, **GREEDY)) for p, n in zip(ps[1:], (24, 12))]
            eng.run_until_done()
            assert (eng.stats["graph_steps"] > 10) == graphs
            for h, p, a in zip(hs, ps, alone):
                assert_same_up_to_near_ties(m, p, h.request.output, a[:len(h.request.output)])
            assert eng.blocks.full.in_use() == 0


def test_decode_graph_buckets():
    from gptoss_ext.engine.decode_graphs import batch_bucket, width_bucket

    assert [batch_bucket(n) for n in (1, 2, 3, 5, 17, 32, 33, 64, 65, 250)] == [1, 2, 4, 8, 32, 32, 64, 64, 96, 256]
    assert [width_bucket(b, 1024) for b in (1, 2, 3, 9, 16, 2000)] == [1, 2, 4, 16, 16, 1024]


@pytest.mark.gpu
def test_engine_decode_graphs_give_the_eager_steps_tokens():
    """Decode-only steps replayed from CUDA graphs give the tokens of the same engine run eagerly
    (four requests decoding together to the end, so both runs launch the same kernels; tables grow
    past a width bucket on the way)."""
    from gptoss_ext import random_model

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = random_model("tiny", seed=0, device="cuda")
    g = torch.Generator().manual_seed(2)
    ps = [torch.randint(0, 200000, (n,), generator=g).tolist() for n in (5, 200, 130, 60)]
    outs = []
    for graphs in (False, True):
        eng = Engine(m, num_blocks=32, block_size=128, use_graphs=graphs)
        hs = [eng.add_request(p, SamplingParams(max_tokens=150, **GREEDY)) for p in ps]
        eng.run_until_done()
        outs.append([h.request.output for h in hs])
        assert (eng.stats["graph_steps"] == 149) == graphs
    assert outs[0] == outs[1]


class _AheadEngine(Engine):
    """The engine's bookkeeping with a stand-in forward whose next token depends only on (request,
    position); `ahead`: decode-only steps run one ahead as they do on CUDA graphs."""

    def __init__(self, model, ahead: bool, **kw):
        super().__init__(model, **kw)
        if ahead:
            self.graphs = object()

    @staticmethod
    def token(rid, pos):
        return (rid * 7919 + pos * 31) % 1000

    def _run(self, plan, prev=None):
        sampling = [c for c in plan.decodes + plan.prefills if c.sample]
        toks = torch.tensor([self.token(c.req.id, c.end) for c in sampling], dtype=torch.int64)
        return self._emit(plan, [c.req for c in sampling], toks, graph=not plan.prefills)


def test_steps_run_ahead_give_the_same_tokens_stops_and_blocks(model):
    """Running decode steps one ahead (the next launched before the tokens of the current are read)
    changes nothing a caller sees: the same tokens, a stop token ends its request with nothing after
    it, max_tokens is kept, a request joining mid-way waits for the step in flight, blocks go back."""
    ps = prompts()
    results = []
    for ahead in (False, True):
        eng = _AheadEngine(model, ahead, num_blocks=64, block_size=16, max_num_batched_tokens=64)
        stop = _AheadEngine.token(1, len(ps[1]) + 5)          # request 1 samples it as its 6th token
        hs = [eng.add_request(p, SamplingParams(max_tokens=n, stop_token_ids=(stop,) if i == 1 else (), **GREEDY))
              for i, (p, n) in enumerate(zip(ps[:3], (40, 40, 25)))]
        got = {h.request.id: [] for h in hs}
        for _ in range(10):
            for h in eng.step():
                got[h.request.id].extend(h._pending)
                h._pending.clear()
        late = eng.add_request(ps[0] + [1, 2, 3], SamplingParams(max_tokens=7, **GREEDY))
        hs.append(late)
        got[late.request.id] = []
        while eng.has_work():
            for h in eng.step():
                got[h.request.id].extend(h._pending)
                h._pending.clear()
        assert [len(got[h.request.id]) for h in hs] == [40, 6, 25, 7]
        assert got[hs[1].request.id][-1] == stop and hs[1].finish_reason == "stop"
        assert all(got[h.request.id] == h.request.output for h in hs)
        assert eng.blocks.full.in_use() == 0 and (eng.stats["ahead_steps"] > 20) == ahead
        results.append([h.request.output for h in hs])
    assert results[0] == results[1]


def test_admission_keeps_blocks_back_for_the_running_requests(model):
    """With the cache as the limit, admitting a request whenever its prompt fits makes the running
    ones run out of blocks and be preempted (recomputed later); the decode reserve holds admission
    back instead. Both give every request all its tokens."""
    counts = {}
    for reserve in (0.0, 1.0):
        eng = _AheadEngine(model, False, num_blocks=24, block_size=16, max_num_seqs=8, max_num_batched_tokens=256,
                           decode_reserve=reserve)
        hs = [eng.add_request(list(range(1, 33)), SamplingParams(max_tokens=60, **GREEDY)) for _ in range(8)]
        eng.run_until_done()
        assert all(len(h.request.output) == 60 and h.finish_reason == "length" for h in hs)
        counts[reserve] = eng.stats["preemptions"]
    assert counts[0.0] > 0 and counts[1.0] == 0
    with pytest.raises(ValueError, match="decode_reserve"):
        Engine(model, num_blocks=8, block_size=16, decode_reserve=1.5)


def test_one_pool_serves_more_sequences_in_the_same_memory(model):
    """gpt-oss's two layer groups take the same bytes a block, so by default they share one pool:
    in the memory of separate pools (the window's sized for max_num_seqs) the shared pool runs more
    sequences at once and preempts less, with every request's tokens unchanged."""
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(0, 200000, (40,), generator=g).tolist() for _ in range(8)]
    kw = dict(block_size=16, max_num_seqs=8, max_num_batched_tokens=64, decode_reserve=0.0)
    win = min(12, 8 * 2 + 64 // 16 + 1)                    # the engine's window sizing for these arguments
    separate = Engine(model, num_blocks=12, num_window_blocks=win, **kw)
    shared = Engine(model, num_blocks=12, **kw)
    assert not separate.blocks.shared and shared.blocks.shared
    assert shared.cache.nbytes() == separate.cache.nbytes()                     # the same memory
    assert shared.cache.k["full"] is shared.cache.k["window"]
    outs = {}
    for name, eng in (("separate", separate), ("shared", shared)):
        hs = [eng.add_request(p, SamplingParams(max_tokens=30, **GREEDY)) for p in ps]
        eng.run_until_done()
        outs[name] = [h.request.output for h in hs]
        assert eng.blocks.pool.in_use() == 0 or eng.blocks.in_use() == (0, 0)
    assert outs["shared"] == outs["separate"]
    assert outs["shared"][:2] == [alone(model, p, 30) for p in ps[:2]]
    assert shared.stats["peak_running"] > separate.stats["peak_running"]
    assert shared.stats["preemptions"] <= separate.stats["preemptions"]
    m = shared.metrics()
    assert m["kv_pool_shared"] and m["kv_blocks_total"] == 12 + win
