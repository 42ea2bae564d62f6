// Host wrapper for the KV-cache write.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/kv_cache.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor& k_cache,
              at::Tensor& v_cache) {
  const char* op = "kv_write";
  check_kv_write_args(op, k, v, slots, k_cache, v_cache);
  const int64_t T = k.size(0), Hkv = k.size(1);
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  GPTOSS_CHECK_LAUNCH(op, launch_kv_write(bf16_ptr(k), bf16_ptr(v), k.stride(0), v.stride(0), T, static_cast<int>(Hkv),
                                          kv_cache_write(slots, k_cache, v_cache), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace gptoss
