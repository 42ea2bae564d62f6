// The one TORCH_LIBRARY of gptoss_ext: every op's schema and its CUDA implementation.
// Outputs are allocated by the Python wrappers in gptoss_ext/ops.py (which also register the
// fake implementations used for tracing and CUDA-graph capture).
#include <torch/library.h>

#include "gptoss_build_info.h"  // generated: torch/CUDA versions, archs, kernels (read by gptoss_ext/_extension.py)
#include "ops/ops.h"

TORCH_LIBRARY(gptoss_ext, m) {
  // out = rms_norm(x) * scale
  m.def("rms_norm(Tensor x, Tensor scale, float eps, Tensor(a!) out) -> ()");
  // residual_out = residual + x; out = rms_norm(residual_out) * scale
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
  // the MoE combine fused into the next residual add + RMSNorm: r = residual + sum_j y[:, j] (y fp32
  // [T, k, H], the experts' weighted outputs), rounded once; out = rms_norm(r) * scale, residual_out = r
  m.def("moe_combine_add_rms_norm(Tensor y, Tensor residual, Tensor scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
  // YaRN RoPE in place on q [T, Hq, D] and k [T, Hkv, D] at positions [T]
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, float concentration) -> ()");
  // top-k experts + softmax per token, and the grouping by expert (counts, offsets, perm);
  // scratch: int32, zero before first use, left ready for reuse
  m.def("moe_router(Tensor logits, int k, Tensor(a!) ids, Tensor(b!) weights, Tensor(c!) counts, "
        "Tensor(d!) offsets, Tensor(e!) perm, Tensor(f!) scratch) -> ()");
  // decode (1..32 tokens): the router's gate linear (bf16 logits, as a bf16 linear rounds them) and
  // moe_router in one launch; weight must be constant (read before the programmatic-launch wait)
  m.def("moe_gate_router(Tensor x, Tensor weight, Tensor? bias, int k, Tensor(a!) ids, Tensor(b!) weights, "
        "Tensor(c!) counts, Tensor(d!) offsets, Tensor(e!) perm, Tensor(f!) scratch) -> ()");
  // decode (1..2 tokens): add_rms_norm(x, residual, norm_scale) -> (out, residual_out), then
  // moe_gate_router on out, in one launch (bit-identical to the two ops)
  m.def("moe_add_norm_gate_router(Tensor x, Tensor residual, Tensor norm_scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out, Tensor weight, Tensor? bias, int k, Tensor(c!) ids, Tensor(d!) weights, "
        "Tensor(e!) counts, Tensor(f!) offsets, Tensor(g!) perm, Tensor(h!) scratch) -> ()");
  // out[p] = SwiGLU(x[p / top_k] W1[e]^T + b1[e]) for pairs p grouped by expert (MXFP4, kernel layout);
  // max_scale: the weights' largest E8M0 scale byte (<= 128 enables the scale-folding prefill kernel)
  m.def("moe_mlp1(Tensor x, Tensor codes, Tensor scales, Tensor bias, Tensor perm, Tensor offsets, int top_k, "
        "float alpha, float limit, Tensor(a!) out, int max_scale=255) -> ()");
  // out[p] = route_weight[p] * (h[p] W2[e]^T + b2[e]), float32. routing_ready: perm / offsets /
  // route_weights were written before the kernel launched just before this one (mlp2 right after
  // mlp1), so the decode kernel may read them before its programmatic-launch wait
  m.def("moe_mlp2(Tensor h, Tensor codes, Tensor scales, Tensor bias, Tensor perm, Tensor offsets, "
        "Tensor route_weights, Tensor(a!) out, int max_scale=255, bool routing_ready=False) -> ()");
  // moe_mlp1 into h, then moe_mlp2 of h into y (routing_ready, so mlp2's first weight loads overlap
  // mlp1's tail), as one op
  m.def("moe_experts(Tensor x, Tensor codes1, Tensor scales1, Tensor bias1, Tensor codes2, Tensor scales2, "
        "Tensor bias2, Tensor perm, Tensor offsets, Tensor route_weights, int top_k, float alpha, float limit, "
        "Tensor(a!) h, Tensor(b!) y, int max_scale1=255, int max_scale2=255) -> ()");
  // out[t] = residual[t] + sum over the token's top_k rows of y
  m.def("moe_combine(Tensor y, Tensor? residual, int top_k, Tensor(a!) out) -> ()");
  // Sink-aware causal GQA attention, head_dim 64, over a KV cache [B, max_len, Hkv, 64] (one layer).
  // Varlen prefill: sequence b's queries q[cu_seqlens[b] : cu_seqlens[b+1]] sit at positions
  // start[b] ..; keys are cache rows 0 .. start[b] + q_len - 1 of batch row b. window 0 = full.
  m.def("attn_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? sinks, Tensor cu_seqlens, Tensor start, "
        "int max_q_len, int window, float sm_scale, Tensor(a!) out) -> ()");
  // [chunk, splits, warps] for attn_decode on this device (depends on the shapes only: CUDA-graph safe)
  m.def("attn_decode_plan(int B, int Hq, int Hkv, int max_len, int window, int device) -> int[]",
        &gptoss::attn_decode_plan);
  // Decode: q [B, Hq, 64], one query per sequence at position seq_lens[b] - 1; split-KV, the splits
  // merged in the same launch (tickets: zeroed int32 counters, left zero). kv_ready: seq_lens and
  // all but the newest cache rows were written two or more kernels back (loads may start early)
  m.def("attn_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? sinks, Tensor seq_lens, int window, "
        "float sm_scale, int chunk, int warps, Tensor(a!) ws_o, Tensor(b!) ws_ml, Tensor(c!) tickets, "
        "Tensor(d!) out, bool kv_ready=False) -> ()");
  // cache rows slots[t] (= b * max_len + pos) <- k[t], v[t]
  m.def("kv_write(Tensor k, Tensor v, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache) -> ()");
  // a decode step's bookkeeping, one launch: seq_lens += active (int32); positions = seq_lens - 1;
  // slots = active > 0 ? row0 + positions : -1 (int64)
  m.def("decode_prep(Tensor(a!) seq_lens, Tensor active, Tensor row0, Tensor(b!) positions, Tensor(c!) slots) -> ()");
  // rope_ and kv_write in one launch (decode and prefill with a cache): q, k rotated in place,
  // rotated k and v written to cache rows slots[t]
  m.def("rope_kv_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor inv_freq, float concentration, "
        "Tensor slots, Tensor(c!) k_cache, Tensor(d!) v_cache) -> ()");
  // out = x weight^T + bias for 1..8 rows of x (decode projections), bf16. weight_constant: no
  // kernel of this library writes `weight` (model weights): its loads may overlap the previous kernel
  m.def("linear_skinny(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, bool weight_constant=False) -> ()");
  // decode qkv projection + RoPE on its q / k heads + KV-cache write of k / v, one launch (1..8 rows);
  // positions and slots must not be written by the kernel launched just before (read before its wait)
  m.def("linear_rope_kv(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, Tensor positions, Tensor inv_freq, "
        "float concentration, Tensor slots, Tensor(b!) k_cache, Tensor(c!) v_cache, bool weight_constant=False) -> ()");
  // programmatic dependent launch of this library's kernels on Hopper (default on; GPTOSS_PDL=0 off)
  m.def("set_pdl(bool enabled) -> bool", &gptoss::set_pdl_enabled);
}

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("rms_norm", &gptoss::rms_norm);
  m.impl("add_rms_norm", &gptoss::add_rms_norm);
  m.impl("moe_combine_add_rms_norm", &gptoss::moe_combine_add_rms_norm);
  m.impl("rope_", &gptoss::rope_);
  m.impl("moe_router", &gptoss::moe_router);
  m.impl("moe_gate_router", &gptoss::moe_gate_router);
  m.impl("moe_add_norm_gate_router", &gptoss::moe_add_norm_gate_router);
  m.impl("moe_mlp1", &gptoss::moe_mlp1);
  m.impl("moe_mlp2", &gptoss::moe_mlp2);
  m.impl("moe_experts", &gptoss::moe_experts);
  m.impl("moe_combine", &gptoss::moe_combine);
  m.impl("attn_prefill", &gptoss::attn_prefill);
  m.impl("attn_decode", &gptoss::attn_decode);
  m.impl("kv_write", &gptoss::kv_write);
  m.impl("decode_prep", &gptoss::decode_prep);
  m.impl("rope_kv_", &gptoss::rope_kv_);
  m.impl("linear_skinny", &gptoss::linear_skinny);
  m.impl("linear_rope_kv", &gptoss::linear_rope_kv);
}

