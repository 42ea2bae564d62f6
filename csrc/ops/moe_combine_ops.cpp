// Host wrappers for the MoE combine: alone, or fused into the next residual add + RMSNorm.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/moe_combine.h"
#include "kernels/rms_norm.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

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
  auto err = launch_moe_combine(y.data_ptr<float>(), residual ? bf16_ptr(*residual) : nullptr, bf16_ptr(out), T,
                                static_cast<int>(top_k), static_cast<int>(H), c10::cuda::getCurrentCUDAStream());
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
              "gptoss_ext.", op, ": 'y' must be [T, k, H] with [T, H] = ", shape_str(residual),
              " and 1 <= k <= 64, got ", shape_str(y));
  check_bf16_tensor(op, "out", out, 2, residual);
  check_bf16_tensor(op, "residual_out", residual_out, 2, residual);
  check_same_shape(op, "out", out, residual, "residual");
  check_same_shape(op, "residual_out", residual_out, residual, "residual");
  check_rms_norm_args(op, residual, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(residual.device());
  // the norm kernel with the k rows of y summed in place of x (rms_norm.h)
  auto err = launch_add_rms_norm(nullptr, bf16_ptr(residual), bf16_ptr(scale), bf16_ptr(out), bf16_ptr(residual_out),
                                 residual.size(0), residual.size(1), static_cast<float>(eps),
                                 c10::cuda::getCurrentCUDAStream(), y.data_ptr<float>(), static_cast<int>(y.size(1)));
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace gptoss
