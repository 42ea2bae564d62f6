"""generate(): greedy, sampling, stop tokens, streaming, argument checks."""

import pytest
import torch

from gptoss_ext import generate
from gptoss_ext.generate import sample

PROMPT = [200006, 1428, 200008, 13225, 11]


def test_greedy_follows_argmax_of_full_forward(tiny_fp32):
    out = generate(tiny_fp32, PROMPT, max_new_tokens=6, temperature=0)
    seq = list(PROMPT)
    for t in out:
        assert t == tiny_fp32(torch.tensor(seq))[-1].argmax().item()
        seq.append(t)


def test_stream_equals_list_and_seed_reproduces(tiny_bf16):
    a = generate(tiny_bf16, PROMPT, max_new_tokens=8, temperature=1.0, seed=3)
    b = list(generate(tiny_bf16, PROMPT, max_new_tokens=8, temperature=1.0, seed=3, stream=True))
    c = generate(tiny_bf16, PROMPT, max_new_tokens=8, temperature=1.0, seed=4)
    assert a == b and len(a) == 8 and a != c


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_bf16):
    greedy = generate(tiny_bf16, PROMPT, max_new_tokens=5, temperature=0)
    assert generate(tiny_bf16, PROMPT, max_new_tokens=5, temperature=0.8, top_k=1, seed=1) == greedy
    assert generate(tiny_bf16, PROMPT, max_new_tokens=5, temperature=0.8, top_p=1e-6, seed=1) == greedy


def test_stop_token_ends_generation(tiny_bf16):
    free = generate(tiny_bf16, PROMPT, max_new_tokens=6, temperature=0)
    stopped = generate(tiny_bf16, PROMPT, max_new_tokens=6, temperature=0, stop_tokens=[free[2]])
    assert stopped == free[:free.index(free[2]) + 1]


def test_sample_respects_top_k_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    ks = sample(logits, 1.0, 2, 1.0, g)
    assert set(ks.tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)
    ps = sample(logits, 1.0, 0, float(p[0] + 0.01), g)          # nucleus = the top two
    assert set(ps.tolist()) == {0, 1}
    full = sample(logits, 1.0, 0, 1.0, g)
    freq = torch.bincount(full, minlength=5).double() / 4000
    assert torch.allclose(freq, p.double(), atol=0.03)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_invalid_arguments(tiny_bf16, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_bf16, PROMPT, **kwargs)


def test_invalid_prompts(tiny_bf16):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_bf16, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(tiny_bf16, [1, 201088])
    short = tiny_bf16.config.replace(initial_context_length=8, rope_scaling_factor=1.0)
    from gptoss_ext import random_model
    m = random_model(short)
    with pytest.raises(ValueError, match="context"):
        generate(m, list(range(8)))
    assert len(generate(m, list(range(5)), max_new_tokens=10, temperature=0)) == 3  # stops at the context


def test_decode_state_is_kept_and_released():
    import gptoss_ext as g

    m = g.random_model("tiny", dtype=torch.float32)
    a = m.generate([1, 2, 3], max_new_tokens=3, temperature=0)
    e = m._engine
    assert e is not None and e.scheduler.max_num_seqs == 1 and e.graphs is None
    assert m.generate([1, 2, 3], max_new_tokens=3, temperature=0) == a and m._engine is e
    assert e.blocks.full.in_use() == 0                      # every block went back (the prefix stays cached)
    assert m.generate([[1, 2, 3], [4, 5]], max_new_tokens=3, temperature=0)[0] == a
    e3 = m._engine
    assert e3 is not e and e3.scheduler.max_num_seqs == 2    # more sequences: a larger engine
    assert m.generate([1, 2, 3], max_new_tokens=140, temperature=0)[:3] == a
    m.release_decode_state()
    assert m._engine is None
    assert m.generate([1, 2, 3], max_new_tokens=3, temperature=0) == a


def test_a_generation_dropped_midway_frees_its_blocks():
    import gptoss_ext as g

    m = g.random_model("tiny", dtype=torch.float32)
    it = m.generate([[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=50, temperature=0, stream=True)
    assert len([next(it) for _ in range(5)]) == 5
    it.close()
    e = m._engine
    assert not e.scheduler.has_work() and e.blocks.full.in_use() == 0
    assert m.generate([[1, 2, 3], [4, 5]], max_new_tokens=2, temperature=0) and m._engine is e


def test_batch_generation_on_cpu_matches_one_prompt_at_a_time():
    import gptoss_ext as g

    m = g.random_model("tiny", dtype=torch.float32)
    prompts = [[1, 2, 3], [5] * 20, [7]]
    together = generate(m, prompts, max_new_tokens=6, temperature=0)
    alone = [generate(m, p, max_new_tokens=6, temperature=0) for p in prompts]
    assert together == alone and all(len(t) == 6 for t in together)
    streamed = list(generate(m, prompts, max_new_tokens=2, temperature=0, stream=True))
    assert sorted(streamed) == sorted((i, t) for i, seq in enumerate(together) for t in seq[:2])
    stop = together[1][2]
    out = generate(m, prompts, max_new_tokens=6, temperature=0, stop_tokens=[stop])
    assert out[1] == together[1][:3]


def test_prefill_in_chunks_and_pieces_matches_the_whole_forward():
    import gptoss_ext as g

    m = g.random_model("tiny", dtype=torch.float32)
    toks = torch.arange(100, 140)
    whole = m(toks)
    cache = m.new_cache(64, batch=2)
    part = m.prefill([toks[:25], toks[:10]], cache, last_only=False, chunk=7)
    assert cache.lengths == [25, 10]
    torch.testing.assert_close(part[:25], whole[:25], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(part[25:], whole[:10], rtol=1e-4, atol=1e-4)
    last = m.prefill([toks[25:30], toks[:0]], cache)            # continue sequence 0; sequence 1 idle
    torch.testing.assert_close(last[0], whole[29], rtol=1e-4, atol=1e-4)
    assert torch.equal(last[1], torch.zeros_like(last[1])) and cache.lengths == [30, 10]
    with pytest.raises(ValueError, match="3 sequences for a cache of batch 2"):
        m.prefill([toks[:1]] * 3, cache)
    with pytest.raises(ValueError, match="KV cache of 64"):
        m.prefill([toks[:40]], cache)


def test_batch_generate_errors():
    import gptoss_ext as g

    m = g.random_model("tiny", dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        generate(m, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(m, [[1, 2], [10 ** 9]], max_new_tokens=2)
    with pytest.raises(ValueError, match="CUDA-graph decode needs the model on a CUDA device"):
        generate(m, [[1, 2]], max_new_tokens=2, use_graph=True)
