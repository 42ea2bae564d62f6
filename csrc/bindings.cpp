// The one TORCH_LIBRARY of gptoss_ext: every op's schema and its CUDA implementation.
// Outputs are allocated by the Python wrappers in gptoss_ext/ops.py (which also register the
// fake implementations used for tracing and CUDA-graph capture).
#include <torch/library.h>

#include "gptoss_build_info.h"  // generated: torch/CUDA versions, archs, kernels (read by gptoss_ext/_extension.py)
#include "ops/ops.h"

TORCH_LIBRARY(gptoss_ext, m) {
  // out = rms_norm(x) * scale
  m.def("rms_norm(Tensor x, Tensor scale, float eps, Tensor(a!) out) -> ()");
  // residual_out = residual + x; out = rms_norm(residual_out) * scale
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor scale, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
  // YaRN RoPE in place on q [T, Hq, D] and k [T, Hkv, D] at positions [T]
  m.def("rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor inv_freq, float concentration) -> ()");
}

TORCH_LIBRARY_IMPL(gptoss_ext, CUDA, m) {
  m.impl("rms_norm", &gptoss::rms_norm);
  m.impl("add_rms_norm", &gptoss::add_rms_norm);
  m.impl("rope_", &gptoss::rope_);
}
