// Raw data of a tensor that may be undefined, for the compiled ops' loops.
#pragma once

#include <torch/extension.h>

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
