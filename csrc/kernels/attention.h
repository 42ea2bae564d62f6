// Sink-aware causal GQA attention over a KV cache (torch-free launchers), head_dim 64.
//
// KV cache layout (one layer), either
//   contiguous: k_cache, v_cache [B, max_len, Hkv, 64] bf16; sequence b's position p is row
//               b * max_len + p (block_table null), or
//   paged:      a pool [rows, Hkv, 64] of blocks of 2^block_shift rows; sequence b's position p is
//               row block_table[b][p >> block_shift] * 2^block_shift + p % 2^block_shift
//               (block_table int32 [B, table_stride]; max_len = table_stride << block_shift). A
//               block holds at least kAttnMinBlockRows rows, so a key tile of the kernels touches
//               at most two blocks.
// Rows are written through slots (kv_cache.h). Window layers' kernels read only the last `window`
// positions (a paged window layer's table may have given older blocks back: -1 there is never read).
//
// Attention of a query at position i over keys j: causal (j <= i), and with window W > 0 also
// i - j < W. scores = q.k * sm_scale; the per-head sink logit joins the softmax denominator
// (exp(sink - max)) and contributes no value. Softmax in fp32 (exp2 with log2(e) folded in).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

constexpr int kAttnHeadDim = 64;
constexpr int kAttnMinBlockRows = 128;   // paged blocks: at least the largest key tile (prefill, 128 keys)

// Where a sequence's positions are (see above): one per launch, per sequence b.
struct KvLayout {
  const int32_t* block_table;   // [B, table_stride] or null (contiguous)
  int64_t table_stride;
  int block_shift;              // paged: log2 of the block rows
};

// Prefill / chunked prefill / prompt continuation, varlen: sequence b has q_len = cu_seqlens[b+1]
// - cu_seqlens[b] new queries (rows cu_seqlens[b] .. of q) at positions start[b] .. start[b] +
// q_len - 1, attending to cache rows 0 .. start[b] + q_len - 1 of batch row b (already written).
struct AttnPrefillArgs {
  const __nv_bfloat16* q;        // [Ttot, Hq, 64], token stride q_stride (elements)
  const __nv_bfloat16* k_cache;  // [B, max_len, Hkv, 64]
  const __nv_bfloat16* v_cache;
  const float* sinks;            // [Hq] or nullptr (no sinks)
  const int32_t* cu_seqlens;     // [B + 1]
  const int32_t* start;          // [B]
  __nv_bfloat16* out;            // [Ttot, Hq, 64], token stride out_stride
  int64_t q_stride, out_stride;
  int B, Hq, Hkv, max_len, max_q_len, window;
  int total_q;                   // Ttot (rows of q and out)
  float sm_scale;
  KvLayout layout;
};
cudaError_t launch_attn_prefill(const AttnPrefillArgs& a, cudaStream_t stream);

// Decode: one query per sequence (q [B, Hq, 64], token stride q_stride) at position
// seq_lens[b] - 1, over cache rows max(0, seq_lens[b] - window) .. seq_lens[b] - 1 (window 0:
// from 0). Split-KV in one launch: the key range is cut into chunks of `chunk` keys; CTA (s, group,
// b) takes chunk s with `warps` warps (1, 4 or 8; chunk a multiple of 32 * max(2, warps)). With
// several splits each CTA leaves its partial in the workspace and the last CTA of a group (ticket
// counter, left at 0 again) merges them and adds the sink. The grid depends only on B and
// num_splits (not on the lengths), so it replays in CUDA graphs.
// Workspace: ws_o [B, Hq, num_splits, 64] fp32, ws_ml [B, Hq, num_splits, 2] fp32, tickets
// [B * Hkv * ceil(Hq / Hkv / 16)] int32, zero before the launch (and after it).
struct AttnDecodeArgs {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k_cache;
  const __nv_bfloat16* v_cache;
  const float* sinks;
  const int32_t* seq_lens;  // [B], 1 <= seq_lens[b] <= max_len (0: the output row is zero)
  float* ws_o;
  float* ws_ml;
  int32_t* tickets;
  __nv_bfloat16* out;       // [B, Hq, 64], token stride out_stride
  int64_t q_stride, out_stride;
  int B, Hq, Hkv, max_len, window, chunk, num_splits, warps;
  float sm_scale;
  KvLayout layout;
  // seq_lens and every cache row but each sequence's newest were written two or more kernels back
  // in the stream (the model's decode step: the qkv kernel just before writes only q and the
  // newest rows): loads of the older rows may start before the programmatic-launch wait.
  bool kv_ready;
};
cudaError_t launch_attn_decode(const AttnDecodeArgs& a, cudaStream_t stream);

// The decode plan: the chunk, split count and warps a CTA of a decode launch (from B, the heads,
// max_len, the window and the SM count only, so a CUDA graph replays it). The caller passes chunk
// and warps to the launch (attention_decode_plan / attention_decode ops).
void attn_decode_split(int B, int Hq, int Hkv, int max_len, int window, int num_sms, int& chunk, int& num_splits,
                       int& warps);

}  // namespace gptoss
