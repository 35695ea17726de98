// Temporaries of the compiled ops kept per calling thread from one call to
// the next.
//
// Memory freshly allocated on every call is paged in afresh on every call
// (glibc hands large freed blocks back to the system): at C = 256, 14x14 the
// op's tile buffers paged in as long as its element-wise passes ran, and a
// layer step at C = 64, 56x56 took about 500 page faults more than the op
// alone, mostly the generator's full-size depthwise output. A slot's tensor
// is used within one call (of an entry point, here or in the functions it
// calls) and never returned to Python. Under torch.jit tracing, which
// records the calls made here, each call allocates its own (a tensor from an
// earlier call is unknown to the trace).
#pragma once

#include <ATen/TracerMode.h>
#include <torch/extension.h>

#include <array>

enum Slot {
  // aik_conv2d_cpu.cpp
  kMatrixBuffers,
  kWeightGradParts,
  kInputPlanes,
  kGradPlanes,
  kColumns,
  kMaskedAttention,
  // attention_generator_cpu.cpp and attention_tail_cpu.cpp
  kCentredContext,
  kGradNorm,
  kGradLocal,
  kSlots
};

// Slot `slot`'s tensor of these sizes (contents undefined).
inline at::Tensor workspace(Slot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (at::tracer::impl::is_dispatch_enabled()) return at::empty(sizes, options);
  thread_local std::array<at::Tensor, kSlots> cache;
  const int64_t numel = c10::multiply_integers(sizes);
  at::Tensor& buffer = cache[slot];
  if (!buffer.defined() || buffer.dtype() != options.dtype() || buffer.numel() < numel) {
    buffer = at::Tensor();  // free the old one first
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel).view(sizes);
}
