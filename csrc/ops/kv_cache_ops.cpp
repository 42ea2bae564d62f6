// Host wrappers for the KV-cache write and a decode step's bookkeeping.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/kv_cache.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void decode_prep(at::Tensor& seq_lens, const at::Tensor& active, const at::Tensor& row0, at::Tensor& positions,
                 at::Tensor& slots) {
  const char* op = "decode_prep";
  check_cuda(op, "seq_lens", seq_lens);
  check_dtype(op, "seq_lens", seq_lens, at::kInt);
  check_dim(op, "seq_lens", seq_lens, 1);
  check_contiguous(op, "seq_lens", seq_lens);
  const int64_t B = seq_lens.size(0);
  check_int32_vec(op, "active", active, B, seq_lens, "rows of seq_lens");
  for (auto [name, t] :
       {std::pair<const char*, const at::Tensor*>{"row0", &row0}, {"positions", &positions}, {"slots", &slots}}) {
    check_vector(op, name, *t, at::kLong, B, seq_lens, "rows of seq_lens");
  }
  const c10::cuda::OptionalCUDAGuard guard(seq_lens.device());
  GPTOSS_CHECK_LAUNCH(op, launch_decode_prep(seq_lens.data_ptr<int32_t>(), active.data_ptr<int32_t>(),
                                             row0.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
                                             slots.data_ptr<int64_t>(), B, c10::cuda::getCurrentCUDAStream()));
}

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
