// Host wrappers for the MXFP4 expert GEMMs (mlp1 + SwiGLU, mlp2 + routing weight) and their plan.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "kernels/moe_experts.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {
namespace {

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
  TORCH_CHECK(codes.size(0) <= kMoeMaxExperts, "gptoss_ext.", op, ": at most ", kMoeMaxExperts, " experts, got ",
              codes.size(0));
  return {codes.size(0), codes.size(1) * 16, codes.size(2) * 64};
}

void check_routing(const char* op, const at::Tensor& perm, const at::Tensor& offsets, int64_t P, int64_t E,
                   const at::Tensor& ref) {
  check_int_tensor(op, "perm", perm, P, ref);
  check_int_tensor(op, "offsets", offsets, E + 1, ref);
}

// The fields every GEMM shares: activations, weights, bias, routing, sizes, the weights' max scale.
MoeGemmArgs gemm_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
                      const at::Tensor& perm, const at::Tensor& offsets, int64_t P, int64_t E, int64_t R, int64_t K,
                      int64_t max_scale) {
  MoeGemmArgs a{};
  a.x = bf16_ptr(x);
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<uint8_t>();
  a.bias = bf16_ptr(bias);
  a.perm = perm.data_ptr<int32_t>();
  a.offsets = offsets.data_ptr<int32_t>();
  a.P = P;
  a.E = static_cast<int>(E);
  a.R = static_cast<int>(R);
  a.K = static_cast<int>(K);
  a.max_scale = static_cast<int>(std::clamp<int64_t>(max_scale, 0, 255));
  return a;
}

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
  MoeGemmArgs a = gemm_args(x, codes, scales, bias, perm, offsets, P, E, R, K, max_scale);
  a.out_h = bf16_ptr(out);
  a.top_k = static_cast<int>(top_k);
  a.swiglu_alpha = static_cast<float>(alpha);
  a.swiglu_limit = static_cast<float>(limit);
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
  TORCH_CHECK(out.dim() == 2 && out.size(0) == P && out.size(1) == R, "gptoss_ext.", op, ": '", out_name, "' must be [",
              P, ", ", R, "] float32, got ", shape_str(out));
  MoeGemmArgs a = gemm_args(h, codes, scales, bias, perm, offsets, P, E, R, K, max_scale);
  a.route_weights = route_weights.data_ptr<float>();
  a.out_y = out.data_ptr<float>();
  a.top_k = 1;
  a.routing_ready = routing_ready;
  return a;
}

// The kernel of a GEMM: the plan's (kernel < 0) or the caller's, which must serve it.
MoeKernel pick_kernel(const char* op, const char* which, const MoeGemmArgs& a, int64_t kernel) {
  const MoeDevice d = moe_current_device();
  if (kernel < 0) return moe_plan(a, d);
  TORCH_CHECK(kernel < static_cast<int64_t>(MoeKernel::kCount), "gptoss_ext.", op, ": kernel ", kernel,
              " is not one of moe_kernel_names() (0 .. ", static_cast<int>(MoeKernel::kCount) - 1, ")");
  const MoeKernel k = static_cast<MoeKernel>(kernel);
  const char* why = moe_kernel_unsupported(k, a, d);
  TORCH_CHECK(why == nullptr, "gptoss_ext.", op, ": kernel '", moe_kernel_name(k), "' cannot serve ", which, " (", a.P,
              " pairs, ", a.E, " experts, ", a.R, " x ", a.K, "): ", why);
  return k;
}

}  // namespace

void moe_mlp1(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, int64_t top_k, double alpha, double limit,
              at::Tensor& out, int64_t max_scale, int64_t kernel) {
  const char* op = "moe_mlp1";
  const MoeGemmArgs a = mlp1_args(op, x, codes, scales, bias, perm, offsets, top_k, alpha, limit, out, max_scale);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const MoeKernel k = pick_kernel(op, "mlp1", a, kernel);
  GPTOSS_CHECK_LAUNCH(op, launch_moe_mlp1(a, k, c10::cuda::getCurrentCUDAStream()));
}

void moe_mlp2(const at::Tensor& h, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& bias,
              const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& route_weights, at::Tensor& out,
              int64_t max_scale, bool routing_ready, int64_t kernel) {
  const char* op = "moe_mlp2";
  const MoeGemmArgs a =
      mlp2_args(op, h, codes, scales, bias, perm, offsets, route_weights, out, max_scale, routing_ready);
  const c10::cuda::OptionalCUDAGuard guard(h.device());
  const MoeKernel k = pick_kernel(op, "mlp2", a, kernel);
  GPTOSS_CHECK_LAUNCH(op, launch_moe_mlp2(a, k, c10::cuda::getCurrentCUDAStream()));
}

void moe_experts(const at::Tensor& x, const at::Tensor& codes1, const at::Tensor& scales1, const at::Tensor& bias1,
                 const at::Tensor& codes2, const at::Tensor& scales2, const at::Tensor& bias2, const at::Tensor& perm,
                 const at::Tensor& offsets, const at::Tensor& route_weights, int64_t top_k, double alpha, double limit,
                 at::Tensor& h, at::Tensor& y, int64_t max_scale1, int64_t max_scale2, int64_t kernel) {
  const char* op = "moe_experts";
  const MoeGemmArgs a1 = mlp1_args(op, x, codes1, scales1, bias1, perm, offsets, top_k, alpha, limit, h, max_scale1,
                                   "h", "codes1", "scales1", "bias1");
  const MoeGemmArgs a2 = mlp2_args(op, h, codes2, scales2, bias2, perm, offsets, route_weights, y, max_scale2, true,
                                   "y", "codes2", "scales2", "bias2");
  TORCH_CHECK(a2.E == a1.E, "gptoss_ext.", op, ": mlp1 has ", a1.E, " experts, mlp2 ", a2.E);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const MoeKernel k1 = pick_kernel(op, "mlp1", a1, kernel), k2 = pick_kernel(op, "mlp2", a2, kernel);
  // mlp2 is routing_ready: its first weight loads overlap mlp1's tail
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t e1 = launch_moe_mlp1(a1, k1, stream);
  GPTOSS_CHECK_LAUNCH(op, e1 != cudaSuccess ? e1 : launch_moe_mlp2(a2, k2, stream));
}

int64_t moe_experts_plan(int64_t pairs, int64_t experts, int64_t rows, int64_t cols, int64_t max_scale,
                         int64_t device) {
  const char* op = "moe_experts_plan";
  TORCH_CHECK(pairs >= 0 && experts >= 1 && experts <= kMoeMaxExperts && rows > 0 && cols > 0, "gptoss_ext.", op,
              ": need pairs >= 0, 1 <= experts <= ", kMoeMaxExperts, ", rows and cols > 0; got ", pairs, ", ", experts,
              ", ", rows, ", ", cols);
  const c10::cuda::OptionalCUDAGuard guard(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
  MoeGemmArgs a{};
  a.P = pairs;
  a.E = static_cast<int>(experts);
  a.R = static_cast<int>(rows);
  a.K = static_cast<int>(cols);
  a.top_k = 1;
  a.max_scale = static_cast<int>(std::clamp<int64_t>(max_scale, 0, 255));
  return static_cast<int64_t>(moe_plan(a, moe_current_device()));
}

std::vector<std::string> moe_kernel_names() {
  std::vector<std::string> names;
  for (int k = 0; k < static_cast<int>(MoeKernel::kCount); ++k)
    names.emplace_back(moe_kernel_name(static_cast<MoeKernel>(k)));
  return names;
}

}  // namespace gptoss
