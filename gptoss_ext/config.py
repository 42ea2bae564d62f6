"""Model configuration, named presets, and parameter / byte accounting.

The field names follow OpenAI's `original/config.json`; `from_hf_dict` / `to_hf_dict` translate
the Hugging Face `config.json` (model_type "gpt_oss").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .reference import ROPE_DEFAULTS

# MXFP4: 32 four-bit values (16 bytes) + one E8M0 scale byte per block = 4.25 bits per weight.
MXFP4_BLOCK = 32
MXFP4_BYTES_PER_WEIGHT = 17 / 32


@dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = ROPE_DEFAULTS["original_context"]
    rope_theta: float = ROPE_DEFAULTS["theta"]
    rope_scaling_factor: float = ROPE_DEFAULTS["factor"]
    rope_ntk_alpha: float = ROPE_DEFAULTS["ntk_alpha"]
    rope_ntk_beta: float = ROPE_DEFAULTS["ntk_beta"]
    rms_norm_eps: float = 1e-5
    # Which layers use the sliding window; None means the released pattern (even layers).
    layer_types: tuple[str, ...] | None = field(default=None)

    def __post_init__(self):
        problems = []
        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                     "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                     "num_key_value_heads", "initial_context_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        if self.experts_per_token > self.num_experts:
            problems.append(f"experts_per_token ({self.experts_per_token}) > num_experts ({self.num_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                problems.append(f"{name} ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK} for MXFP4")
        if self.sliding_window < 0:
            problems.append(f"sliding_window must be >= 0, got {self.sliding_window}")
        if self.layer_types is not None:
            lt = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", lt)
            if len(lt) != self.num_hidden_layers:
                problems.append(f"layer_types has {len(lt)} entries for {self.num_hidden_layers} layers")
            bad = sorted(set(lt) - {"sliding_attention", "full_attention"})
            if bad:
                problems.append(f"unknown layer_types {bad}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    @property
    def context_length(self) -> int:
        """Longest context the RoPE scaling was made for (4096 x 32 = 131072 for the releases)."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def rope_kwargs(self) -> dict:
        return dict(theta=self.rope_theta, factor=self.rope_scaling_factor,
                    original_context=self.initial_context_length,
                    ntk_alpha=self.rope_ntk_alpha, ntk_beta=self.rope_ntk_beta)

    def layer_window(self, layer: int) -> int:
        """Sliding window of a layer (0 = full causal attention)."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else 0
        return self.sliding_window if layer % 2 == 0 else 0

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- counting ---------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts by group. Expert weights are the MXFP4 part."""
        H, I, E, L, V = (self.hidden_size, self.intermediate_size, self.num_experts,
                         self.num_hidden_layers, self.vocab_size)
        attn = H + self.qkv_dim * H + self.qkv_dim + self.num_attention_heads + H * self.q_dim + H
        router_and_norm = H + E * H + E
        expert_weights = E * (2 * I * H + H * I)
        expert_bias = E * (2 * I + H)
        return {
            "embedding": V * H,
            "unembedding": V * H,
            "attention": L * attn,
            "router_and_norms": L * router_and_norm + H,
            "expert_weights": L * expert_weights,
            "expert_biases": L * expert_bias,
        }

    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def num_active_params(self) -> int:
        """Parameters used per token, counted like the model card (embedding table excluded)."""
        c = self.param_counts()
        frac = self.experts_per_token / self.num_experts
        return (c["unembedding"] + c["attention"] + c["router_and_norms"]
                + round(frac * (c["expert_weights"] + c["expert_biases"])))

    def weight_bytes(self, quantized: bool = True) -> dict[str, int]:
        """Bytes in memory: bf16 everywhere except the expert weights, MXFP4 (4.25 bits/weight)
        unless quantized=False (dequantised fine-tunes)."""
        c = self.param_counts()
        out = {k: 2 * v for k, v in c.items()}
        if quantized:
            out["expert_weights"] = int(c["expert_weights"] * MXFP4_BYTES_PER_WEIGHT)
        return out

    def kv_cache_bytes(self, tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
        """Bytes of a bf16 KV cache holding `tokens` positions for `batch` sequences."""
        return 2 * self.num_hidden_layers * batch * tokens * self.kv_dim * dtype_bytes

    def decode_bytes_per_step(self, context: int, batch: int = 1) -> int:
        """Bytes a decode step must read at least: attention + router + selected experts
        (all distinct experts the batch touches, at most E), unembedding, and the KV cache."""
        L, H, I, E = self.num_hidden_layers, self.hidden_size, self.intermediate_size, self.num_experts
        c = self.weight_bytes()
        per_expert = (3 * I * H) * MXFP4_BYTES_PER_WEIGHT + 2 * (2 * I + H)
        # Expected number of distinct experts hit by `batch` tokens picking k of E uniformly.
        k = self.experts_per_token
        distinct = E * (1 - (1 - k / E) ** batch) if batch > 1 else k
        experts = L * distinct * per_expert
        kv = 0
        for layer in range(L):
            w = self.layer_window(layer)
            n = min(context, w) if w else context
            kv += batch * 2 * n * self.kv_dim * 2
        return int(c["attention"] + c["router_and_norms"] + experts + c["unembedding"] + kv)

    def summary(self, quantized: bool = True) -> dict:
        wb = self.weight_bytes(quantized)
        return {
            "params": self.num_params(),
            "active_params": self.num_active_params(),
            "weight_bytes": sum(wb.values()),
            "weight_bytes_by_group": wb,
        }

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_original_dict(self) -> dict:
        d = {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }
        if self.layer_types is not None:
            d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_original_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta",
                  "swiglu_limit", "swiglu_alpha", "rms_norm_eps"):
            if k in kwargs:
                kwargs[k] = float(kwargs[k])
        return cls(**kwargs)

    def to_hf_dict(self, quantized: bool = True) -> dict:
        d = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "truncate": False,
                "original_max_position_embeddings": self.initial_context_length,
            },
            "layer_types": [("sliding_attention" if self.layer_window(i) else "full_attention")
                            for i in range(self.num_hidden_layers)],
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            "eos_token_id": 200002,
            "pad_token_id": 199999,
        }
        if quantized:
            d["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ValueError(f"unsupported rope type {rope.get('rope_type')!r}: gpt-oss uses yarn")
        if rope.get("truncate", False):
            raise ValueError("rope 'truncate: true' is not the gpt-oss YaRN variant")
        theta = rope.get("rope_theta", d.get("rope_theta", ROPE_DEFAULTS["theta"]))
        layer_types = d.get("layer_types")
        kwargs = dict(
            num_hidden_layers=d["num_hidden_layers"],
            num_experts=d.get("num_local_experts", d.get("num_experts")),
            experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
            sliding_window=d.get("sliding_window") or 0,
            initial_context_length=int(rope.get("original_max_position_embeddings",
                                                d.get("initial_context_length", ROPE_DEFAULTS["original_context"]))),
            rope_theta=float(theta),
            rope_scaling_factor=float(rope.get("factor", ROPE_DEFAULTS["factor"])),
            rope_ntk_alpha=float(rope.get("beta_slow", ROPE_DEFAULTS["ntk_alpha"])),
            rope_ntk_beta=float(rope.get("beta_fast", ROPE_DEFAULTS["ntk_beta"])),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            layer_types=tuple(layer_types) if layer_types else None,
        )
        cfg = cls(**kwargs)
        # Drop layer_types when it is the released pattern, so configs compare equal.
        if cfg.layer_types is not None and all(
                (t == "sliding_attention") == (i % 2 == 0) for i, t in enumerate(cfg.layer_types)):
            cfg = cfg.replace(layer_types=None)
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_original_dict(), indent=2)


PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    # Small random models for tests and demos: the real vocabulary, head_dim 64, GQA,
    # sliding window on even layers, YaRN; MXFP4-compatible widths.
    "tiny": ModelConfig(num_hidden_layers=2, num_experts=8, hidden_size=256, intermediate_size=256,
                        num_attention_heads=8, num_key_value_heads=2),
    "small": ModelConfig(num_hidden_layers=4, num_experts=16, hidden_size=512, intermediate_size=512,
                         num_attention_heads=16, num_key_value_heads=2),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def format_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"

