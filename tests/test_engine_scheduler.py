"""The scheduler on its own (CPU, no model): continuous batching, chunked prefill within the token
budget, out-of-blocks preemption and resumption, aborts that give back every block, bad requests."""

import pytest

from gptoss_ext.engine.block_manager import BlockManager
from gptoss_ext.engine.scheduler import FINISHED, SamplingParams, Scheduler

V = 1000


def make(full=64, win=64, bs=16, window=32, max_len=4096, seqs=8, budget=64):
    return Scheduler(BlockManager(full, win, bs, window), max_len, max_num_seqs=seqs, max_num_batched_tokens=budget)


def run_step(s, next_token=lambda req: 7):
    plan = s.schedule()
    sampled = {c.req.id: next_token(c.req) for c in plan.decodes + plan.prefills if c.sample}
    return plan, s.update(plan, sampled)


def test_chunked_prefill_within_budget_while_others_decode():
    s = make(budget=64)
    a = s.add(list(range(10)), SamplingParams(max_tokens=50), V)
    run_step(s)                                            # a: whole prompt, first token
    b = s.add(list(range(200)), SamplingParams(max_tokens=5), V)
    sizes = []
    while b.computed < 200:
        plan, _ = run_step(s)
        assert plan.num_tokens <= 64
        assert [c.req for c in plan.decodes] == [a]        # a decodes every step
        sizes.append(sum(c.end - c.start for c in plan.prefills))
    assert sizes == [63, 63, 63, 11] and len(b.output) == 1


def test_requests_join_and_leave():
    s = make()
    reqs = [s.add([1, 2, 3], SamplingParams(max_tokens=n), V) for n in (1, 3, 6)]
    finished = []
    for _ in range(10):
        finished += run_step(s)[1]
        if not s.has_work():
            break
    assert [r.id for r in finished] == [reqs[0].id, reqs[1].id, reqs[2].id]
    assert [len(r.output) for r in reqs] == [1, 3, 6] and all(r.finish_reason == "length" for r in reqs)
    assert s.blocks.full.in_use() == 0 and s.blocks.win.in_use() == 0


def test_stop_tokens_and_ignore_stops():
    s = make()
    a = s.add([1, 2], SamplingParams(max_tokens=10, stop_token_ids=(7,)), V)
    b = s.add([1, 2], SamplingParams(max_tokens=3, stop_token_ids=(7,), ignore_stops=True), V)
    for _ in range(5):
        run_step(s)
    assert a.finish_reason == "stop" and a.output == [7]
    assert b.finish_reason == "length" and b.output == [7, 7, 7]


def test_out_of_blocks_preempts_the_newest_and_resumes_it():
    s = make(full=6, win=6, bs=16, budget=256)
    a = s.add(list(range(40)), SamplingParams(max_tokens=40), V)
    run_step(s)
    b = s.add(list(range(30)), SamplingParams(max_tokens=40), V)
    preempted = []
    for _ in range(120):
        plan, _ = run_step(s, next_token=lambda r: len(r.output) % 50 + 1)
        preempted += plan.preempted
        if not s.has_work():
            break
    assert preempted and preempted[0] is b                # the newest gave way
    assert a.state == b.state == FINISHED and len(a.output) == len(b.output) == 40
    assert b.output == [i % 50 + 1 for i in range(40)]     # resumed where it was, nothing lost
    assert s.blocks.full.in_use() == 0


def test_abort_mid_prefill_frees_every_block():
    s = make(budget=32)
    a = s.add(list(range(300)), SamplingParams(), V)
    run_step(s)
    assert 0 < a.computed < 300 and s.blocks.full.in_use() > 0
    s.abort(a)
    assert a.state == FINISHED and a.finish_reason == "abort"
    assert s.blocks.full.in_use() == 0 and s.blocks.win.in_use() == 0 and not s.has_work()


@pytest.mark.parametrize("prompt,params,match", [
    ([], SamplingParams(), "prompt is empty"),
    ([1, V + 5], SamplingParams(), "outside the vocabulary"),
    (list(range(100)), SamplingParams(), "context holds 64"),
    ([1], SamplingParams(temperature=-1), "temperature"),
    ([1], SamplingParams(top_p=0), "top_p"),
    ([1], SamplingParams(top_k=-2), "top_k"),
    ([1], SamplingParams(max_tokens=0), "max_tokens"),
])
def test_bad_requests_are_refused_and_others_unharmed(prompt, params, match):
    s = make(max_len=64)
    ok = s.add([1, 2, 3], SamplingParams(max_tokens=2), V)
    with pytest.raises(ValueError, match=match):
        s.add(prompt, params, V)
    run_step(s)
    run_step(s)
    assert ok.state == FINISHED and len(ok.output) == 2


def test_prefix_hits_skip_computed_positions():
    s = make(budget=512)
    system = list(range(100, 164))                          # 4 whole blocks
    a = s.add(system + [1, 2, 3], SamplingParams(max_tokens=1), V)
    run_step(s)
    b = s.add(system + [4, 5], SamplingParams(max_tokens=1), V)
    plan = s.schedule()
    (chunk,) = plan.prefills
    assert chunk.req is b and chunk.start == 64 and b.cached_tokens == 64
    assert s.blocks.hit_rate() > 0
