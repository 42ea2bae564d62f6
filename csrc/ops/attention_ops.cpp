// Host wrappers for the attention kernels: prefill (varlen), decode (split-KV), KV-cache write.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/attention.h"
#include "kernels/linear.h"
#include "kernels/rope.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {

namespace {

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
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "gptoss_ext.", op, ": k_cache ", shape_str(k_cache),
              " and v_cache ", shape_str(v_cache), " must have the same shape [B, max_len, Hkv, 64]");
  TORCH_CHECK(k_cache.size(3) == kAttnHeadDim, "gptoss_ext.", op, ": the cache must be [B, max_len, Hkv, 64], got ",
              shape_str(k_cache));
  TORCH_CHECK(k_cache.size(1) <= INT32_MAX, "gptoss_ext.", op, ": cache length ", k_cache.size(1), " too large");
  check_aligned16(op, "k_cache", k_cache);
  check_aligned16(op, "v_cache", v_cache);
}

void check_int32_vec(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& ref,
                     const char* what) {
  check_cuda(op, name, t);
  check_same_device(op, name, t, ref);
  check_dtype(op, name, t, at::kInt);
  check_dim(op, name, t, 1);
  check_contiguous(op, name, t);
  check_size(op, name, t, 0, n, what);
}

const float* sinks_ptr(const char* op, const std::optional<at::Tensor>& sinks, int64_t Hq, const at::Tensor& ref) {
  if (!sinks.has_value()) return nullptr;
  const at::Tensor& s = *sinks;
  check_cuda(op, "sinks", s);
  check_same_device(op, "sinks", s, ref);
  check_dtype(op, "sinks", s, at::kFloat);
  check_dim(op, "sinks", s, 1);
  check_contiguous(op, "sinks", s);
  check_size(op, "sinks", s, 0, Hq, "query heads");
  return s.data_ptr<float>();
}

void check_gqa(const char* op, int64_t Hq, int64_t Hkv) {
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "gptoss_ext.", op, ": query heads (", Hq,
              ") must be a multiple of the cache's key/value heads (", Hkv, ")");
}

auto bf(const at::Tensor& t) { return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr()); }
auto bf_mut(at::Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr()); }

}  // namespace

void attn_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& sinks, const at::Tensor& cu_seqlens, const at::Tensor& start,
                  int64_t max_q_len, int64_t window, double sm_scale, at::Tensor& out) {
  const char* op = "attn_prefill";
  check_heads(op, "q", q, q);
  check_cache(op, k_cache, v_cache, q);
  check_heads(op, "out", out, q);
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k_cache.size(2), B = start.numel();
  check_gqa(op, Hq, Hkv);
  TORCH_CHECK(out.size(0) == T && out.size(1) == Hq, "gptoss_ext.", op, ": 'out' must be ", shape_str(q),
              " like q, got ", shape_str(out));
  check_int32_vec(op, "start", start, B, q, "sequences");
  check_int32_vec(op, "cu_seqlens", cu_seqlens, B + 1, q, "sequences + 1");
  TORCH_CHECK(B <= k_cache.size(0), "gptoss_ext.", op, ": ", B, " sequences but the cache has ", k_cache.size(0),
              " batch rows");
  TORCH_CHECK(B <= 65535, "gptoss_ext.", op, ": at most 65535 sequences a launch, got ", B);
  TORCH_CHECK(max_q_len >= 0 && max_q_len <= T, "gptoss_ext.", op, ": max_q_len must be in [0, ", T, "], got ",
              max_q_len);
  TORCH_CHECK(window >= 0, "gptoss_ext.", op, ": window must be >= 0 (0 = full causal), got ", window);
  TORCH_CHECK(T <= INT32_MAX, "gptoss_ext.", op, ": too many tokens (", T, ")");
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  AttnPrefillArgs a{};
  a.q = bf(q);
  a.k_cache = bf(k_cache);
  a.v_cache = bf(v_cache);
  a.sinks = sinks_ptr(op, sinks, Hq, q);
  a.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  a.start = start.data_ptr<int32_t>();
  a.out = bf_mut(out);
  a.q_stride = q.stride(0);
  a.out_stride = out.stride(0);
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.Hkv = static_cast<int>(Hkv);
  a.max_len = static_cast<int>(k_cache.size(1));
  a.max_q_len = static_cast<int>(max_q_len);
  a.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));
  a.total_q = static_cast<int>(T);
  a.sm_scale = static_cast<float>(sm_scale);
  GPTOSS_CHECK_LAUNCH(op, launch_attn_prefill(a, c10::cuda::getCurrentCUDAStream()));
}

std::vector<int64_t> attn_decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t max_len, int64_t window,
                                      int64_t device) {
  const char* op = "attn_decode_plan";
  check_gqa(op, Hq, Hkv);
  TORCH_CHECK(B > 0 && max_len > 0 && max_len <= INT32_MAX && window >= 0, "gptoss_ext.", op,
              ": need B > 0, 0 < max_len < 2^31, window >= 0; got B=", B, " max_len=", max_len, " window=", window);
  int sms = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, static_cast<int>(device));
  TORCH_CHECK(err == cudaSuccess, "gptoss_ext.", op, ": cannot query CUDA device ", device, ": ",
              cudaGetErrorString(err));
  int chunk = 0, splits = 0, warps = 0;
  attn_decode_split(static_cast<int>(B), static_cast<int>(Hq), static_cast<int>(Hkv), static_cast<int>(max_len),
                    static_cast<int>(std::min<int64_t>(window, INT32_MAX)), sms, chunk, splits, warps);
  return {chunk, splits, warps};
}

void attn_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const std::optional<at::Tensor>& sinks, const at::Tensor& seq_lens, int64_t window, double sm_scale,
                 int64_t chunk, int64_t warps, at::Tensor& ws_o, at::Tensor& ws_ml, at::Tensor& tickets,
                 at::Tensor& out, bool kv_ready) {
  const char* op = "attn_decode";
  check_heads(op, "q", q, q);
  check_cache(op, k_cache, v_cache, q);
  check_heads(op, "out", out, q);
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k_cache.size(2), max_len = k_cache.size(1);
  check_gqa(op, Hq, Hkv);
  TORCH_CHECK(out.size(0) == B && out.size(1) == Hq, "gptoss_ext.", op, ": 'out' must be ", shape_str(q),
              " like q, got ", shape_str(out));
  TORCH_CHECK(B <= k_cache.size(0), "gptoss_ext.", op, ": ", B, " sequences but the cache has ", k_cache.size(0),
              " batch rows");
  TORCH_CHECK(B <= 65535, "gptoss_ext.", op, ": at most 65535 sequences a launch, got ", B);
  check_int32_vec(op, "seq_lens", seq_lens, B, q, "sequences");
  TORCH_CHECK(window >= 0, "gptoss_ext.", op, ": window must be >= 0 (0 = full causal), got ", window);
  check_cuda(op, "ws_o", ws_o);
  check_cuda(op, "ws_ml", ws_ml);
  check_dtype(op, "ws_o", ws_o, at::kFloat);
  check_dtype(op, "ws_ml", ws_ml, at::kFloat);
  check_dim(op, "ws_o", ws_o, 4);
  check_dim(op, "ws_ml", ws_ml, 4);
  check_contiguous(op, "ws_o", ws_o);
  check_contiguous(op, "ws_ml", ws_ml);
  const int64_t S = ws_ml.size(2);
  TORCH_CHECK(ws_o.size(0) == B && ws_o.size(1) == Hq && ws_o.size(2) == S && ws_o.size(3) == kAttnHeadDim &&
                  ws_ml.size(0) == B && ws_ml.size(1) == Hq && ws_ml.size(3) == 2 && S > 0,
              "gptoss_ext.", op, ": workspaces must be ws_o [B, Hq, splits, 64] and ws_ml [B, Hq, splits, 2] "
              "(see attn_decode_plan), got ", shape_str(ws_o), " and ", shape_str(ws_ml));
  const int64_t range = window > 0 ? std::min(window, max_len) : max_len;
  TORCH_CHECK(warps == 1 || warps == 4 || warps == 8, "gptoss_ext.", op, ": warps (a CTA) must be 1, 4 or 8, got ",
              warps);
  const int64_t unit = 32 * std::max<int64_t>(2, warps);
  TORCH_CHECK(chunk > 0 && chunk % unit == 0 && chunk * S >= range, "gptoss_ext.", op,
              ": chunk must be a positive multiple of ", unit, " (with ", warps, " warps) with chunk * splits >= ",
              range, " keys; got chunk ", chunk, " and ", S, " splits");
  TORCH_CHECK(S <= 65535, "gptoss_ext.", op, ": too many splits (", S, ")");
  const int64_t groups = B * Hkv * ((Hq / Hkv + 15) / 16);
  check_cuda(op, "tickets", tickets);
  check_same_device(op, "tickets", tickets, q);
  check_dtype(op, "tickets", tickets, at::kInt);
  check_dim(op, "tickets", tickets, 1);
  check_contiguous(op, "tickets", tickets);
  TORCH_CHECK(tickets.numel() >= groups, "gptoss_ext.", op, ": 'tickets' needs ", groups,
              " zeroed int32 counters (B x KV heads x head chunks), got ", tickets.numel());
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  AttnDecodeArgs a{};
  a.q = bf(q);
  a.k_cache = bf(k_cache);
  a.v_cache = bf(v_cache);
  a.sinks = sinks_ptr(op, sinks, Hq, q);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.ws_o = ws_o.data_ptr<float>();
  a.ws_ml = ws_ml.data_ptr<float>();
  a.tickets = tickets.data_ptr<int32_t>();
  a.out = bf_mut(out);
  a.q_stride = q.stride(0);
  a.out_stride = out.stride(0);
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.Hkv = static_cast<int>(Hkv);
  a.max_len = static_cast<int>(max_len);
  a.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));
  a.chunk = static_cast<int>(chunk);
  a.num_splits = static_cast<int>(S);
  a.warps = static_cast<int>(warps);
  a.kv_ready = kv_ready;
  a.sm_scale = static_cast<float>(sm_scale);
  GPTOSS_CHECK_LAUNCH(op, launch_attn_decode(a, c10::cuda::getCurrentCUDAStream()));
}

namespace {
void check_kv_write_args(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                         const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_heads(op, "k", k, k);
  check_heads(op, "v", v, k);
  check_cache(op, k_cache, v_cache, k);
  const int64_t T = k.size(0), Hkv = k.size(1);
  TORCH_CHECK(v.size(0) == T && v.size(1) == Hkv, "gptoss_ext.", op, ": 'v' must be ", shape_str(k),
              " like k, got ", shape_str(v));
  TORCH_CHECK(k_cache.size(2) == Hkv, "gptoss_ext.", op, ": k has ", Hkv, " heads but the cache has ",
              k_cache.size(2));
  TORCH_CHECK(Hkv * 8 <= 1024, "gptoss_ext.", op, ": at most 128 key/value heads, got ", Hkv);
  check_cuda(op, "slots", slots);
  check_same_device(op, "slots", slots, k);
  check_dtype(op, "slots", slots, at::kLong);
  check_dim(op, "slots", slots, 1);
  check_contiguous(op, "slots", slots);
  check_size(op, "slots", slots, 0, T, "tokens of k");
  TORCH_CHECK(T <= INT32_MAX, "gptoss_ext.", op, ": too many tokens (", T, ")");
}
}  // namespace

void decode_prep(at::Tensor& seq_lens, const at::Tensor& active, const at::Tensor& row0, at::Tensor& positions,
                 at::Tensor& slots) {
  const char* op = "decode_prep";
  check_cuda(op, "seq_lens", seq_lens);
  check_dtype(op, "seq_lens", seq_lens, at::kInt);
  check_dim(op, "seq_lens", seq_lens, 1);
  check_contiguous(op, "seq_lens", seq_lens);
  const int64_t B = seq_lens.size(0);
  check_int32_vec(op, "active", active, B, seq_lens, "rows of seq_lens");
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"row0", &row0}, {"positions", &positions},
                         {"slots", &slots}}) {
    check_cuda(op, name, *t);
    check_same_device(op, name, *t, seq_lens);
    check_dtype(op, name, *t, at::kLong);
    check_dim(op, name, *t, 1);
    check_contiguous(op, name, *t);
    check_size(op, name, *t, 0, B, "rows of seq_lens");
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
  GPTOSS_CHECK_LAUNCH(op, launch_kv_write(bf(k), bf(v), k.stride(0), v.stride(0), slots.data_ptr<int64_t>(), T,
                                          static_cast<int>(Hkv), bf_mut(k_cache), bf_mut(v_cache),
                                          k_cache.size(0) * k_cache.size(1), c10::cuda::getCurrentCUDAStream()));
}

void rope_kv_(at::Tensor& q, at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
              const at::Tensor& inv_freq, double concentration, const at::Tensor& slots, at::Tensor& k_cache,
              at::Tensor& v_cache) {
  const char* op = "rope_kv_";
  check_rope_args(op, q, k, positions, inv_freq);
  check_kv_write_args(op, k, v, slots, k_cache, v_cache);
  const int64_t T = q.size(0), D = q.size(2);
  RopeCacheWrite cw;
  cw.v = bf(v);
  cw.v_stride = v.stride(0);
  cw.slots = slots.data_ptr<int64_t>();
  cw.k_cache = bf_mut(k_cache);
  cw.v_cache = bf_mut(v_cache);
  cw.rows = k_cache.size(0) * k_cache.size(1);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  GPTOSS_CHECK_LAUNCH(op, launch_rope(reinterpret_cast<__nv_bfloat16*>(q.data_ptr()),
                                      reinterpret_cast<__nv_bfloat16*>(k.data_ptr()), positions.data_ptr<int64_t>(),
                                      inv_freq.data_ptr<double>(), concentration, T, static_cast<int>(q.size(1)),
                                      static_cast<int>(k.size(1)), static_cast<int>(D), q.stride(0), k.stride(0),
                                      c10::cuda::getCurrentCUDAStream(), cw));
}

void linear_rope_kv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::Tensor& out, const at::Tensor& positions, const at::Tensor& inv_freq, double concentration,
                    const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, bool weight_constant) {
  const char* op = "linear_rope_kv";
  check_gemv_args(op, x, weight);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_skinny_rows(op, x, kSkinnyMaxM);
  const __nv_bfloat16* b = nullptr;
  if (bias.has_value()) {
    check_bf16_tensor(op, "bias", *bias, 1, x);
    check_size(op, "bias", *bias, 0, N, "rows of weight");
    b = bf(*bias);
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
  rope.slots = slots.data_ptr<int64_t>();
  rope.k_cache = bf_mut(k_cache);
  rope.v_cache = bf_mut(v_cache);
  rope.rows = k_cache.size(0) * k_cache.size(1);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  GPTOSS_CHECK_LAUNCH(op, launch_linear_skinny(bf(x), x.stride(0), bf(weight), b, bf_mut(out), out.stride(0),
                                               static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                               weight_constant, c10::cuda::getCurrentCUDAStream(), &rope));
}

}  // namespace gptoss
