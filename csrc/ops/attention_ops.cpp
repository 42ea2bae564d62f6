// Host wrappers for the attention kernels: varlen prefill and split-KV decode over a KV cache.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/attention.h"
#include "ops/checks.h"
#include "ops/ops.h"

namespace gptoss {
namespace {

const float* sinks_ptr(const char* op, const std::optional<at::Tensor>& sinks, int64_t Hq, const at::Tensor& ref) {
  if (!sinks.has_value()) return nullptr;
  check_vector(op, "sinks", *sinks, at::kFloat, Hq, ref, "query heads");
  return sinks->data_ptr<float>();
}

// The cache of a launch for B sequences: contiguous [B', max_len, Hkv, 64] (B <= B'), or with a
// block table a pool [rows, Hkv, 64] of block_size-row blocks (attention.h). Sets layout, Hkv and
// max_len (positions a sequence can hold).
void check_layout(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& ref,
                  int64_t B, const std::optional<at::Tensor>& block_table, int64_t block_size, KvLayout& layout,
                  int64_t& Hkv, int64_t& max_len) {
  layout = KvLayout{};
  if (!block_table.has_value()) {
    check_cache(op, k_cache, v_cache, ref);
    TORCH_CHECK(B <= k_cache.size(0), "gptoss_ext.", op, ": ", B, " sequences but the cache has ", k_cache.size(0),
                " batch rows");
    Hkv = k_cache.size(2);
    max_len = k_cache.size(1);
    return;
  }
  check_bf16_tensor(op, "k_cache", k_cache, 3, ref);
  check_bf16_tensor(op, "v_cache", v_cache, 3, ref);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kAttnHeadDim, "gptoss_ext.", op,
              ": a paged cache is k_cache and v_cache [rows, Hkv, 64] of the same shape, got ", shape_str(k_cache),
              " and ", shape_str(v_cache));
  TORCH_CHECK(block_size >= kAttnMinBlockRows && (block_size & (block_size - 1)) == 0 &&
                  k_cache.size(0) % block_size == 0,
              "gptoss_ext.", op, ": block_size must be a power of two >= ", kAttnMinBlockRows,
              " dividing the pool's ", k_cache.size(0), " rows, got ", block_size);
  const at::Tensor& t = *block_table;
  check_cuda(op, "block_table", t);
  check_same_device(op, "block_table", t, ref);
  check_dtype(op, "block_table", t, at::kInt);
  check_dim(op, "block_table", t, 2);
  check_contiguous(op, "block_table", t);
  TORCH_CHECK(t.size(0) >= B, "gptoss_ext.", op, ": 'block_table' has ", t.size(0), " rows for ", B, " sequences");
  check_aligned16(op, "k_cache", k_cache);
  check_aligned16(op, "v_cache", v_cache);
  int shift = 0;
  while ((int64_t{1} << shift) < block_size) ++shift;
  max_len = t.size(1) * block_size;
  TORCH_CHECK(max_len <= INT32_MAX, "gptoss_ext.", op, ": block_table x block_size covers too many positions");
  Hkv = k_cache.size(1);
  layout.block_table = t.data_ptr<int32_t>();
  layout.table_stride = t.size(1);
  layout.block_shift = shift;
}

// What both launches check: q and out [rows, Hq, 64] alike, the cache of B sequences (layout, Hkv,
// max_len set), GQA head counts, at most 65535 sequences.
void check_launch(const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& out, int64_t B, const std::optional<at::Tensor>& block_table, int64_t block_size,
                  KvLayout& layout, int64_t& Hkv, int64_t& max_len) {
  check_heads(op, "q", q, q);
  check_heads(op, "out", out, q);
  check_layout(op, k_cache, v_cache, q, B, block_table, block_size, layout, Hkv, max_len);
  check_gqa(op, q.size(1), Hkv);
  TORCH_CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1), "gptoss_ext.", op, ": 'out' must be ",
              shape_str(q), " like q, got ", shape_str(out));
  TORCH_CHECK(B <= 65535, "gptoss_ext.", op, ": at most 65535 sequences a launch, got ", B);
}

// The fields both launches share: q, the cache, sinks, out, their strides and head counts.
template <class Args>
void fill_common(Args& a, const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const std::optional<at::Tensor>& sinks, at::Tensor& out, const KvLayout& layout, int64_t Hkv,
                 int64_t max_len) {
  a.q = bf16_ptr(q);
  a.k_cache = bf16_ptr(k_cache);
  a.v_cache = bf16_ptr(v_cache);
  a.sinks = sinks_ptr(op, sinks, q.size(1), q);
  a.out = bf16_ptr(out);
  a.q_stride = q.stride(0);
  a.out_stride = out.stride(0);
  a.Hq = static_cast<int>(q.size(1));
  a.Hkv = static_cast<int>(Hkv);
  a.max_len = static_cast<int>(max_len);
  a.layout = layout;
}

}  // namespace

void attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const std::optional<at::Tensor>& sinks, const at::Tensor& cu_seqlens, const at::Tensor& start,
                       int64_t max_q_len, int64_t window, double sm_scale, at::Tensor& out,
                       const std::optional<at::Tensor>& block_table, int64_t block_size) {
  const char* op = "attention_prefill";
  const int64_t T = q.size(0), B = start.numel();
  KvLayout layout;
  int64_t Hkv = 0, max_len = 0;
  check_launch(op, q, k_cache, v_cache, out, B, block_table, block_size, layout, Hkv, max_len);
  check_int32_vec(op, "start", start, B, q, "sequences");
  check_int32_vec(op, "cu_seqlens", cu_seqlens, B + 1, q, "sequences + 1");
  TORCH_CHECK(max_q_len >= 0 && max_q_len <= T, "gptoss_ext.", op, ": max_q_len must be in [0, ", T, "], got ",
              max_q_len);
  TORCH_CHECK(window >= 0, "gptoss_ext.", op, ": window must be >= 0 (0 = full causal), got ", window);
  TORCH_CHECK(T <= INT32_MAX, "gptoss_ext.", op, ": too many tokens (", T, ")");
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  AttnPrefillArgs a{};
  fill_common(a, op, q, k_cache, v_cache, sinks, out, layout, Hkv, max_len);
  a.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  a.start = start.data_ptr<int32_t>();
  a.B = static_cast<int>(B);
  a.max_q_len = static_cast<int>(max_q_len);
  a.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));
  a.total_q = static_cast<int>(T);
  a.sm_scale = static_cast<float>(sm_scale);
  GPTOSS_CHECK_LAUNCH(op, launch_attn_prefill(a, c10::cuda::getCurrentCUDAStream()));
}

std::vector<int64_t> attention_decode_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t max_len, int64_t window,
                                           int64_t device) {
  const char* op = "attention_decode_plan";
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

void attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const std::optional<at::Tensor>& sinks, const at::Tensor& seq_lens, int64_t window,
                      double sm_scale, int64_t chunk, int64_t warps, at::Tensor& ws_o, at::Tensor& ws_ml,
                      at::Tensor& tickets, at::Tensor& out, bool kv_ready,
                      const std::optional<at::Tensor>& block_table, int64_t block_size) {
  const char* op = "attention_decode";
  const int64_t B = q.size(0), Hq = q.size(1);
  KvLayout layout;
  int64_t Hkv = 0, max_len = 0;
  check_launch(op, q, k_cache, v_cache, out, B, block_table, block_size, layout, Hkv, max_len);
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
              "gptoss_ext.", op,
              ": workspaces must be ws_o [B, Hq, splits, 64] and ws_ml [B, Hq, splits, 2] "
              "(see attention_decode_plan), got ",
              shape_str(ws_o), " and ", shape_str(ws_ml));
  const int64_t range = window > 0 ? std::min(window, max_len) : max_len;
  TORCH_CHECK(warps == 1 || warps == 4 || warps == 8, "gptoss_ext.", op, ": warps (a CTA) must be 1, 4 or 8, got ",
              warps);
  const int64_t unit = 32 * std::max<int64_t>(2, warps);
  TORCH_CHECK(chunk > 0 && chunk % unit == 0 && chunk * S >= range, "gptoss_ext.", op,
              ": chunk must be a positive multiple of ", unit, " (with ", warps,
              " warps) with chunk * splits >= ", range, " keys; got chunk ", chunk, " and ", S, " splits");
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
  fill_common(a, op, q, k_cache, v_cache, sinks, out, layout, Hkv, max_len);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.ws_o = ws_o.data_ptr<float>();
  a.ws_ml = ws_ml.data_ptr<float>();
  a.tickets = tickets.data_ptr<int32_t>();
  a.B = static_cast<int>(B);
  a.window = static_cast<int>(std::min<int64_t>(window, INT32_MAX));
  a.chunk = static_cast<int>(chunk);
  a.num_splits = static_cast<int>(S);
  a.warps = static_cast<int>(warps);
  a.kv_ready = kv_ready;
  a.sm_scale = static_cast<float>(sm_scale);
  GPTOSS_CHECK_LAUNCH(op, launch_attn_decode(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace gptoss
