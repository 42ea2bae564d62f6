// Host wrappers for the MoE router: top-k + grouping, alone or fused with the gate linear (and the
// residual add + RMSNorm before it).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/moe_router.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {
namespace {

// The router's k, E and output tensors (ids/weights [T, k], counts [E], offsets [E + 1], perm
// [T * k], an int32 scratch of at least `need` elements), on ref's device.
void check_route_args(const char* op, const at::Tensor& ref, int64_t T, int64_t E, int64_t k, const at::Tensor& ids,
                      const at::Tensor& weights, const at::Tensor& counts, const at::Tensor& offsets,
                      const at::Tensor& perm, const at::Tensor& scratch, int64_t need) {
  TORCH_CHECK(E >= 1 && E <= kRouterMaxExperts, "gptoss_ext.", op, ": number of experts must be in [1, ",
              kRouterMaxExperts, "], got ", E);
  TORCH_CHECK(k >= 1 && k <= kRouterMaxTopK && k <= E, "gptoss_ext.", op, ": k must be in [1, min(", kRouterMaxTopK,
              ", E)], got ", k);
  check_int_tensor(op, "ids", ids, T * k, ref);
  check_cuda(op, "weights", weights);
  check_dtype(op, "weights", weights, at::kFloat);
  check_contiguous(op, "weights", weights);
  TORCH_CHECK(weights.numel() == T * k, "gptoss_ext.", op, ": 'weights' must have ", T * k, " elements");
  check_int_tensor(op, "counts", counts, E, ref);
  check_int_tensor(op, "offsets", offsets, E + 1, ref);
  check_int_tensor(op, "perm", perm, T * k, ref);
  check_cuda(op, "scratch", scratch);
  check_same_device(op, "scratch", scratch, ref);
  check_dtype(op, "scratch", scratch, at::kInt);
  check_contiguous(op, "scratch", scratch);
  TORCH_CHECK(scratch.numel() >= need, "gptoss_ext.", op, ": 'scratch' needs ", need, " int32 elements for ", T,
              " tokens and ", E, " experts, got ", scratch.numel());
}

}  // namespace

void moe_router(const at::Tensor& logits, int64_t k, at::Tensor& ids, at::Tensor& weights, at::Tensor& counts,
                at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch) {
  const char* op = "moe_router";
  check_cuda(op, "logits", logits);
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kFloat, "gptoss_ext.", op,
              ": 'logits' must be bfloat16 or float32, got ", logits.scalar_type());
  check_dim(op, "logits", logits, 2);
  check_contiguous(op, "logits", logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_route_args(op, logits, T, E, k, ids, weights, counts, offsets, perm, scratch,
                   moe_router_scratch_size(T, static_cast<int>(E)));
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  auto err = launch_moe_router(logits.data_ptr(), logits.scalar_type() == at::kBFloat16, T, static_cast<int>(E),
                               static_cast<int>(k), ids.data_ptr<int32_t>(), weights.data_ptr<float>(),
                               counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), perm.data_ptr<int32_t>(),
                               scratch.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

namespace {

void gate_router_impl(const char* op, const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, int64_t k, at::Tensor& ids, at::Tensor& weights,
                      at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch,
                      GateNormArgs* norm, int64_t form) {
  check_gemv_args(op, x, weight);
  const int64_t T = x.size(0), K = x.size(1), E = weight.size(0);
  const int64_t max_t = norm ? kGateNormMaxTokens : kGateRouterMaxTokens;
  TORCH_CHECK(T >= 1 && T <= max_t, "gptoss_ext.", op, ": takes 1 to ", max_t, " tokens, got ", T);
  TORCH_CHECK(K % 8 == 0 && K <= kGateMaxHidden, "gptoss_ext.", op,
              ": hidden size must be a multiple of 8 and <= ", kGateMaxHidden, ", got ", K);
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, E, "experts");
    b = bf16_ptr(*bias);
  }
  check_route_args(op, x, T, E, k, ids, weights, counts, offsets, perm, scratch,
                   moe_gate_router_scratch_size(T, static_cast<int>(E)));
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  TORCH_CHECK(form >= -1 && form <= 1, "gptoss_ext.", op,
              ": form must be -1 (the plan), 0 (ticket) or 1 (cluster), got ", form);
  const GateForm f = form < 0 ? moe_gate_router_plan(T, static_cast<int>(E)) : static_cast<GateForm>(form);
  const char* why = moe_gate_router_unsupported(f, T, static_cast<int>(E));
  TORCH_CHECK(why == nullptr, "gptoss_ext.", op, ": form ", form, " cannot serve ", T, " tokens and ", E,
              " experts: ", why);
  auto err = launch_moe_gate_router(
      bf16_ptr(x), x.stride(0), bf16_ptr(weight), b, T, static_cast<int>(K), static_cast<int>(E), static_cast<int>(k),
      ids.data_ptr<int32_t>(), weights.data_ptr<float>(), counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
      perm.data_ptr<int32_t>(), scratch.data_ptr<int32_t>(), f, c10::cuda::getCurrentCUDAStream(), norm);
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace

void moe_gate_router(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
                     at::Tensor& ids, at::Tensor& weights, at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm,
                     at::Tensor& scratch, int64_t form) {
  gate_router_impl("moe_gate_router", x, weight, bias, k, ids, weights, counts, offsets, perm, scratch, nullptr, form);
}

void moe_add_norm_gate_router(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_scale, double eps,
                              at::Tensor& out, at::Tensor& residual_out, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t k, at::Tensor& ids, at::Tensor& weights,
                              at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch,
                              int64_t form) {
  const char* op = "moe_add_norm_gate_router";
  check_bf16_tensor(op, "x", x, 2, x);  // contiguous rows
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"residual", &residual},
                         {"out", &out},
                         {"residual_out", &residual_out}}) {
    check_bf16_tensor(op, name, *t, 2, x);
    check_aligned16(op, name, *t);
    TORCH_CHECK(t->sizes() == x.sizes(), "gptoss_ext.", op, ": '", name, "' has shape ", shape_str(*t),
                ", 'x' has shape ", shape_str(x), "; they must match");
  }
  check_bf16_tensor(op, "norm_scale", norm_scale, 1, x);
  check_aligned16(op, "norm_scale", norm_scale);
  check_size(op, "norm_scale", norm_scale, 0, x.size(1), "hidden size");
  TORCH_CHECK(eps >= 0, "gptoss_ext.", op, ": eps must be >= 0, got ", eps);
  GateNormArgs norm{};
  norm.residual = bf16_ptr(residual);
  norm.scale = bf16_ptr(norm_scale);
  norm.out = bf16_ptr(out);
  norm.residual_out = bf16_ptr(residual_out);
  norm.eps = static_cast<float>(eps);
  gate_router_impl(op, x, weight, bias, k, ids, weights, counts, offsets, perm, scratch, &norm, form);
}

}  // namespace gptoss
