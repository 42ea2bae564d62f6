// Host wrapper for the skinny (decode) bf16 linear.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/linear.h"
#include "kernels/pdl.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void linear_skinny(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& out, bool weight_constant) {
  const char* op = "linear_skinny";
  check_gemv_args(op, x, weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_skinny_rows(op, x, kSkinnyMaxM);
  TORCH_CHECK(N <= INT32_MAX && K <= INT32_MAX, "gptoss_ext.", op, ": weight too large");
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, N, "rows of weight");
    b = reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr());
  }
  check_cuda(op, "out", out);
  check_same_device(op, "out", out, x);
  check_dtype(op, "out", out, at::kBFloat16);
  check_dim(op, "out", out, 2);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N && out.stride(1) == 1, "gptoss_ext.", op, ": 'out' must be [", M,
              ", ", N, "] with contiguous rows, got ", shape_str(out));
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(op, launch_linear_skinny(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), x.stride(0),
                                               reinterpret_cast<const __nv_bfloat16*>(weight.data_ptr()), b,
                                               reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), out.stride(0),
                                               static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                               weight_constant, c10::cuda::getCurrentCUDAStream()));
}

bool set_pdl_enabled(bool enabled) { return set_pdl(enabled); }

}  // namespace gptoss
