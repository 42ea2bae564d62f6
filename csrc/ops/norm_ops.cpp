// Host wrappers for the fused residual add + RMSNorm kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/rmsnorm.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {
namespace {

void check_common(const char* op, const at::Tensor& ref, const at::Tensor& scale, double eps) {
  check_dim(op, "scale", scale, 1);
  check_cuda(op, "scale", scale);
  check_same_device(op, "scale", scale, ref);
  check_dtype(op, "scale", scale, at::kBFloat16);
  check_contiguous(op, "scale", scale);
  const int64_t H = ref.size(1);
  check_size(op, "scale", scale, 0, H, "hidden size");
  TORCH_CHECK(H % 8 == 0 && H <= kRmsNormMaxHidden, "gptoss_ext.", op, ": hidden size must be a multiple of 8 and <= ",
              kRmsNormMaxHidden, ", got ", H);
  TORCH_CHECK(eps >= 0, "gptoss_ext.", op, ": eps must be >= 0, got ", eps);
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "gptoss_ext.", op, ": '", name, "' has shape ", shape_str(t), ", '", ref_name,
              "' has shape ", shape_str(ref), "; they must match");
}

}  // namespace

void rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps, at::Tensor& out) {
  const char* op = "rms_norm";
  check_bf16_tensor(op, "x", x, 2, x);
  check_bf16_tensor(op, "out", out, 2, x);
  check_same_shape(op, "out", out, x, "x");
  check_common(op, x, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto err = launch_add_rms_norm(nullptr, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                 reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), nullptr, x.size(0), x.size(1),
                                 static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

void add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps,
                  at::Tensor& out, at::Tensor& residual_out) {
  const char* op = "add_rms_norm";
  check_bf16_tensor(op, "residual", residual, 2, residual);
  check_bf16_tensor(op, "x", x, 2, residual);
  check_bf16_tensor(op, "out", out, 2, residual);
  check_bf16_tensor(op, "residual_out", residual_out, 2, residual);
  check_same_shape(op, "x", x, residual, "residual");
  check_same_shape(op, "out", out, residual, "residual");
  check_same_shape(op, "residual_out", residual_out, residual, "residual");
  check_common(op, residual, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(residual.device());
  auto err = launch_add_rms_norm(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
                                 reinterpret_cast<const __nv_bfloat16*>(residual.data_ptr()),
                                 reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                 reinterpret_cast<__nv_bfloat16*>(residual_out.data_ptr()), residual.size(0),
                                 residual.size(1), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

void moe_combine_add_rms_norm(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& scale, double eps,
                              at::Tensor& out, at::Tensor& residual_out) {
  const char* op = "moe_combine_add_rms_norm";
  check_bf16_tensor(op, "residual", residual, 2, residual);
  check_cuda(op, "y", y);
  check_same_device(op, "y", y, residual);
  check_dtype(op, "y", y, at::kFloat);
  check_dim(op, "y", y, 3);
  check_contiguous(op, "y", y);
  check_aligned16(op, "y", y);
  TORCH_CHECK(y.size(0) == residual.size(0) && y.size(2) == residual.size(1) && y.size(1) >= 1 && y.size(1) <= 64,
              "gptoss_ext.", op, ": 'y' must be [T, k, H] with [T, H] = ", shape_str(residual), " and 1 <= k <= 64, got ",
              shape_str(y));
  check_bf16_tensor(op, "out", out, 2, residual);
  check_bf16_tensor(op, "residual_out", residual_out, 2, residual);
  check_same_shape(op, "out", out, residual, "residual");
  check_same_shape(op, "residual_out", residual_out, residual, "residual");
  check_common(op, residual, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(residual.device());
  auto err = launch_add_rms_norm(nullptr, reinterpret_cast<const __nv_bfloat16*>(residual.data_ptr()),
                                 reinterpret_cast<const __nv_bfloat16*>(scale.data_ptr()),
                                 reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
                                 reinterpret_cast<__nv_bfloat16*>(residual_out.data_ptr()), residual.size(0),
                                 residual.size(1), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream(),
                                 y.data_ptr<float>(), static_cast<int>(y.size(1)));
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace gptoss
