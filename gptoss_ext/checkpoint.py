"""Checkpoint loading: OpenAI's `original/` layout and the Hugging Face layout (MXFP4 or bf16 experts).

`load_model(path, device=..., dtype=...)`:
  1. finds config.json and the safetensors files, reads every file's header (names, dtypes,
     shapes, byte ranges; a file shorter than its header promises is reported as truncated);
  2. checks every tensor the config needs is present with the right shape and dtype, collecting
     all problems into one `CheckpointError` before any weight is read;
  3. builds the model on the meta device and reads tensors one at a time straight to the target
     device (host memory peaks near the largest tensor), converting floating tensors to `dtype`
     and keeping MXFP4 expert weights packed (uint8 blocks + scales).
A failure at any step raises `CheckpointError` and drops whatever was loaded.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded; the message says what and where."""


_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
}
_FLOAT_ST = {"BF16", "F16", "F32"}


@dataclass
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors header and check the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 512 * 1024 * 1024:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    out, end = {}, 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]))
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated file: {size} bytes on disk, header needs {8 + n + end}")
    return out


# ---- what each layout must contain -------------------------------------------------------------

@dataclass
class Source:
    """One model tensor and the checkpoint tensors it is made of."""
    target: str                                   # name in GptOss.state_dict()
    names: list[str]                              # checkpoint names
    shapes: list[tuple[int, ...]]                 # expected shape of each
    kind: str                                     # "float" or "uint8"
    combine: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]


def _original_sources(c: ModelConfig) -> list[Source]:
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    out = [Source("embedding.weight", ["embedding.weight"], [(V, H)], "float")]
    for i in range(c.num_hidden_layers):
        a, m = f"block.{i}.attn", f"block.{i}.mlp"
        for name, shape, kind in [
            (f"{a}.norm.scale", (H,), "float"),
            (f"{a}.qkv.weight", (c.qkv_dim, H), "float"),
            (f"{a}.qkv.bias", (c.qkv_dim,), "float"),
            (f"{a}.sinks", (c.num_attention_heads,), "float"),
            (f"{a}.out.weight", (H, c.q_dim), "float"),
            (f"{a}.out.bias", (H,), "float"),
            (f"{m}.norm.scale", (H,), "float"),
            (f"{m}.gate.weight", (E, H), "float"),
            (f"{m}.gate.bias", (E,), "float"),
            (f"{m}.mlp1_weight.blocks", (E, 2 * I, H // 32, 16), "uint8"),
            (f"{m}.mlp1_weight.scales", (E, 2 * I, H // 32), "uint8"),
            (f"{m}.mlp1_bias", (E, 2 * I), "float"),
            (f"{m}.mlp2_weight.blocks", (E, H, I // 32, 16), "uint8"),
            (f"{m}.mlp2_weight.scales", (E, H, I // 32), "uint8"),
            (f"{m}.mlp2_bias", (E, H), "float"),
        ]:
            out.append(Source(name, [name], [shape], kind))
    out.append(Source("norm.scale", ["norm.scale"], [(H,)], "float"))
    out.append(Source("unembedding.weight", ["unembedding.weight"], [(V, H)], "float"))
    return out


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _transpose_experts(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].transpose(1, 2).contiguous()


def _hf_sources(c: ModelConfig, quantized: bool) -> list[Source]:
    H, I, E, V = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size
    qd, kd = c.q_dim, c.kv_dim
    out = [Source("embedding.weight", ["model.embed_tokens.weight"], [(V, H)], "float")]
    for i in range(c.num_hidden_layers):
        a, m, p = f"block.{i}.attn", f"block.{i}.mlp", f"model.layers.{i}"
        sa = f"{p}.self_attn"
        out += [
            Source(f"{a}.norm.scale", [f"{p}.input_layernorm.weight"], [(H,)], "float"),
            Source(f"{a}.qkv.weight", [f"{sa}.q_proj.weight", f"{sa}.k_proj.weight", f"{sa}.v_proj.weight"],
                   [(qd, H), (kd, H), (kd, H)], "float", _cat),
            Source(f"{a}.qkv.bias", [f"{sa}.q_proj.bias", f"{sa}.k_proj.bias", f"{sa}.v_proj.bias"],
                   [(qd,), (kd,), (kd,)], "float", _cat),
            Source(f"{a}.sinks", [f"{sa}.sinks"], [(c.num_attention_heads,)], "float"),
            Source(f"{a}.out.weight", [f"{sa}.o_proj.weight"], [(H, qd)], "float"),
            Source(f"{a}.out.bias", [f"{sa}.o_proj.bias"], [(H,)], "float"),
            Source(f"{m}.norm.scale", [f"{p}.post_attention_layernorm.weight"], [(H,)], "float"),
            Source(f"{m}.gate.weight", [f"{p}.mlp.router.weight"], [(E, H)], "float"),
            Source(f"{m}.gate.bias", [f"{p}.mlp.router.bias"], [(E,)], "float"),
            Source(f"{m}.mlp1_bias", [f"{p}.mlp.experts.gate_up_proj_bias"], [(E, 2 * I)], "float"),
            Source(f"{m}.mlp2_bias", [f"{p}.mlp.experts.down_proj_bias"], [(E, H)], "float"),
        ]
        ex = f"{p}.mlp.experts"
        if quantized:
            out += [
                Source(f"{m}.mlp1_weight.blocks", [f"{ex}.gate_up_proj_blocks"], [(E, 2 * I, H // 32, 16)], "uint8"),
                Source(f"{m}.mlp1_weight.scales", [f"{ex}.gate_up_proj_scales"], [(E, 2 * I, H // 32)], "uint8"),
                Source(f"{m}.mlp2_weight.blocks", [f"{ex}.down_proj_blocks"], [(E, H, I // 32, 16)], "uint8"),
                Source(f"{m}.mlp2_weight.scales", [f"{ex}.down_proj_scales"], [(E, H, I // 32)], "uint8"),
            ]
        else:  # dequantised experts are stored transposed: [E, in, out]
            out += [
                Source(f"{m}.mlp1_weight.weight", [f"{ex}.gate_up_proj"], [(E, H, 2 * I)], "float", _transpose_experts),
                Source(f"{m}.mlp2_weight.weight", [f"{ex}.down_proj"], [(E, I, H)], "float", _transpose_experts),
            ]
    out.append(Source("norm.scale", ["model.norm.weight"], [(H,)], "float"))
    out.append(Source("unembedding.weight", ["lm_head.weight"], [(V, H)], "float"))
    return out


# ---- finding the pieces --------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    path: Path
    layout: str                 # "original" or "hf"
    config: ModelConfig
    quantized: bool
    files: list[Path]
    tokenizer_check: str | None = None   # whether the folder's own tokenizer.json agrees (load_model / check_checkpoint)

    def sources(self) -> list[Source]:
        return _original_sources(self.config) if self.layout == "original" else _hf_sources(self.config, self.quantized)


def inspect_checkpoint(path) -> CheckpointInfo:
    """Find the layout, config and shard files of a checkpoint folder (no tensor data is read)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path is not a folder: {root}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file() and (root / "original" / "config.json").is_file():
        root = root / "original"
        cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {root}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    try:
        if raw.get("model_type") == "gpt_oss":
            layout = "hf"
            qc = raw.get("quantization_config") or {}
            quantized = qc.get("quant_method") == "mxfp4"
            if qc and not quantized:
                raise CheckpointError(f"{cfg_path}: unsupported quantization {qc.get('quant_method')!r} "
                                      "(supported: mxfp4, or none for bf16 experts)")
            config = ModelConfig.from_hf_dict(raw)
        elif "num_experts" in raw and "experts_per_token" in raw:
            layout, quantized = "original", True
            config = ModelConfig.from_original_dict(raw)
        elif "model_type" in raw:
            raise CheckpointError(f"{cfg_path}: model_type {raw['model_type']!r} is not gpt_oss")
        else:
            raise CheckpointError(f"{cfg_path}: neither a gpt-oss original/ config nor a Hugging Face gpt_oss config")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{cfg_path}: invalid config ({e})") from None

    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index ({e})") from None
        files = sorted({root / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{root}: shard(s) named in the index are missing: {', '.join(missing)}")
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors files in {root}")
    return CheckpointInfo(root, layout, config, quantized, files)


def _check(info: CheckpointInfo) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in info.files:
        tensors.update(read_safetensors_header(f))
    problems = []
    for src in info.sources():
        for name, shape in zip(src.names, src.shapes):
            t = tensors.get(name)
            if t is None:
                problems.append(f"missing tensor {name}")
                continue
            if t.shape != shape:
                problems.append(f"{name}: shape {list(t.shape)}, expected {list(shape)}")
            if src.kind == "uint8" and t.dtype != "U8":
                problems.append(f"{name}: dtype {t.dtype}, expected U8 (MXFP4)")
            if src.kind == "float" and t.dtype not in _FLOAT_ST:
                problems.append(f"{name}: dtype {t.dtype}, expected BF16 (or F16/F32)")
    if problems:
        other = "original" if info.layout == "hf" else "hf"
        other_names = {n for s in (_original_sources(info.config) if other == "original"
                                   else _hf_sources(info.config, info.quantized)) for n in s.names}
        missing = [p for p in problems if p.startswith("missing tensor")]
        if missing and len(other_names & tensors.keys()) >= len(other_names) // 2:
            raise CheckpointError(
                f"{info.path}: config.json is a {_LAYOUT_NAMES[info.layout]} config, but the tensors are named as "
                f"in the {_LAYOUT_NAMES[other]} (e.g. {sorted(other_names & tensors.keys())[0]!r}): put that "
                f"layout's config.json beside them ({len(missing)} tensors the config expects are missing)")
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise CheckpointError(f"{info.path} ({info.layout} layout) does not match its config: "
                              + "; ".join(problems[:20]) + more)
    return tensors


_LAYOUT_NAMES = {"original": "OpenAI original/ layout", "hf": "Hugging Face layout"}


def _tokenizer_check(info: CheckpointInfo) -> str | None:
    from . import tokenizer

    try:
        r = tokenizer.compare_hf_tokenizer(info.path)
    except tokenizer.TokenizerError as e:
        return f"the folder's tokenizer.json was not compared: {e}"
    return None if r is None else r[1]


def check_checkpoint(path) -> CheckpointInfo:
    """inspect_checkpoint and every check load_model makes before reading weights (each file's
    header and size: a truncated file is an error; every tensor present with its shape and dtype),
    plus whether a tokenizer.json in the folder agrees with o200k_harmony. No tensor data is read."""
    info = inspect_checkpoint(path)
    _check(info)
    info.tokenizer_check = _tokenizer_check(info)
    return info


def resolve_device(device) -> torch.device:
    """'auto' (the default of load_model, random_model and the CLI): the current CUDA device when
    there is one, else the CPU; anything torch.device takes otherwise. A clear ValueError for a
    device that does not exist here."""
    if device is None or device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def load_model(path, device="auto", dtype=torch.bfloat16, tp=None):
    """Load a gpt-oss checkpoint (either layout) into a `GptOss` on `device`: 'auto' (default) is the
    GPU when there is one, else the CPU (as the CLI's --device auto).

    dtype: bfloat16 (default) or float32 for everything but the packed MXFP4 experts.
    tp: a gptoss_ext.parallel.TensorParallel: this rank's shard only (gptoss_ext.parallel); each
    tensor is read on the CPU one at a time, sliced, and only the slice goes to the device."""
    from safetensors import safe_open

    from .model import GptOss

    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")
    device = resolve_device(device)
    info = inspect_checkpoint(path)
    tensors = _check(info)
    info.tokenizer_check = _tokenizer_check(info)
    config, shard, rows, experts = info.config, None, None, None
    if tp is not None:
        from .parallel import check_kernels_serve, local_config, shard_rows, shard_tensor

        try:
            config = local_config(info.config, tp.world, tp.moe)
            check_kernels_serve(config, device, info.quantized, tp)
        except ValueError as e:
            raise CheckpointError(f"{info.path}: {e}") from None
        experts = tp.experts(info.config)
        shard = functools.partial(shard_tensor, config=info.config, rank=tp.rank, world=tp.world, moe=tp.moe)
        rows = functools.partial(shard_rows, config=info.config, rank=tp.rank, world=tp.world, moe=tp.moe)
    with torch.device("meta"):
        model = GptOss(config, dtype=dtype, quantized=info.quantized, experts=experts)
    state: dict[str, torch.Tensor] = {}
    handles = {}
    try:
        for src in info.sources():
            # a share that is a range of rows (whole experts, the vocabulary's rows) is read alone
            # from the file (the sources' combines act within each expert / row)
            part_rows = rows(src.target) if rows else None
            parts = []
            for name in src.names:
                f = tensors[name].file
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt", device="cpu")
                t = handles[f].get_slice(name)[part_rows] if part_rows else handles[f].get_tensor(name)
                parts.append(t if shard else t.to(device=device, dtype=dtype if src.kind == "float" else None))
                del t
            whole = src.combine(parts)
            del parts
            if shard:        # this rank's slice of the tensor, and only that to the device
                if not part_rows:
                    whole = shard(src.target, whole)
                whole = whole.to(device=device, dtype=dtype if src.kind == "float" else None,
                                 copy=True)     # (not a view that keeps the whole alive)
            state[src.target] = whole
            del whole
        handles.clear()
        model.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        handles.clear()
        state.clear()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise CheckpointError(f"out of GPU memory while loading {info.path}: {e}") from None
        raise CheckpointError(f"failed to load {info.path}: {type(e).__name__}: {e}") from None
    state.clear()          # the model holds the tensors now: the relayout below frees each packed original
    model.eval()
    model.set_checkpoint_info(info)
    model.tp = tp
    try:
        model.prepare_kernels()
    except torch.cuda.OutOfMemoryError as e:
        del model
        gc.collect()
        torch.cuda.empty_cache()
        raise CheckpointError(f"out of GPU memory while preparing the MXFP4 experts of {info.path}: {e}") from None
    return model


def checkpoint_bytes(path) -> int:
    info = inspect_checkpoint(path)
    return sum(os.path.getsize(f) for f in info.files)
