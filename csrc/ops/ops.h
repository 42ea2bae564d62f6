// Host wrappers: check arguments, guard the device, launch on the current stream.
#pragma once
#include <ATen/core/Dict.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace gptoss {

void rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps, at::Tensor& out);
void add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps,
                  at::Tensor& out, at::Tensor& residual_out);
void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
           double concentration);

void moe_router(const at::Tensor& logits, int64_t k, at::Tensor& ids, at::Tensor& weights, at::Tensor& counts,
                at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch);
// form: -1 the plan's, 0 the ticket form, 1 the cluster form (GateForm, kernels/moe_router.h)
void moe_gate_router(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
                     at::Tensor& ids, at::Tensor& weights, at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm,
                     at::Tensor& scratch, int64_t form);
// moe_gate_router on out = rms_norm(residual + x) * norm_scale (1 or 2 tokens), which it also
// writes with residual_out = residual + x: the add_rms_norm before the MoE in the same launch
void moe_add_norm_gate_router(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_scale,
                              double eps, at::Tensor& out, at::Tensor& residual_out, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t k, at::Tensor& ids, at::Tensor& weights,
                              at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch,
                              int64_t form);
// kernel: -1 the plan's (moe_experts_plan), else a MoeKernel (kernels/moe_experts.h) that must serve the call
void moe_mlp1(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, int64_t top_k, double alpha, double limit,
              at::Tensor& out, int64_t max_scale, int64_t kernel);
void moe_mlp2(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& route_weights, at::Tensor& out,
              int64_t max_scale, bool routing_ready, int64_t kernel);
void moe_experts(const at::Tensor& x, const at::Tensor& codes1, const at::Tensor& scales1, const at::Tensor& bias1,
                 const at::Tensor& codes2, const at::Tensor& scales2, const at::Tensor& bias2, const at::Tensor& perm,
                 const at::Tensor& offsets, const at::Tensor& route_weights, int64_t top_k, double alpha,
                 double limit, at::Tensor& h, at::Tensor& y, int64_t max_scale1, int64_t max_scale2, int64_t kernel);
int64_t moe_experts_plan(int64_t pairs, int64_t experts, int64_t rows, int64_t cols, int64_t max_scale, int64_t device);
std::vector<std::string> moe_kernel_names();

void moe_combine(const at::Tensor& y, const std::optional<at::Tensor>& residual, int64_t top_k, at::Tensor& out);
// out, residual_out = rms_norm(residual + sum_j y[:, j]) * scale, residual + sum_j y[:, j] (y fp32 [T, k, H])
void moe_combine_add_rms_norm(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& scale, double eps,
                              at::Tensor& out, at::Tensor& residual_out);

void attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& sinks, const at::Tensor& cu_seqlens, const at::Tensor& start,
                  int64_t max_q_len, int64_t window, double sm_scale, at::Tensor& out,
                  const std::optional<at::Tensor>& block_table, int64_t block_size);
std::vector<int64_t> attention_decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t max_len, int64_t window,
                                           int64_t device);
void attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const std::optional<at::Tensor>& sinks, const at::Tensor& seq_lens, int64_t window, double sm_scale,
                 int64_t chunk, int64_t warps, at::Tensor& ws_o, at::Tensor& ws_ml, at::Tensor& tickets,
                 at::Tensor& out, bool kv_ready, const std::optional<at::Tensor>& block_table, int64_t block_size);
// the decode qkv projection (linear_skinny) with RoPE on its q / k heads and the k / v rows written to
// the KV cache (rope_kv_) in its epilogue: one launch; out [M, (Hq + 2 Hkv) x 64] as rope_kv_ leaves it
void linear_rope_kv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq, double concentration,
                    const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, bool weight_constant);
// decode bookkeeping: seq_lens += active; positions = seq_lens - 1; slots = active ? row0 + positions : -1
void kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& k_cache,
              at::Tensor& v_cache);
void rope_kv_(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
              const at::Tensor& inv_freq, double concentration, const at::Tensor& slots, at::Tensor& k_cache,
              at::Tensor& v_cache);

void linear_skinny(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& out, bool weight_constant);
// Programmatic dependent launch on/off for this process (kernels/pdl.h); returns the previous state.
bool set_pdl_enabled(bool enabled);
// The kernels' limits by name (head_dim, experts, top-k, widths, ...): the one definition Python reads.
c10::Dict<std::string, int64_t> limits();

}  // namespace gptoss
