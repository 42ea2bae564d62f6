"""The model: KV-cache decode equals the full forward; agreement with Hugging Face transformers'
GptOssForCausalLM on small random configurations, in float32 and bf16."""

import pytest
import torch

from gptoss_ext import get_preset, load_model, make_checkpoint, random_model
from conftest import rel_err

SMALL_WINDOW = get_preset("tiny").replace(sliding_window=8)


def tokens(n, seed=0, vocab=201088):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_forward_shape_and_finite(tiny_bf16):
    logits = tiny_bf16(tokens(9))
    assert logits.shape == (9, 201088) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_deep_random_model_stays_finite():
    model = random_model(get_preset("tiny").replace(num_hidden_layers=36), seed=1)
    assert torch.isfinite(model(tokens(20))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decode_equals_full_forward(dtype):
    model = random_model(SMALL_WINDOW, seed=2, dtype=dtype)
    toks = tokens(30, seed=1)
    full = model(toks)
    cache = model.new_cache(30)
    parts = [model(toks[:11], cache=cache)]          # prefill
    for i in range(11, 20):
        parts.append(model(toks[i:i + 1], cache=cache))   # token by token, past the window
    parts.append(model(toks[20:], cache=cache))      # a chunk continuing the cache
    inc = torch.cat(parts)
    assert cache.length == 30
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(inc, full) < tol


def test_forward_rejects_bad_tokens(tiny_fp32):
    with pytest.raises(ValueError, match="1-D"):
        tiny_fp32(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        tiny_fp32(torch.zeros(3))
    cache = tiny_fp32.new_cache(4)
    with pytest.raises(ValueError, match="full"):
        tiny_fp32(tokens(5), cache=cache)


# ---- against Hugging Face transformers ---------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    make_checkpoint(SMALL_WINDOW, path, layout="hf", quantized=False, seed=5)

    def hf(dtype):
        return transformers.GptOssForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return path, hf


def test_matches_transformers_fp32(hf_pair):
    path, hf = hf_pair
    toks = tokens(40, seed=3)          # 40 tokens: 5x the window of the sliding layers
    with torch.no_grad():
        want = hf(torch.float32)(toks[None]).logits[0]
    got = load_model(path, device="cpu", dtype=torch.float32)(toks)
    err = rel_err(got, want)
    print(f"fp32 relative error vs transformers: {err:.2e}")
    assert err < 1e-5


def test_matches_transformers_bf16(hf_pair):
    """Both bf16 models are compared with the float32 result: ours must be no worse than theirs."""
    path, hf = hf_pair
    toks = tokens(40, seed=4)
    with torch.no_grad():
        truth = hf(torch.float32)(toks[None]).logits[0]
        theirs = hf(torch.bfloat16)(toks[None]).logits[0].float()
    ours = load_model(path, device="cpu", dtype=torch.bfloat16)(toks)
    e_ours, e_hf = rel_err(ours, truth), rel_err(theirs, truth)
    print(f"bf16 relative error vs fp32: ours {e_ours:.2e}, transformers {e_hf:.2e}; ours vs theirs {rel_err(ours, theirs):.2e}")
    assert e_ours <= 1.5 * e_hf + 1e-3
    assert (ours.argmax(-1) == truth.argmax(-1)).float().mean() > 0.8


def test_mxfp4_model_matches_transformers_on_dequantized_weights(hf_pair, tmp_path):
    """The MXFP4 checkpoint of the same seed is the same function as the bf16-expert one."""
    path, hf = hf_pair
    q = make_checkpoint(SMALL_WINDOW, tmp_path / "orig", layout="original", seed=5)
    toks = tokens(25, seed=6)
    with torch.no_grad():
        want = hf(torch.float32)(toks[None]).logits[0]
    assert rel_err(load_model(q, device="cpu", dtype=torch.float32)(toks), want) < 1e-5
