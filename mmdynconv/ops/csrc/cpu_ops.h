// The entry points of the compiled CPU extension mmdynconv.ops._cpu, one
// source file each (bindings.cpp exposes them to Python).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

// The generator's options as attention_generator.py codes them (FUSIONS,
// ACTIVATIONS).
enum Fusion : int64_t { kNone = 0, kAdd = 1, kMul = 2, kCat = 3 };
enum Act : int64_t { kTwoSigmoid = 0, kSigmoid = 1, kSoftmax = 2 };

// aik_conv2d_cpu.cpp: the AIK convolution (groups == 1).
at::Tensor aik_forward(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& weight,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t tile_elements, int64_t thread_elements);
std::vector<at::Tensor> aik_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& attn, const at::Tensor& weight,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t tile_elements,
                                     int64_t thread_elements, bool need_input, bool need_attn, bool need_weight);

// depthwise_context_cpu.cpp: the generator's full-resolution pass.
std::vector<at::Tensor> depthwise_context_forward(const at::Tensor& x, const at::Tensor& weight,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation,
                                                  const std::optional<at::Tensor>& given_mean);
// The same with z in a workspace (workspace.h): valid until the calling
// thread's next call, for callers that use it within their own call.
std::vector<at::Tensor> depthwise_context_forward_scratch(const at::Tensor& x, const at::Tensor& weight,
                                                          at::IntArrayRef stride, at::IntArrayRef padding,
                                                          at::IntArrayRef dilation,
                                                          const std::optional<at::Tensor>& given_mean);
std::vector<at::Tensor> depthwise_context_backward(
    const at::Tensor& grad_local, const at::Tensor& proj, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& mean,
    const at::Tensor& scale, const std::optional<at::Tensor>& stat, const std::optional<at::Tensor>& grad_pooled,
    const std::optional<at::Tensor>& grad_x_into, bool need_input, bool need_weight);

// attention_tail_cpu.cpp: the generator's tail (fusion, fusion norm, ReLU,
// head, and the sigmoid activations; the backward through any activation).
std::vector<at::Tensor> tail_forward(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                     int64_t fusion, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& invstd,
                                     const at::Tensor& gamma, const at::Tensor& beta, double eps,
                                     const at::Tensor& weight, const at::Tensor& bias, int64_t act);
std::vector<at::Tensor> tail_backward(const at::Tensor& local, const std::optional<at::Tensor>& glob,
                                      int64_t fusion, const at::Tensor& mean, const at::Tensor& scale,
                                      const std::optional<at::Tensor>& stat_terms,
                                      const at::Tensor& beta, const at::Tensor& weight,
                                      const at::Tensor& attn, const at::Tensor& grad_attn, int64_t act,
                                      int64_t groups);

// attention_generator_cpu.cpp: the whole generator, one call each way.
// A batch norm as Python passes it: weight, bias, running_mean, running_var,
// num_batches_tracked (None where the norm has none), momentum (None:
// cumulative average), eps, and whether it normalises by the batch's
// statistics.
using NormArgs = std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                            std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<double>, double,
                            bool>;
std::vector<at::Tensor> generator_forward(const at::Tensor& input, const at::Tensor& local_conv, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          const NormArgs& local_norm, const at::Tensor& local_proj,
                                          const std::optional<at::Tensor>& global_proj, int64_t fusion,
                                          const NormArgs& fuse_norm, const at::Tensor& head_weight,
                                          const at::Tensor& head_bias, int64_t act, int64_t groups);
std::vector<at::Tensor> generator_backward(
    const at::Tensor& input, const at::Tensor& attn, const at::Tensor& grad_attn, const std::optional<at::Tensor>& pooled,
    const at::Tensor& local_maps, const at::Tensor& local_mean, const at::Tensor& local_invstd,
    const at::Tensor& fuse_mean, const at::Tensor& fuse_invstd, const at::Tensor& local_conv, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const NormArgs& local_norm, const at::Tensor& local_proj,
    const std::optional<at::Tensor>& global_proj, int64_t fusion, const NormArgs& fuse_norm,
    const at::Tensor& head_weight, const at::Tensor& head_bias, int64_t act, int64_t groups, bool need_x,
    bool need_local_conv, const std::optional<at::Tensor>& grad_x_into);
