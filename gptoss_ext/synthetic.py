"""Random gpt-oss weights of any shape, in memory or written as a checkpoint in either layout.

They stand in for the released weights (which cannot be downloaded here): same shapes, dtypes and
bytes, so speed and memory are real, and activations stay finite through every layer:
  * weights ~ N(0, 1/fan_in) so each projection keeps unit scale; out projections at half that;
  * MXFP4 codes uniform over all 16 values, E8M0 scales around 2^-7 .. 2^-8 (again ~1/sqrt(fan_in));
  * norm scales in [0.8, 1.2], small biases, sinks ~ N(0, 1).
Every tensor is drawn from its own generator seeded by (seed, tensor name), so values do not
depend on the order, the sharding or the layout: the same seed gives the same model everywhere
(on one device type; CPU and CUDA generators differ).
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig, get_preset
from .reference import FP4_VALUES, mxfp4_dequantize


def _gen(seed: int, name: str, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    return g


def _normal(shape, std, seed, name, device) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed, name, device), device=device) * std


def _uniform(shape, lo, hi, seed, name, device) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed, name, device), device=device) * (hi - lo) + lo


def random_mxfp4(rows_shape, cols: int, *, seed: int = 0, name: str = "mxfp4", device="cpu",
                 scale_bytes: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 (blocks [*rows_shape, cols/32, 16], scales [*rows_shape, cols/32], uint8) for a
    weight [*rows_shape, cols]: codes uniform over all 16 values; E8M0 scale bytes uniform in
    [lo, hi) = scale_bytes, by default the two around 1/sqrt(cols) / rms(FP4) (entries of std
    ~ 1/sqrt(cols), so a layer keeps its input's scale). The one maker of random experts: synthetic
    checkpoints, tests and benchmarks all draw from it (seeded by (seed, name), see _gen)."""
    if cols % 32:
        raise ValueError(f"MXFP4 columns must be a multiple of 32, got {cols}")
    g = _gen(seed, name, device)
    blocks = torch.randint(0, 256, (*rows_shape, cols // 32, 16), generator=g, device=device, dtype=torch.uint8)
    if scale_bytes is None:
        fp4_rms = math.sqrt(sum(v * v for v in FP4_VALUES) / 16)
        e = math.floor(math.log2(1.0 / (math.sqrt(cols) * fp4_rms))) + 127
        scale_bytes = (e, e + 2)
    scales = torch.randint(scale_bytes[0], scale_bytes[1], (*rows_shape, cols // 32), generator=g, device=device,
                           dtype=torch.uint8)
    return blocks, scales


def random_tensors(config: ModelConfig, seed: int = 0, dtype=torch.bfloat16,
                   device="cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the model's (original-layout) names, one at a time."""
    c = config
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    d = device

    def f(t):
        return t.to(dtype)

    yield "embedding.weight", f(_normal((V, H), 1.0, seed, "embedding.weight", d))
    for i in range(c.num_hidden_layers):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        yield f"{a}.norm.scale", f(_uniform((H,), 0.8, 1.2, seed, f"{a}.norm.scale", d))
        yield f"{a}.qkv.weight", f(_normal((c.qkv_dim, H), H ** -0.5, seed, f"{a}.qkv.weight", d))
        yield f"{a}.qkv.bias", f(_normal((c.qkv_dim,), 0.02, seed, f"{a}.qkv.bias", d))
        yield f"{a}.sinks", f(_normal((c.num_attention_heads,), 1.0, seed, f"{a}.sinks", d))
        yield f"{a}.out.weight", f(_normal((H, c.q_dim), 0.5 * c.q_dim ** -0.5, seed, f"{a}.out.weight", d))
        yield f"{a}.out.bias", f(_normal((H,), 0.02, seed, f"{a}.out.bias", d))
        yield f"{m}.norm.scale", f(_uniform((H,), 0.8, 1.2, seed, f"{m}.norm.scale", d))
        yield f"{m}.gate.weight", f(_normal((E, H), H ** -0.5, seed, f"{m}.gate.weight", d))
        yield f"{m}.gate.bias", f(_normal((E,), 0.1, seed, f"{m}.gate.bias", d))
        b, s = random_mxfp4((E, 2 * I), H, seed=seed, name=f"{m}.mlp1_weight", device=d)
        yield f"{m}.mlp1_weight.blocks", b
        yield f"{m}.mlp1_weight.scales", s
        del b, s
        yield f"{m}.mlp1_bias", f(_normal((E, 2 * I), 0.1, seed, f"{m}.mlp1_bias", d))
        b, s = random_mxfp4((E, H), I, seed=seed, name=f"{m}.mlp2_weight", device=d)
        yield f"{m}.mlp2_weight.blocks", b
        yield f"{m}.mlp2_weight.scales", s
        del b, s
        yield f"{m}.mlp2_bias", f(_normal((E, H), 0.1, seed, f"{m}.mlp2_bias", d))
    yield "norm.scale", f(_uniform((H,), 0.8, 1.2, seed, "norm.scale", d))
    yield "unembedding.weight", f(_normal((V, H), H ** -0.5, seed, "unembedding.weight", d))


def random_model(config: ModelConfig | str = "tiny", seed: int = 0, device="cpu", dtype=torch.bfloat16,
                 quantized: bool = True, init_device=None, tp=None):
    """A `GptOss` with random weights, built in memory (equal to `make_checkpoint`'s with the same seed),
    on `device` ('cpu' by default for tests and demos; 'auto' as load_model's default: the GPU if any).
    init_device="cuda" draws them on the GPU instead (fast at real shapes; other values, same layout).
    tp: a gptoss_ext.parallel.TensorParallel: this rank's shard only (each tensor drawn whole, one at
    a time, and sliced: the same model as `shard_model(random_model(...), tp)` without the whole)."""
    from .checkpoint import resolve_device
    from .model import GptOss

    device = resolve_device(device)
    config = get_preset(config) if isinstance(config, str) else config
    local, experts, shard = config, None, None
    if tp is not None:                        # this rank's slice of each tensor as it is drawn
        from .parallel import check_kernels_serve, local_config, shard_tensor

        local = local_config(config, tp.world, tp.moe)
        check_kernels_serve(local, device, quantized, tp)
        experts = tp.experts(config)

        def shard_one(name, t):
            return shard_tensor(name, t, config, tp.rank, tp.world, tp.moe).clone()
        shard = shard_one
    with torch.device("meta"):
        model = GptOss(local, dtype=dtype, quantized=quantized, experts=experts)
    state = {}
    for name, t in random_tensors(config, seed, torch.bfloat16, init_device or "cpu"):
        for k, v in _to_model_tensors(name, t, quantized, state).items():
            state[k] = shard(k, v) if shard and not k.endswith(".__blocks") else v
        del t
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    del state              # (else the packed originals outlive the kernel relayout: twice the expert bytes)
    model.eval()
    model.tp = tp
    model.prepare_kernels()
    return model


def _to_model_tensors(name: str, t: torch.Tensor, quantized: bool, pending: dict) -> dict:
    """For dense experts, turn blocks+scales into the dequantised bf16 weight [E, rows, cols]."""
    if quantized or not (name.endswith("_weight.blocks") or name.endswith("_weight.scales")):
        return {name: t}
    base = name.rsplit(".", 1)[0]
    if name.endswith(".blocks"):
        pending[base + ".__blocks"] = t
        return {}
    blocks = pending.pop(base + ".__blocks")
    return {base + ".weight": _dequantize_bf16(blocks, t)}


def _dequantize_bf16(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # Exact in bf16: FP4 values have 2 significant bits, the scales are powers of two.
    return torch.stack([mxfp4_dequantize(blocks[e], scales[e], torch.bfloat16) for e in range(blocks.shape[0])])


# ---- writing checkpoints -----------------------------------------------------------------------

def _hf_tensors(config: ModelConfig, named: Iterator[tuple[str, torch.Tensor]],
                quantized: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename / split / transpose original-layout tensors into Hugging Face names."""
    qd, kd = config.q_dim, config.kv_dim
    blocks = {}
    for name, t in named:
        if name == "embedding.weight":
            yield "model.embed_tokens.weight", t
        elif name == "norm.scale":
            yield "model.norm.weight", t
        elif name == "unembedding.weight":
            yield "lm_head.weight", t
        else:
            _, i, rest = name.split(".", 2)
            p = f"model.layers.{i}"
            sa, ex = f"{p}.self_attn", f"{p}.mlp.experts"
            if rest == "attn.norm.scale":
                yield f"{p}.input_layernorm.weight", t
            elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                yield f"{sa}.q_proj.{kind}", t[:qd].contiguous()
                yield f"{sa}.k_proj.{kind}", t[qd:qd + kd].contiguous()
                yield f"{sa}.v_proj.{kind}", t[qd + kd:].contiguous()
            elif rest == "attn.sinks":
                yield f"{sa}.sinks", t
            elif rest.startswith("attn.out."):
                yield f"{sa}.o_proj.{rest.rsplit('.', 1)[1]}", t
            elif rest == "mlp.norm.scale":
                yield f"{p}.post_attention_layernorm.weight", t
            elif rest.startswith("mlp.gate."):
                yield f"{p}.mlp.router.{rest.rsplit('.', 1)[1]}", t
            elif rest == "mlp.mlp1_bias":
                yield f"{ex}.gate_up_proj_bias", t
            elif rest == "mlp.mlp2_bias":
                yield f"{ex}.down_proj_bias", t
            else:
                which = "gate_up_proj" if rest.startswith("mlp.mlp1") else "down_proj"
                part = rest.rsplit(".", 1)[1]  # blocks / scales
                if quantized:
                    yield f"{ex}.{which}_{part}", t
                elif part == "blocks":
                    blocks[which] = t
                else:
                    yield f"{ex}.{which}", _dequantize_bf16(blocks.pop(which), t).transpose(1, 2).contiguous()


def make_checkpoint(config: ModelConfig | str, out_dir, layout: str = "original", seed: int = 0,
                    quantized: bool = True, shard_bytes: int = 4 * 1024**3, overwrite: bool = False) -> Path:
    """Write a random checkpoint. layout: "original" (OpenAI's original/ folder) or "hf".
    quantized=False (hf only) writes bf16 experts like dequantised fine-tunes."""
    from safetensors.torch import save_file

    name = config if isinstance(config, str) else None
    config = get_preset(config) if isinstance(config, str) else config
    if layout not in ("original", "hf"):
        raise ValueError(f"layout must be 'original' or 'hf', got {layout!r}")
    if layout == "original" and not quantized:
        raise ValueError("the original layout always stores MXFP4 experts; use layout='hf' for bf16 experts")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty (pass overwrite)")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    named = random_tensors(config, seed)
    if layout == "hf":
        named = _hf_tensors(config, named, quantized)
    shards, current, size = [], {}, 0
    for tname, t in named:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(_write_shard(save_file, tmp, len(shards), current))
            current, size = {}, 0
        current[tname] = t.contiguous()
        size += nbytes
    shards.append(_write_shard(save_file, tmp, len(shards), current))

    n = len(shards)
    final_names = {}
    for i, (path, names) in enumerate(shards):
        fname = "model.safetensors" if n == 1 and layout == "original" else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        path.rename(tmp / fname)
        final_names.update({k: fname for k in names})
    if layout == "original":
        (tmp / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
    else:
        cfg = config.to_hf_dict(quantized=quantized)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        total = sum((tmp / f).stat().st_size for f in set(final_names.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(final_names.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "SYNTHETIC.md").write_text(
        f"Random gpt-oss weights written by gptoss_ext.synthetic (preset {name or 'custom'}, seed {seed}, "
        f"layout {layout}, experts {'mxfp4' if quantized else 'bf16'}). Not a trained model.\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def _write_shard(save_file, folder: Path, i: int, tensors: dict) -> tuple[Path, list[str]]:
    path = folder / f"shard-{i}.tmp"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors)
