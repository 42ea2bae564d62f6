// Host wrappers for the in-place YaRN RoPE kernel, alone and with the KV-cache write.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/rope.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
           double concentration) {
  const char* op = "rope_";
  check_rope_args(op, q, k, positions, inv_freq);
  const int64_t T = q.size(0), D = q.size(2);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  auto err = launch_rope(bf16_ptr(q), bf16_ptr(k), positions.data_ptr<int64_t>(), inv_freq.data_ptr<double>(),
                         concentration, T, static_cast<int>(q.size(1)), static_cast<int>(k.size(1)),
                         static_cast<int>(D), q.stride(0), k.stride(0), c10::cuda::getCurrentCUDAStream());
  GPTOSS_CHECK_LAUNCH(op, err);
}

void rope_kv_(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
              const at::Tensor& inv_freq, double concentration, const at::Tensor& slots, at::Tensor& k_cache,
              at::Tensor& v_cache) {
  const char* op = "rope_kv_";
  check_rope_args(op, q, k, positions, inv_freq);
  check_kv_write_args(op, k, v, slots, k_cache, v_cache);
  const int64_t T = q.size(0), D = q.size(2);
  RopeCacheWrite cw;
  cw.v = bf16_ptr(v);
  cw.v_stride = v.stride(0);
  cw.cache = kv_cache_write(slots, k_cache, v_cache);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  GPTOSS_CHECK_LAUNCH(
      op, launch_rope(bf16_ptr(q), bf16_ptr(k), positions.data_ptr<int64_t>(), inv_freq.data_ptr<double>(),
                      concentration, T, static_cast<int>(q.size(1)), static_cast<int>(k.size(1)), static_cast<int>(D),
                      q.stride(0), k.stride(0), c10::cuda::getCurrentCUDAStream(), cw));
}

}  // namespace gptoss
