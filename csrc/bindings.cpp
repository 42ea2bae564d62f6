// The one TORCH_LIBRARY of gptoss_ext: every op's schema and its CUDA implementation, grouped by
// road (kernels/<name>.cu -> ops/<name>_ops.cpp -> here -> gptoss_ext/ops.py -> reference.py ->
// tests/test_<name>*.py). Ops that return () write into their out arguments; gptoss_ext/ops.py
// allocates those and registers the fake implementations (for tracing and CUDA-graph capture)
// from these schemas.
#include <torch/library.h>

#include "gptoss_build_info.h"  // generated: torch/CUDA versions, archs, kernels (read by gptoss_ext/_extension.py)
#include "kernels/attention.h"
#include "kernels/linear.h"
#include "kernels/moe_experts.h"
#include "kernels/moe_router.h"
#include "kernels/pdl.h"
#include "kernels/rms_norm.h"
#include "kernels/rope.h"
#include "ops/ops.h"

namespace gptoss {

bool set_pdl_enabled(bool enabled) { return set_pdl(enabled); }

c10::Dict<std::string, int64_t> limits() {
  const std::pair<const char*, int64_t> table[] = {
      {"attention_head_dim", kAttnHeadDim},          {"attention_min_block_rows", kAttnMinBlockRows},
      {"rms_norm_max_hidden", kRmsNormMaxHidden},
      {"rope_max_head_dim", kRopeMaxHeadDim},        {"linear_skinny_max_rows", kSkinnyMaxM},
      {"linear_skinny_max_x_bytes", kSkinnyMaxXBytes}, {"moe_router_max_experts", kRouterMaxExperts},
      {"moe_router_max_top_k", kRouterMaxTopK},      {"moe_gate_router_max_tokens", kGateRouterMaxTokens},
      {"moe_gate_router_norm_max_tokens", kGateNormMaxTokens}, {"moe_gate_router_max_hidden", kGateMaxHidden},
      {"moe_experts_max_experts", kMoeMaxExperts},   {"moe_experts_row_multiple", kMoeRowMultiple},
      {"moe_experts_col_multiple", kMoeColMultiple},
  };
  c10::Dict<std::string, int64_t> d;
  for (const auto& [name, value] : table) d.insert(name, value);
  return d;
}

}  // namespace gptoss

TORCH_LIBRARY(gptoss_ext, m) {
  // ---- library-wide
  // the kernels' limits by name (the one definition: Python reads them, never repeats them)
  m.def("limits() -> Dict(str, int)", &gptoss::limits);
  // programmatic dependent launch of this library's kernels on Hopper (default on); returns the previous setting
  m.def("set_pdl(bool enabled) -> bool", &gptoss::set_pdl_enabled);

  // ---- rms_norm
  // out = rms_norm(x) * scale
  m.def("rms_norm(Tensor x, Tensor scale, float eps, Tensor(a!) out) -> ()");
  // residual_out = residual + x; out = rms_norm(residual_out) * scale
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");

  // ---- rope
  // YaRN RoPE in place on q [T, Hq, D] and k [T, Hkv, D] at positions [T]
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, float concentration) -> ()");
  // rope_ and kv_write in one launch: q, k rotated in place, rotated k and v written to cache rows slots[t]
  m.def("rope_kv_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor inv_freq, float concentration, "
        "Tensor slots, Tensor(c!) k_cache, Tensor(d!) v_cache) -> ()");

  // ---- kv_cache
  // cache rows slots[t] (= b * max_len + pos) <- k[t], v[t]
  m.def("kv_write(Tensor k, Tensor v, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache) -> ()");
  // a decode step's bookkeeping, one launch: seq_lens += active (int32); positions = seq_lens - 1;
  // slots = active > 0 ? row0 + positions : -1 (int64)

  // ---- attention
  // Sink-aware causal GQA attention, head_dim 64, over a KV cache [B, max_len, Hkv, 64] (one layer),
  // or with block_table (int32 [B, max_blocks]) a paged pool [blocks * block_size, Hkv, 64].
  // Varlen prefill: sequence b's queries q[cu_seqlens[b] : cu_seqlens[b+1]] sit at positions
  // start[b] ..; keys are cache rows 0 .. start[b] + q_len - 1 of batch row b. window 0 = full.
  m.def("attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? sinks, Tensor cu_seqlens, Tensor start, "
        "int max_q_len, int window, float sm_scale, Tensor(a!) out, Tensor? block_table=None, int block_size=0) -> ()");
  // [chunk, splits, warps] for attention_decode on this device (depends on the shapes only: CUDA-graph safe)
  m.def("attention_decode_plan(int B, int Hq, int Hkv, int max_len, int window, int device) -> int[]",
        &gptoss::attention_decode_plan);
  // Decode: q [B, Hq, 64], one query per sequence at position seq_lens[b] - 1; split-KV, the splits
  // merged in the same launch (tickets: zeroed int32 counters, left zero). kv_ready: seq_lens and
  // all but the newest cache rows were written two or more kernels back (loads may start early)
  m.def("attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? sinks, Tensor seq_lens, int window, "
        "float sm_scale, int chunk, int warps, Tensor(a!) ws_o, Tensor(b!) ws_ml, Tensor(c!) tickets, "
        "Tensor(d!) out, bool kv_ready=False, Tensor? block_table=None, int block_size=0) -> ()");

  // ---- linear
  // out = x weight^T + bias for 1..8 rows of x (decode projections), bf16. weight_constant: no
  // kernel of this library writes `weight` (model weights): its loads may overlap the previous kernel
  m.def("linear_skinny(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, bool weight_constant=False) -> ()");
  // decode qkv projection + RoPE on its q / k heads + KV-cache write of k / v, one launch (1..8 rows);
  // positions and slots must not be written by the kernel launched just before (read before its wait)
  m.def("linear_rope_kv(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out, Tensor positions, Tensor inv_freq, "
        "float concentration, Tensor slots, Tensor(b!) k_cache, Tensor(c!) v_cache, bool weight_constant=False) -> ()");

  // ---- moe_router
  // top-k experts + softmax per token, and the grouping by expert (counts, offsets, perm);
  // scratch: int32, zero before first use, left ready for reuse
  m.def("moe_router(Tensor logits, int k, Tensor(a!) ids, Tensor(b!) weights, Tensor(c!) counts, "
        "Tensor(d!) offsets, Tensor(e!) perm, Tensor(f!) scratch) -> ()");
  // decode (1..32 tokens): the router's gate linear (bf16 logits, as a bf16 linear rounds them) and
  // moe_router in one launch; weight must be constant (read before the programmatic-launch wait).
  // form: -1 the plan's, 0 ticket, 1 cluster (sm_90, <= 2 tokens, <= 128 experts)
  m.def("moe_gate_router(Tensor x, Tensor weight, Tensor? bias, int k, Tensor(a!) ids, Tensor(b!) weights, "
        "Tensor(c!) counts, Tensor(d!) offsets, Tensor(e!) perm, Tensor(f!) scratch, int form=-1) -> ()");
  // decode (1..2 tokens): add_rms_norm(x, residual, norm_scale) -> (out, residual_out), then
  // moe_gate_router on out, in one launch (bit-identical to the two ops)
  m.def("moe_add_norm_gate_router(Tensor x, Tensor residual, Tensor norm_scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out, Tensor weight, Tensor? bias, int k, Tensor(c!) ids, Tensor(d!) weights, "
        "Tensor(e!) counts, Tensor(f!) offsets, Tensor(g!) perm, Tensor(h!) scratch, int form=-1) -> ()");

  // ---- moe_experts (kernel: -1 = the plan's, else an index into moe_kernel_names() that must serve the call)
  // out[p] = SwiGLU(x[p / top_k] W1[e]^T + b1[e]) for pairs p grouped by expert (MXFP4, kernel layout);
  // max_scale: the weights' largest E8M0 scale byte (> 128 rules out the scale-folding kernels)
  m.def("moe_mlp1(Tensor x, Tensor codes, Tensor scales, Tensor bias, Tensor perm, Tensor offsets, int top_k, "
        "float alpha, float limit, Tensor(a!) out, int max_scale=255, int kernel=-1) -> ()");
  // out[p] = route_weight[p] * (h[p] W2[e]^T + b2[e]), float32. routing_ready: perm / offsets /
  // route_weights were written before the kernel launched just before this one (mlp2 right after
  // mlp1), so the decode kernels may read them before their programmatic-launch wait
  m.def("moe_mlp2(Tensor h, Tensor codes, Tensor scales, Tensor bias, Tensor perm, Tensor offsets, "
        "Tensor route_weights, Tensor(a!) out, int max_scale=255, bool routing_ready=False, int kernel=-1) -> ()");
  // moe_mlp1 into h, then moe_mlp2 of h into y (routing_ready), as one op
  m.def("moe_experts(Tensor x, Tensor codes1, Tensor scales1, Tensor bias1, Tensor codes2, Tensor scales2, "
        "Tensor bias2, Tensor perm, Tensor offsets, Tensor route_weights, int top_k, float alpha, float limit, "
        "Tensor(a!) h, Tensor(b!) y, int max_scale1=255, int max_scale2=255, int kernel=-1) -> ()");
  // the kernel moe_mlp1 / moe_mlp2 pick for `pairs` routed pairs of `experts` experts with weights
  // [rows, cols] on this device (an index into moe_kernel_names())
  m.def("moe_experts_plan(int pairs, int experts, int rows, int cols, int max_scale, int device) -> int",
        &gptoss::moe_experts_plan);
  m.def("moe_kernel_names() -> str[]", &gptoss::moe_kernel_names);

  // ---- moe_combine
  // out[t] = residual[t] + sum over the token's top_k rows of y
  m.def("moe_combine(Tensor y, Tensor? residual, int top_k, Tensor(a!) out) -> ()");
  // the combine fused into the next residual add + RMSNorm: r = residual + sum_j y[:, j] (y fp32
  // [T, k, H], the experts' weighted outputs), rounded once; out = rms_norm(r) * scale, residual_out = r
  m.def("moe_combine_add_rms_norm(Tensor y, Tensor residual, Tensor scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
}

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("rms_norm", &gptoss::rms_norm);
  m.impl("add_rms_norm", &gptoss::add_rms_norm);
  m.impl("rope_", &gptoss::rope_);
  m.impl("rope_kv_", &gptoss::rope_kv_);
  m.impl("kv_write", &gptoss::kv_write);
  m.impl("attention_prefill", &gptoss::attention_prefill);
  m.impl("attention_decode", &gptoss::attention_decode);
  m.impl("linear_skinny", &gptoss::linear_skinny);
  m.impl("linear_rope_kv", &gptoss::linear_rope_kv);
  m.impl("moe_router", &gptoss::moe_router);
  m.impl("moe_gate_router", &gptoss::moe_gate_router);
  m.impl("moe_add_norm_gate_router", &gptoss::moe_add_norm_gate_router);
  m.impl("moe_mlp1", &gptoss::moe_mlp1);
  m.impl("moe_mlp2", &gptoss::moe_mlp2);
  m.impl("moe_experts", &gptoss::moe_experts);
  m.impl("moe_combine", &gptoss::moe_combine);
  m.impl("moe_combine_add_rms_norm", &gptoss::moe_combine_add_rms_norm);
}
