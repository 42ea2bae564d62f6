// Host wrappers: check arguments, guard the device, launch on the current stream.
#pragma once
#include <ATen/core/Tensor.h>

namespace gptoss {

void rms_norm(const at::Tensor& x, const at::Tensor& scale, double eps, at::Tensor& out);
void add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& scale, double eps,
                  at::Tensor& out, at::Tensor& residual_out);
void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& positions, const at::Tensor& inv_freq,
           double concentration);

}  // namespace gptoss
