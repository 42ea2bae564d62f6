// Argument checks shared by several host wrappers (declared in checks.h).
#include "ops/checks.h"

#include "kernels/attention.h"
#include "kernels/rms_norm.h"
#include "kernels/rope.h"

namespace gptoss {

// [T, H, 64] bf16 with packed heads (a view of a fused qkv output is fine).
void check_heads(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  check_cuda(op, name, t);
  TORCH_CHECK(t.dim() == 3 && t.size(2) == kAttnHeadDim, "gptoss_ext.", op, ": the attention kernels take head_dim ",
              kAttnHeadDim, "; '", name, "' has shape ", shape_str(t));
  check_packed_heads(op, name, t, ref);
}

void check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& ref) {
  check_bf16_tensor(op, "k_cache", k_cache, 4, ref);
  check_bf16_tensor(op, "v_cache", v_cache, 4, ref);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "gptoss_ext.", op, ": k_cache ", shape_str(k_cache), " and v_cache ",
              shape_str(v_cache), " must have the same shape [B, max_len, Hkv, 64]");
  TORCH_CHECK(k_cache.size(3) == kAttnHeadDim, "gptoss_ext.", op, ": the cache must be [B, max_len, Hkv, 64], got ",
              shape_str(k_cache));
  TORCH_CHECK(k_cache.size(1) <= INT32_MAX, "gptoss_ext.", op, ": cache length ", k_cache.size(1), " too large");
  check_aligned16(op, "k_cache", k_cache);
  check_aligned16(op, "v_cache", v_cache);
}

void check_gqa(const char* op, int64_t Hq, int64_t Hkv) {
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "gptoss_ext.", op, ": query heads (", Hq,
              ") must be a multiple of the cache's key/value heads (", Hkv, ")");
}

void check_kv_write_args(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                         const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_heads(op, "k", k, k);
  check_heads(op, "v", v, k);
  check_cache(op, k_cache, v_cache, k);
  const int64_t T = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(v.size(0) == T && v.size(1) == Hkv, "gptoss_ext.", op, ": 'v' must be ", shape_str(k), " like k, got ",
              shape_str(v));
  TORCH_CHECK(k_cache.size(2) == Hkv, "gptoss_ext.", op, ": k has ", Hkv, " heads but the cache has ", k_cache.size(2));
  TORCH_CHECK(Hkv * 8 <= 1024, "gptoss_ext.", op, ": at most 128 key/value heads, got ", Hkv);
  check_vector(op, "slots", slots, at::kLong, T, k, "tokens of k");
  TORCH_CHECK(T <= INT32_MAX, "gptoss_ext.", op, ": too many tokens (", T, ")");
}

KvCacheWrite kv_cache_write(const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache) {
  KvCacheWrite c;
  c.slots = slots.data_ptr<int64_t>();
  c.k_cache = bf16_ptr(k_cache);
  c.v_cache = bf16_ptr(v_cache);
  c.rows = k_cache.size(0) * k_cache.size(1);
  return c;
}

void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     const at::Tensor& inv_freq) {
  check_packed_heads(op, "q", q, q);
  check_packed_heads(op, "k", k, q);
  const int64_t T = q.size(0), D = q.size(2);
  check_size(op, "k", k, 0, T, "tokens of q");
  check_size(op, "k", k, 2, D, "head_dim of q");
  TORCH_CHECK(D % 16 == 0 && D <= kRopeMaxHeadDim, "gptoss_ext.", op,
              ": head_dim must be a multiple of 16 and <= ", kRopeMaxHeadDim, ", got ", D);
  check_vector(op, "positions", positions, at::kLong, T, q, "tokens of q");
  check_vector(op, "inv_freq", inv_freq, at::kDouble, D / 2, q, "head_dim / 2");
}

void check_rms_norm_args(const char* op, const at::Tensor& ref, const at::Tensor& scale, double eps) {
  const int64_t H = ref.size(1);
  check_vector(op, "scale", scale, at::kBFloat16, H, ref, "hidden size");
  TORCH_CHECK(H % 8 == 0 && H <= kRmsNormMaxHidden, "gptoss_ext.", op,
              ": hidden size must be a multiple of 8 and <= ", kRmsNormMaxHidden, ", got ", H);
  TORCH_CHECK(eps >= 0, "gptoss_ext.", op, ": eps must be >= 0, got ", eps);
}

}  // namespace gptoss
