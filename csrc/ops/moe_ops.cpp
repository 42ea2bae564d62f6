// Host wrappers for the MoE kernels: router, MXFP4 grouped GEMMs (mlp1 + SwiGLU, mlp2), combine.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/moe.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {
namespace {

void check_int_tensor(const char* op, const char* name, const at::Tensor& t, int64_t numel, const at::Tensor& ref) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kInt);
  check_contiguous(op, name, t);
  TORCH_CHECK(t.numel() == numel, "gptoss_ext.", op, ": '", name, "' must have ", numel, " elements, got shape ",
              shape_str(t));
}

// codes [E, R/16, K/64, 32, 16], scales [E, R/16, K/64, 8, 4] (uint8); returns (E, R, K). cn / sn:
// the arguments' names in messages.
std::tuple<int64_t, int64_t, int64_t> check_weights(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                                                    const at::Tensor& ref, const char* cn = "codes",
                                                    const char* sn = "scales") {
  check_cuda(op, cn, codes);
  check_same_device(op, cn, codes, ref);
  check_dtype(op, cn, codes, at::kByte);
  check_contiguous(op, cn, codes);
  TORCH_CHECK(codes.dim() == 5 && codes.size(3) == 32 && codes.size(4) == 16, "gptoss_ext.", op, ": '", cn,
              "' must be in the kernel layout [E, R/16, K/64, 32, 16] (gptoss_ext.mxfp4), got ", shape_str(codes));
  check_cuda(op, sn, scales);
  check_same_device(op, sn, scales, ref);
  check_dtype(op, sn, scales, at::kByte);
  check_contiguous(op, sn, scales);
  TORCH_CHECK(scales.dim() == 5 && scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1) &&
                  scales.size(2) == codes.size(2) && scales.size(3) == 8 && scales.size(4) == 4,
              "gptoss_ext.", op, ": '", sn, "' must be [E, R/16, K/64, 8, 4] matching '", cn, "' ", shape_str(codes),
              ", got ", shape_str(scales));
  TORCH_CHECK(codes.size(0) <= 256, "gptoss_ext.", op, ": at most 256 experts, got ", codes.size(0));
  return {codes.size(0), codes.size(1) * 16, codes.size(2) * 64};
}

void check_routing(const char* op, const at::Tensor& perm, const at::Tensor& offsets, int64_t P, int64_t E,
                   const at::Tensor& ref) {
  check_int_tensor(op, "perm", perm, P, ref);
  check_int_tensor(op, "offsets", offsets, E + 1, ref);
}

// The router's k, E and output tensors (ids/weights [T, k], counts [E], offsets [E + 1], perm
// [T * k], an int32 scratch of at least `need` elements), on ref's device.
void check_route_args(const char* op, const at::Tensor& ref, int64_t T, int64_t E, int64_t k, const at::Tensor& ids,
                      const at::Tensor& weights, const at::Tensor& counts, const at::Tensor& offsets,
                      const at::Tensor& perm, const at::Tensor& scratch, int64_t need) {
  TORCH_CHECK(E >= 1 && E <= kRouterMaxExperts, "gptoss_ext.", op, ": number of experts must be in [1, ",
              kRouterMaxExperts, "], got ", E);
  TORCH_CHECK(k >= 1 && k <= kRouterMaxTopK && k <= E, "gptoss_ext.", op, ": k must be in [1, min(",
              kRouterMaxTopK, ", E)], got ", k);
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
                      GateNormArgs* norm) {
  check_gemv_args(op, x, weight);
  const int64_t T = x.size(0), K = x.size(1), E = weight.size(0);
  const int64_t max_t = norm ? kGateNormMaxTokens : kGateRouterMaxTokens;
  TORCH_CHECK(T >= 1 && T <= max_t, "gptoss_ext.", op, ": takes 1 to ", max_t, " tokens, got ", T);
  TORCH_CHECK(K % 8 == 0 && K <= 3072, "gptoss_ext.", op, ": hidden size must be a multiple of 8 and <= 3072, got ", K);
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, E, "experts");
    b = reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr());
  }
  check_route_args(op, x, T, E, k, ids, weights, counts, offsets, perm, scratch,
                   moe_gate_router_scratch_size(T, static_cast<int>(E)));
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto err = launch_moe_gate_router(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0),
                                    reinterpret_cast<const __nv_bfloat16*>(weight.data_ptr()), b, T,
                                    static_cast<int>(K), static_cast<int>(E), static_cast<int>(k),
                                    ids.data_ptr<int32_t>(), weights.data_ptr<float>(), counts.data_ptr<int32_t>(),
                                    offsets.data_ptr<int32_t>(), perm.data_ptr<int32_t>(), scratch.data_ptr<int32_t>(),
                                    c10::cuda::getCurrentCUDAStream(), norm);
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace

void moe_gate_router(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
                     at::Tensor& ids, at::Tensor& weights, at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm,
                     at::Tensor& scratch) {
  gate_router_impl("moe_gate_router", x, weight, bias, k, ids, weights, counts, offsets, perm, scratch, nullptr);
}

void moe_add_norm_gate_router(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_scale,
                              double eps, at::Tensor& out, at::Tensor& residual_out, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t k, at::Tensor& ids, at::Tensor& weights,
                              at::Tensor& counts, at::Tensor& offsets, at::Tensor& perm, at::Tensor& scratch) {
  const char* op = "moe_add_norm_gate_router";
  check_bf16_tensor(op, "x", x, 2, x);  // contiguous rows
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"residual", &residual}, {"out", &out},
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
  norm.residual = reinterpret_cast<const __nv_bfloat16*>(residual.data_ptr());
  norm.scale = reinterpret_cast<const __nv_bfloat16*>(norm_scale.data_ptr());
  norm.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  norm.residual_out = reinterpret_cast<__nv_bfloat16*>(residual_out.data_ptr());
  norm.eps = static_cast<float>(eps);
  gate_router_impl(op, x, weight, bias, k, ids, weights, counts, offsets, perm, scratch, &norm);
}

namespace {

MoeGemmArgs mlp1_args(const char* op, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& bias, const at::Tensor& perm, const at::Tensor& offsets, int64_t top_k,
                      double alpha, double limit, at::Tensor& out, int64_t max_scale, const char* out_name = "out",
                      const char* cn = "codes", const char* sn = "scales", const char* bn = "bias") {
  check_bf16_tensor(op, "x", x, 2, x);
  auto [E, R, K] = check_weights(op, codes, scales, x, cn, sn);
  check_size(op, "x", x, 1, K, "columns of the weights");
  TORCH_CHECK(top_k >= 1, "gptoss_ext.", op, ": top_k must be >= 1, got ", top_k);
  const int64_t P = x.size(0) * top_k;
  check_bf16_tensor(op, bn, bias, 2, x);
  check_size(op, bn, bias, 0, E, "experts");
  check_size(op, bn, bias, 1, R, "rows of the weights");
  check_routing(op, perm, offsets, P, E, x);
  check_bf16_tensor(op, out_name, out, 2, x);
  check_size(op, out_name, out, 0, P, "tokens x top_k");
  check_size(op, out_name, out, 1, R / 2, "rows / 2 (SwiGLU)");
  MoeGemmArgs a{};
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<uint8_t>();
  a.bias = reinterpret_cast<const __nv_bfloat16*>(bias.data_ptr());
  a.perm = perm.data_ptr<int32_t>();
  a.offsets = offsets.data_ptr<int32_t>();
  a.out_h = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  a.P = P;
  a.top_k = static_cast<int>(top_k);
  a.E = static_cast<int>(E);
  a.R = static_cast<int>(R);
  a.K = static_cast<int>(K);
  a.swiglu_alpha = static_cast<float>(alpha);
  a.swiglu_limit = static_cast<float>(limit);
  a.max_scale = static_cast<int>(std::clamp<int64_t>(max_scale, 0, 255));
  return a;
}

MoeGemmArgs mlp2_args(const char* op, const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales,
                      const at::Tensor& bias, const at::Tensor& perm, const at::Tensor& offsets,
                      const at::Tensor& route_weights, at::Tensor& out, int64_t max_scale, bool routing_ready,
                      const char* out_name = "out", const char* cn = "codes", const char* sn = "scales",
                      const char* bn = "bias") {
  check_bf16_tensor(op, "h", h, 2, h);
  auto [E, R, K] = check_weights(op, codes, scales, h, cn, sn);
  check_size(op, "h", h, 1, K, "columns of the weights");
  const int64_t P = h.size(0);
  check_bf16_tensor(op, bn, bias, 2, h);
  check_size(op, bn, bias, 0, E, "experts");
  check_size(op, bn, bias, 1, R, "rows of the weights");
  check_routing(op, perm, offsets, P, E, h);
  check_cuda(op, "route_weights", route_weights);
  check_dtype(op, "route_weights", route_weights, at::kFloat);
  check_contiguous(op, "route_weights", route_weights);
  TORCH_CHECK(route_weights.numel() == P, "gptoss_ext.", op, ": 'route_weights' must have ", P, " elements, got ",
              shape_str(route_weights));
  check_cuda(op, out_name, out);
  check_dtype(op, out_name, out, at::kFloat);
  check_contiguous(op, out_name, out);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == P && out.size(1) == R, "gptoss_ext.", op, ": '", out_name,
              "' must be [", P, ", ", R, "] float32, got ", shape_str(out));
  MoeGemmArgs a{};
  a.x = reinterpret_cast<const __nv_bfloat16*>(h.data_ptr());
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<uint8_t>();
  a.bias = reinterpret_cast<const __nv_bfloat16*>(bias.data_ptr());
  a.perm = perm.data_ptr<int32_t>();
  a.offsets = offsets.data_ptr<int32_t>();
  a.route_weights = route_weights.data_ptr<float>();
  a.out_y = out.data_ptr<float>();
  a.P = P;
  a.top_k = 1;
  a.E = static_cast<int>(E);
  a.R = static_cast<int>(R);
  a.K = static_cast<int>(K);
  a.max_scale = static_cast<int>(std::clamp<int64_t>(max_scale, 0, 255));
  a.routing_ready = routing_ready;
  return a;
}

}  // namespace

void moe_mlp1(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, int64_t top_k, double alpha, double limit,
              at::Tensor& out, int64_t max_scale) {
  const char* op = "moe_mlp1";
  const MoeGemmArgs a = mlp1_args(op, x, codes, scales, bias, perm, offsets, top_k, alpha, limit, out, max_scale);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(op, launch_moe_mlp1(a, c10::cuda::getCurrentCUDAStream()));
}

void moe_mlp2(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& route_weights, at::Tensor& out,
              int64_t max_scale, bool routing_ready) {
  const char* op = "moe_mlp2";
  const MoeGemmArgs a = mlp2_args(op, h, codes, scales, bias, perm, offsets, route_weights, out, max_scale,
                                  routing_ready);
  const c10::cuda::OptionalCUDAGuard guard(h.device());
  GPTOSS_CHECK_LAUNCH(op, launch_moe_mlp2(a, c10::cuda::getCurrentCUDAStream()));
}

void moe_experts(const at::Tensor& x, const at::Tensor& codes1, const at::Tensor& scales1, const at::Tensor& bias1,
                 const at::Tensor& codes2, const at::Tensor& scales2, const at::Tensor& bias2, const at::Tensor& perm,
                 const at::Tensor& offsets, const at::Tensor& route_weights, int64_t top_k, double alpha,
                 double limit, at::Tensor& h, at::Tensor& y, int64_t max_scale1, int64_t max_scale2) {
  const char* op = "moe_experts";
  const MoeGemmArgs a1 = mlp1_args(op, x, codes1, scales1, bias1, perm, offsets, top_k, alpha, limit, h, max_scale1, "h",
                                   "codes1", "scales1", "bias1");
  const MoeGemmArgs a2 = mlp2_args(op, h, codes2, scales2, bias2, perm, offsets, route_weights, y, max_scale2, true,
                                   "y", "codes2", "scales2", "bias2");
  TORCH_CHECK(a2.E == a1.E, "gptoss_ext.", op, ": mlp1 has ", a1.E, " experts, mlp2 ", a2.E);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(op, launch_moe_experts(a1, a2, c10::cuda::getCurrentCUDAStream()));
}

void moe_combine(const at::Tensor& y, const std::optional<at::Tensor>& residual, int64_t top_k, at::Tensor& out) {
  const char* op = "moe_combine";
  check_cuda(op, "y", y);
  check_dtype(op, "y", y, at::kFloat);
  check_contiguous(op, "y", y);
  check_dim(op, "y", y, 2);
  check_bf16_tensor(op, "out", out, 2, y);
  const int64_t T = out.size(0), H = out.size(1);
  TORCH_CHECK(top_k >= 1 && y.size(0) == T * top_k && y.size(1) == H, "gptoss_ext.", op, ": 'y' must be [", T * top_k,
              ", ", H, "] for out ", shape_str(out), " and top_k ", top_k, ", got ", shape_str(y));
  TORCH_CHECK(H % 4 == 0, "gptoss_ext.", op, ": hidden size must be a multiple of 4, got ", H);
  if (residual) {
    check_bf16_tensor(op, "residual", *residual, 2, y);
    TORCH_CHECK(residual->sizes() == out.sizes(), "gptoss_ext.", op, ": 'residual' has shape ", shape_str(*residual),
                ", 'out' has shape ", shape_str(out));
  }
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  auto err = launch_moe_combine(y.data_ptr<float>(),
                                residual ? reinterpret_cast<const __nv_bfloat16*>(residual->data_ptr()) : nullptr,
                                reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), T, static_cast<int>(top_k),
                                static_cast<int>(H), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace gptoss
