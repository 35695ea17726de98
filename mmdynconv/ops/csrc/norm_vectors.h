// A batch norm's per-channel vectors, (C,), by plain loops: a tensor op on so
// few values costs about 10 us of dispatch inside the compiled ops.
#pragma once

#include <torch/extension.h>

#include <cmath>

#include "tensor_data.h"

// 1 / sqrt(var + eps).
template <typename T>
at::Tensor inverse_std(const at::Tensor& var, double eps) {
  at::Tensor invstd = at::empty_like(var);
  const T* v = var.data_ptr<T>();
  T* out = invstd.data_ptr<T>();
  for (int64_t c = 0; c < var.numel(); ++c) out[c] = T(1) / std::sqrt(v[c] + static_cast<T>(eps));
  return invstd;
}

// weight * invstd (weight undefined: invstd), so that the norm is
// (maps - mean) * scale + bias.
template <typename T>
at::Tensor norm_scale(const at::Tensor& weight, const at::Tensor& invstd) {
  at::Tensor scale = at::empty_like(invstd);
  const T *gamma = data_or_null<T>(weight), *is = invstd.data_ptr<T>();
  T* sc = scale.data_ptr<T>();
  for (int64_t c = 0; c < invstd.numel(); ++c) sc[c] = gamma ? gamma[c] * is[c] : is[c];
  return scale;
}
