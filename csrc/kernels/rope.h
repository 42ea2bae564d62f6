// YaRN rotary embedding applied in place to q and k (torch-free launcher).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

// Rotate-halves RoPE in place: for each token t, head h, d < D/2:
//   a = pos[t] * inv_freq[d] (fp64), c = cos(a) * concentration, s = sin(a) * concentration,
//   x1 = x[d], x2 = x[d + D/2];  x[d] = x1 c - x2 s;  x[d + D/2] = x2 c + x1 s   (fp32, bf16 out).
//   q: [T, Hq, D] bf16, heads packed (head stride D), token stride q_stride elements; k likewise.
//   positions: [T] int64. inv_freq: [D/2] fp64 (YaRN, computed once on the host).
//   D % 16 == 0, D <= 256; q, k and their token strides 16-byte aligned.
cudaError_t launch_rope(__nv_bfloat16* q, __nv_bfloat16* k, const int64_t* positions,
                        const double* inv_freq, double concentration, int64_t T, int Hq, int Hkv,
                        int D, int64_t q_stride, int64_t k_stride, cudaStream_t stream);

}  // namespace gptoss
