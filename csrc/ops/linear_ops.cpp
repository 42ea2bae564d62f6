// Host wrappers for the skinny (decode) bf16 linear, alone and as the qkv projection with RoPE and
// the KV-cache write in its epilogue.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/attention.h"
#include "kernels/linear.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

void linear_skinny(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   at::Tensor& out, bool weight_constant) {
  const char* op = "linear_skinny";
  check_gemv_args(op, x, weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_skinny_rows(op, x, kSkinnyMaxM, kSkinnyMaxXBytes);
  TORCH_CHECK(N <= INT32_MAX && K <= INT32_MAX, "gptoss_ext.", op, ": weight too large");
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, N, "rows of weight");
    b = bf16_ptr(*bias);
  }
  check_cuda(op, "out", out);
  check_same_device(op, "out", out, x);
  check_dtype(op, "out", out, at::kBFloat16);
  check_dim(op, "out", out, 2);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N && out.stride(1) == 1, "gptoss_ext.", op, ": 'out' must be [", M,
              ", ", N, "] with contiguous rows, got ", shape_str(out));
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(
      op, launch_linear_skinny(bf16_ptr(x), x.stride(0), bf16_ptr(weight), b, bf16_ptr(out), out.stride(0),
                               static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), weight_constant,
                               c10::cuda::getCurrentCUDAStream()));
}

void linear_rope_kv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq, double concentration,
                    const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, bool weight_constant) {
  const char* op = "linear_rope_kv";
  check_gemv_args(op, x, weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_skinny_rows(op, x, kSkinnyMaxM, kSkinnyMaxXBytes);
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, N, "rows of weight");
    b = bf16_ptr(*bias);
  }
  check_bf16_tensor(op, "out", out, 2, x);
  TORCH_CHECK(out.size(0) == M && out.size(1) == N, "gptoss_ext.", op, ": 'out' must be [", M, ", ", N, "], got ",
              shape_str(out));
  check_cache(op, k_cache, v_cache, x);
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(N % D == 0 && N / D > 2 * Hkv, "gptoss_ext.", op, ": weight rows (", N, ") must be (Hq + 2 x ", Hkv,
              ") x ", D, " for the cache's ", Hkv, " key/value heads of ", D);
  const int64_t Hq = N / D - 2 * Hkv;
  // The q / k / v views of out, checked as rope_kv_ checks its arguments.
  const at::Tensor q = out.narrow(1, 0, Hq * D).view({M, Hq, D});
  const at::Tensor k = out.narrow(1, Hq * D, Hkv * D).view({M, Hkv, D});
  const at::Tensor v = out.narrow(1, (Hq + Hkv) * D, Hkv * D).view({M, Hkv, D});
  check_rope_args(op, q, k, positions, inv_freq);
  check_kv_write_args(op, k, v, slots, k_cache, v_cache);
  LinearRope rope;
  rope.positions = positions.data_ptr<int64_t>();
  rope.inv_freq = inv_freq.data_ptr<double>();
  rope.concentration = concentration;
  rope.Hq = static_cast<int>(Hq);
  rope.Hkv = static_cast<int>(Hkv);
  rope.D = static_cast<int>(D);
  rope.cache = kv_cache_write(slots, k_cache, v_cache);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(
      op, launch_linear_skinny(bf16_ptr(x), x.stride(0), bf16_ptr(weight), b, bf16_ptr(out), out.stride(0),
                               static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), weight_constant,
                               c10::cuda::getCurrentCUDAStream(), &rope));
}

}  // namespace gptoss
