// MoE experts: the plan (which kernel serves a GEMM) and the launch of the planned kernel. The
// kernels live in moe_experts_decode.cu, moe_experts_prefill.cu and moe_experts_prefill_sm90.cu.
#include <algorithm>

#include "kernels/moe_experts.cuh"
#include "kernels/pdl.h"

namespace gptoss {

const char* moe_kernel_name(MoeKernel k) {
  switch (k) {
    case MoeKernel::kDecodePersistent: return "decode_persistent";
    case MoeKernel::kDecodeTiles: return "decode_tiles";
    case MoeKernel::kDecodeTilesSplitK: return "decode_tiles_splitk";
    case MoeKernel::kSmallBatch: return "small_batch";
    case MoeKernel::kPrefillWgmma64: return "prefill_wgmma64";
    case MoeKernel::kPrefillWgmma128: return "prefill_wgmma128";
    case MoeKernel::kPrefillMma: return "prefill_mma";
    case MoeKernel::kPrefillExact: return "prefill_exact";
    default: return nullptr;
  }
}

#ifndef GPTOSS_HAVE_SM90A_KERNELS
bool moe_wgmma_loaded() { return false; }
cudaError_t launch_moe_prefill_wgmma(const MoeGemmArgs&, bool, int, cudaStream_t) { return cudaErrorInvalidValue; }
#endif

MoeDevice moe_current_device() {
  static int sms_of[64] = {0};
  MoeDevice d;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return d;
  if (sms_of[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return d;
    sms_of[dev] = n;
  }
  d.sms = sms_of[dev];
  d.wgmma = moe_wgmma_loaded();
  return d;
}

namespace {

// Pairs an expert on average over the experts that can be non-empty.
int64_t pairs_per_expert(const MoeGemmArgs& a) { return a.P / std::max<int64_t>(1, std::min<int64_t>(a.E, a.P)); }

}  // namespace

const char* moe_kernel_unsupported(MoeKernel k, const MoeGemmArgs& a, const MoeDevice& d) {
  switch (k) {
    case MoeKernel::kDecodePersistent: {
      // one CTA an SM holds at most two work items: needs items <= SMs; the staged rows must fit
      const int64_t items = max_work_items(a.P, a.E, 8);
      if (d.sms <= 0 || items > d.sms) return "needs at most one work item (expert, 8 pairs) an SM";
      if (moe_decode_persistent_smem(a) > kMoeDecodePersistentMaxSmem) return "the staged activations exceed 200 KB";
      if (static_cast<int64_t>(d.sms) * items * (a.R / 16) >= INT32_MAX) return "too many row tiles";
      return nullptr;
    }
    case MoeKernel::kPrefillWgmma64:
    case MoeKernel::kPrefillWgmma128:
      if (!d.wgmma) return "needs an sm_90 GPU and a build with sm_90a (GPTOSS_CUDA_ARCHS)";
      if (a.R % 64 != 0) return "needs R % 64 == 0";
      [[fallthrough]];
    case MoeKernel::kPrefillMma:
      if (a.max_scale > 128) return "folds the scales into 16-bit weights: needs every E8M0 scale byte <= 128";
      return nullptr;
    case MoeKernel::kDecodeTiles:
    case MoeKernel::kDecodeTilesSplitK:
    case MoeKernel::kSmallBatch:
    case MoeKernel::kPrefillExact:
      return nullptr;
    default:
      return "unknown kernel";
  }
}

MoeKernel moe_plan(const MoeGemmArgs& a, const MoeDevice& d) {
  const int64_t per_expert = pairs_per_expert(a);
  if (per_expert <= 8) {
    // From 16 pairs (4 tokens at top-4) the persistent kernel keeps every SM streaming; below, the
    // grid of tiles was faster (H100 20b: T=1 tiles-splitk 29.8 vs persistent ~33 us, T=2 tiles
    // 47.6 vs 49.5, T=4 persistent 77.2 vs tiles 87.1). Tiles split K further when the pairs reach
    // fewer than 8 experts (one token), so the few experts' tiles still cover every SM.
    if (a.P >= 16 && !moe_kernel_unsupported(MoeKernel::kDecodePersistent, a, d)) return MoeKernel::kDecodePersistent;
    return std::min<int64_t>(a.E, a.P) >= 8 ? MoeKernel::kDecodeTiles : MoeKernel::kDecodeTilesSplitK;
  }
  if (a.max_scale <= 128) {
    // 128-token wgmma tiles where experts average >= 128 routed tokens, else 64 (less of a tile
    // wasted on an expert's last few tokens; an expert with <= 32 runs a 32-token tile)
    const MoeKernel wg = per_expert >= 128 ? MoeKernel::kPrefillWgmma128 : MoeKernel::kPrefillWgmma64;
    if (!moe_kernel_unsupported(wg, a, d)) return wg;
    if (per_expert <= 32) return MoeKernel::kSmallBatch;
    return MoeKernel::kPrefillMma;
  }
  return per_expert <= 32 ? MoeKernel::kSmallBatch : MoeKernel::kPrefillExact;
}

namespace {

cudaError_t launch(const MoeGemmArgs& a, bool swiglu, MoeKernel k, cudaStream_t stream) {
  if (a.P == 0) return cudaSuccess;
  if (a.R % kMoeRowMultiple != 0 || a.K % kMoeColMultiple != 0 || a.E < 1 || a.E > kMoeMaxExperts || a.top_k < 1 ||
      a.P > INT32_MAX)
    return cudaErrorInvalidValue;
  const MoeDevice d = moe_current_device();
  if (moe_kernel_unsupported(k, a, d)) return cudaErrorInvalidValue;
  switch (k) {
    case MoeKernel::kDecodePersistent: return launch_moe_decode_persistent(a, swiglu, d.sms, stream);
    case MoeKernel::kDecodeTiles: return launch_moe_decode_tiles(a, swiglu, false, stream);
    case MoeKernel::kDecodeTilesSplitK: return launch_moe_decode_tiles(a, swiglu, true, stream);
    case MoeKernel::kSmallBatch: return launch_moe_small_batch(a, swiglu, stream);
    case MoeKernel::kPrefillWgmma64: return launch_moe_prefill_wgmma(a, swiglu, 64, stream);
    case MoeKernel::kPrefillWgmma128: return launch_moe_prefill_wgmma(a, swiglu, 128, stream);
    case MoeKernel::kPrefillMma: return launch_moe_prefill_mma(a, swiglu, stream);
    case MoeKernel::kPrefillExact: return launch_moe_prefill_exact(a, swiglu, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_moe_mlp1(const MoeGemmArgs& a, MoeKernel k, cudaStream_t stream) { return launch(a, true, k, stream); }
cudaError_t launch_moe_mlp2(const MoeGemmArgs& a, MoeKernel k, cudaStream_t stream) { return launch(a, false, k, stream); }

}  // namespace gptoss
