"""Checkpoint layouts round-trip; bad checkpoints fail with one clear CheckpointError."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptoss_ext import CheckpointError, get_preset, inspect_checkpoint, load_model, make_checkpoint, random_model
from gptoss_ext.config import ModelConfig

CFG = get_preset("tiny").replace(num_hidden_layers=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "original": make_checkpoint(CFG, root / "orig", layout="original", seed=7),
        "hf": make_checkpoint(CFG, root / "hf", layout="hf", seed=7, shard_bytes=60_000_000),
        "hf_bf16": make_checkpoint(CFG, root / "hfbf16", layout="hf", quantized=False, seed=7),
    }


def test_layouts_give_identical_logits(ckpts):
    toks = torch.arange(0, 200000, 9973)[:17]
    want = random_model(CFG, seed=7)(toks)
    for name, path in ckpts.items():
        got = load_model(path, device="cpu")(toks)
        assert torch.equal(got, want), name


def test_layout_detection_and_config_roundtrip(ckpts):
    a, b, c = (inspect_checkpoint(ckpts[k]) for k in ("original", "hf", "hf_bf16"))
    assert (a.layout, a.quantized) == ("original", True)
    assert (b.layout, b.quantized, len(b.files) > 1) == ("hf", True, True)
    assert (c.layout, c.quantized) == ("hf", False)
    assert a.config == b.config == c.config == CFG


def test_hf_repo_root_with_original_subfolder(ckpts, tmp_path):
    (tmp_path / "original").symlink_to(ckpts["original"], target_is_directory=True)
    assert inspect_checkpoint(tmp_path).layout == "original"


def test_experts_stay_packed(ckpts):
    model = load_model(ckpts["original"], device="cpu")
    mlp = model.block[0].mlp
    assert mlp.mlp1_weight.blocks.dtype == torch.uint8 and mlp.mlp1_weight.scales.dtype == torch.uint8
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 3 for p in model.parameters())
    assert model.memory_bytes() == CFG.summary()["weight_bytes"]


def test_synthetic_is_deterministic_by_seed():
    a = dict(random_model(CFG, seed=1).state_dict())
    b = dict(random_model(CFG, seed=1).state_dict())
    c = dict(random_model(CFG, seed=2).state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["block.0.attn.qkv.weight"], c["block.0.attn.qkv.weight"])


def test_load_fp32(ckpts):
    m = load_model(ckpts["hf"], device="cpu", dtype=torch.float32)
    assert m.embedding.weight.dtype == torch.float32
    assert m.block[1].mlp.mlp2_weight.blocks.dtype == torch.uint8


# ---- bad checkpoints ----------------------------------------------------------------------

def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not gpt_oss"):
        load_model(tmp_path)


def test_no_safetensors(ckpts, tmp_path):
    (tmp_path / "config.json").write_text((ckpts["original"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_model(tmp_path)


def _rewrite(path, fn):
    f = next(path.glob("*.safetensors"))
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_tensor_is_named(ckpts, tmp_path):
    p = copy_ckpt(ckpts["original"], tmp_path / "c")
    _rewrite(p, lambda t: t.pop("block.1.attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing tensor block\.1\.attn\.sinks"):
        load_model(p)


def test_wrong_shape_is_named(ckpts, tmp_path):
    p = copy_ckpt(ckpts["original"], tmp_path / "c")
    _rewrite(p, lambda t: t.__setitem__("block.0.attn.out.bias", torch.zeros(7, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"block\.0\.attn\.out\.bias: shape \[7\], expected \[256\]"):
        load_model(p)


def test_wrong_dtype_is_named(ckpts, tmp_path):
    p = copy_ckpt(ckpts["original"], tmp_path / "c")
    _rewrite(p, lambda t: t.__setitem__("block.0.mlp.mlp1_weight.scales",
                                        t["block.0.mlp.mlp1_weight.scales"].float()))
    with pytest.raises(CheckpointError, match=r"mlp1_weight\.scales: dtype F32, expected U8"):
        load_model(p)


def test_truncated_file(ckpts, tmp_path):
    p = copy_ckpt(ckpts["original"], tmp_path / "c")
    f = next(p.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(p)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(p)


def test_index_names_missing_shard(ckpts, tmp_path):
    p = copy_ckpt(ckpts["hf"], tmp_path / "c")
    victim = sorted(p.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(p)


def test_config_mismatch_lists_problems(ckpts, tmp_path):
    p = copy_ckpt(ckpts["original"], tmp_path / "c")
    cfg = json.loads((p / "config.json").read_text())
    cfg["num_experts"] = 16
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate\.weight: shape \[8, 256\], expected \[16, 256\]"):
        load_model(p)


def test_invalid_config_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**CFG.to_original_dict(), "hidden_size": 100}))
    with pytest.raises(CheckpointError, match="multiple of 32"):
        load_model(tmp_path)


def test_bad_arguments(ckpts):
    with pytest.raises(ValueError, match="dtype"):
        load_model(ckpts["original"], dtype=torch.float16)
    with pytest.raises(ValueError, match="device"):
        load_model(ckpts["original"], device="nonsense")


def test_make_checkpoint_refuses_nonempty_folder(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        make_checkpoint(CFG, tmp_path)
    with pytest.raises(ValueError, match="original layout"):
        make_checkpoint(CFG, tmp_path / "o", layout="original", quantized=False)


def test_presets_counts():
    c20, c120 = get_preset("gpt-oss-20b"), get_preset("gpt-oss-120b")
    assert round(c20.num_params() / 1e9, 1) == 20.9 and round(c20.num_active_params() / 1e9, 1) == 3.6
    assert round(c120.num_params() / 1e9, 1) == 116.8 and round(c120.num_active_params() / 1e9, 1) == 5.1
    # one expert = 3 x 2880 x 2880 weights at 4.25 bits = 13.2 MB
    assert abs(c20.weight_bytes()["expert_weights"] / (24 * 32) / 1e6 - 13.2) < 0.05
    assert 3.7e9 < c20.decode_bytes_per_step(2048) < 3.9e9
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("gpt-oss-7b")
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(num_attention_heads=10, num_key_value_heads=3)
