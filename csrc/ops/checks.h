// Argument checks shared by the host wrappers. Every message names the op, the argument and what
// was found, e.g. "gptoss_ext.add_rms_norm: 'scale' must have dtype BFloat16, got Float".
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "kernels/kv_cache.h"

namespace gptoss {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "gptoss_ext.", op, ": '", name, "' must be a CUDA tensor, got ", t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dt) {
  TORCH_CHECK(t.scalar_type() == dt, "gptoss_ext.", op, ": '", name, "' must have dtype ", dt, ", got ",
              t.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "gptoss_ext.", op, ": '", name, "' must be contiguous (shape ", shape_str(t),
              ", strides ", t.strides(), ")");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "gptoss_ext.", op, ": '", name, "' must have ", dim, " dimensions, got shape ",
              shape_str(t));
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t expected,
                       const char* what) {
  TORCH_CHECK(t.size(d) == expected, "gptoss_ext.", op, ": '", name, "' dim ", d, " must be ", expected, " (",
              what, "), got shape ", shape_str(t));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "gptoss_ext.", op, ": '", name, "' is on ", t.device(),
              " but the other arguments are on ", ref.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "gptoss_ext.", op, ": '", name, "' has shape ", shape_str(t), ", '", ref_name,
              "' has shape ", shape_str(ref), "; they must match");
}

inline void check_aligned16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "gptoss_ext.", op, ": '", name,
              "' must be 16-byte aligned (a view with an odd offset?)");
}

// A 1-D tensor of n elements of dtype dt, contiguous, on ref's device (`what` says what n counts).
inline void check_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dt, int64_t n,
                         const at::Tensor& ref, const char* what) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, dt);
  check_dim(op, name, t, 1);
  check_contiguous(op, name, t);
  check_size(op, name, t, 0, n, what);
}

// An int32 tensor of numel elements (any shape), contiguous, on ref's device.
inline void check_int_tensor(const char* op, const char* name, const at::Tensor& t, int64_t numel,
                             const at::Tensor& ref) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kInt);
  check_contiguous(op, name, t);
  TORCH_CHECK(t.numel() == numel, "gptoss_ext.", op, ": '", name, "' must have ", numel, " elements, got shape ",
              shape_str(t));
}

// A bf16 CUDA tensor of the given rank, contiguous, on ref's device.
inline void check_bf16_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                              const at::Tensor& ref) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kBFloat16);
  check_dim(op, name, t, dim);
  check_contiguous(op, name, t);
}

// [T, H, D] bf16 with packed heads (strides [*, D, 1]); the token stride may exceed H * D (a view
// of a fused qkv buffer) but must be a multiple of 8; 16-byte aligned.
inline void check_packed_heads(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kBFloat16);
  check_dim(op, name, t, 3);
  TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), "gptoss_ext.", op, ": '", name,
              "' must have contiguous heads (strides [*, ", t.size(2), ", 1]), got strides ", t.strides());
  TORCH_CHECK(t.size(0) <= 1 || (t.stride(0) >= t.size(1) * t.size(2) && t.stride(0) % 8 == 0), "gptoss_ext.", op,
              ": '", name, "' token stride must cover its heads and be a multiple of 8, got ", t.stride(0));
  check_aligned16(op, name, t);
}

// A skinny GEMV's operands: x [M, K] bf16 with contiguous rows and a row stride that is a multiple
// of 8 (a view of a wider buffer is fine), weight [N, K] bf16 contiguous, both 16-byte aligned.
inline void check_gemv_args(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(op, "x", x);
  check_dtype(op, "x", x, at::kBFloat16);
  check_dim(op, "x", x, 2);
  TORCH_CHECK(x.stride(1) == 1 && (x.size(0) <= 1 || x.stride(0) % 8 == 0), "gptoss_ext.", op,
              ": 'x' rows must be contiguous with a stride that is a multiple of 8, got strides ", x.strides());
  check_aligned16(op, "x", x);
  check_bf16_tensor(op, "weight", weight, 2, x);
  check_aligned16(op, "weight", weight);
  check_size(op, "weight", weight, 1, x.size(1), "columns of x");
}

// The skinny (decode) linear's rows: 1 <= M <= max_m, K % 8 == 0, M x K x 2 bytes <= max_bytes.
inline void check_skinny_rows(const char* op, const at::Tensor& x, int64_t max_m, int64_t max_bytes) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= max_m, "gptoss_ext.", op, ": takes 1 to ", max_m, " rows, got ", M);
  TORCH_CHECK(K % 8 == 0 && M * K * 2 <= max_bytes, "gptoss_ext.", op, ": K must be a multiple of 8 and rows x K x 2 <= ",
              max_bytes, " bytes, got K = ", K);
}

// The checks below are defined in checks.cpp.
// rope_ / rope_kv_ / linear_rope_kv: q [T, Hq, D], k [T, Hkv, D] packed heads, positions [T] int64,
// inv_freq [D/2] fp64.
void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                     const at::Tensor& inv_freq);
// [T, H, 64] bf16 with packed heads (a view of a fused qkv output is fine).
void check_heads(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref);
// k_cache, v_cache [B, max_len, Hkv, 64] bf16, contiguous, the same shape, on ref's device.
void check_cache(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& ref);
// int32 [n], contiguous, on ref's device; `what` says what n counts.
inline void check_int32_vec(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& ref,
                            const char* what) {
  check_vector(op, name, t, at::kInt, n, ref, what);
}
// Query heads a multiple of the key/value heads.
void check_gqa(const char* op, int64_t Hq, int64_t Hkv);
// k, v [T, Hkv, 64] into the cache rows slots [T] int64.
void check_kv_write_args(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                         const at::Tensor& k_cache, const at::Tensor& v_cache);
// An RMSNorm's scale [H] bf16 for rows of ref [T, H], H within the kernel's limit, eps >= 0.
void check_rms_norm_args(const char* op, const at::Tensor& ref, const at::Tensor& scale, double eps);
// The kernels' view of a checked cache write (kv_cache.h).
KvCacheWrite kv_cache_write(const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache);

inline const __nv_bfloat16* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); }
inline __nv_bfloat16* bf16_ptr(at::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr()); }

}  // namespace gptoss

#define GPTOSS_CHECK_LAUNCH(op, err)                                                                  \
  TORCH_CHECK((err) == cudaSuccess, "gptoss_ext.", op, ": kernel launch failed: ", cudaGetErrorString(err))
