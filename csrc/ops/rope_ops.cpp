// Host wrapper for the in-place YaRN RoPE kernel.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/rope.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     const at::Tensor& inv_freq) {
  check_packed_heads(op, "q", q, q);
  check_packed_heads(op, "k", k, q);
  const int64_t T = q.size(0), D = q.size(2);
  check_size(op, "k", k, 0, T, "tokens of q");
  check_size(op, "k", k, 2, D, "head_dim of q");
  TORCH_CHECK(D % 16 == 0 && D <= 256, "gptoss_ext.", op, ": head_dim must be a multiple of 16 and <= 256, got ", D);
  check_cuda(op, "positions", positions);
  check_same_device(op, "positions", positions, q);
  check_dtype(op, "positions", positions, at::kLong);
  check_dim(op, "positions", positions, 1);
  check_contiguous(op, "positions", positions);
  check_size(op, "positions", positions, 0, T, "tokens of q");
  check_cuda(op, "inv_freq", inv_freq);
  check_same_device(op, "inv_freq", inv_freq, q);
  check_dtype(op, "inv_freq", inv_freq, at::kDouble);
  check_dim(op, "inv_freq", inv_freq, 1);
  check_contiguous(op, "inv_freq", inv_freq);
  check_size(op, "inv_freq", inv_freq, 0, D / 2, "head_dim / 2");
}

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
           double concentration) {
  const char* op = "rope_";
  check_rope_args(op, q, k, positions, inv_freq);
  const int64_t T = q.size(0), D = q.size(2);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto err = launch_rope(reinterpret_cast<__nv_bfloat16*>(q.data_ptr()), reinterpret_cast<__nv_bfloat16*>(k.data_ptr()),
                         positions.data_ptr<int64_t>(), inv_freq.data_ptr<double>(), concentration, T,
                         static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), static_cast<int>(D),
                         q.stride(0), k.stride(0), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

}  // namespace gptoss
