// Host wrappers for the fused residual add + RMSNorm kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/rms_norm.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps, at::Tensor& out) {
  const char* op = "rms_norm";
  check_bf16_tensor(op, "x", x, 2, x);
  check_bf16_tensor(op, "out", out, 2, x);
  check_same_shape(op, "out", out, x, "x");
  check_rms_norm_args(op, x, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto err = launch_add_rms_norm(nullptr, bf16_ptr(x), bf16_ptr(scale), bf16_ptr(out), nullptr, x.size(0), x.size(1),
                                 static_cast<float>(eps), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

void add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps, at::Tensor& out,
                  at::Tensor& residual_out) {
  const char* op = "add_rms_norm";
  check_bf16_tensor(op, "residual", residual, 2, residual);
  check_bf16_tensor(op, "x", x, 2, residual);
  check_bf16_tensor(op, "out", out, 2, residual);
  check_bf16_tensor(op, "residual_out", residual_out, 2, residual);
  check_same_shape(op, "x", x, residual, "residual");
  check_same_shape(op, "out", out, residual, "residual");
  check_same_shape(op, "residual_out", residual_out, residual, "residual");
  check_rms_norm_args(op, residual, scale, eps);
  const c10::cuda::OptionalCUDAGuard guard(residual.device());
  auto err = launch_add_rms_norm(bf16_ptr(x), bf16_ptr(residual), bf16_ptr(scale), bf16_ptr(out),
                                 bf16_ptr(residual_out), residual.size(0), residual.size(1), static_cast<float>(eps),
                                 c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace gptoss
