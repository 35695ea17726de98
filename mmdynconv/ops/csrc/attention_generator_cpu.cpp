// The AIK attention generator on CPU, one call each way (see
// attention_generator.py; the torch path in cnn/fused_attention.py computes
// the same with the same algebra):
//
//   forward:  the depthwise pass (z = local_conv(x) centred, its batch
//             statistics, the pooled input), the local norm folded into
//             the local projection (local = (W1 * scale) z + W1 beta),
//             the global projection of the pooled input, the tail (fusion,
//             fusion norm, ReLU, head), the activation, and both norms'
//             running statistics as nn.BatchNorm2d updates them;
//   backward: the tail through the activation, the global projection, the
//             depthwise pass through the local norm and projection, and
//             every parameter's gradient.
//
// Gluing the compiled passes here, and doing the per-channel algebra in
// plain loops rather than in tens of small tensor ops, saves most of what a
// step spent outside the passes: each small op, from Python or from here,
// costs microseconds of dispatch and allocation.
#include <cmath>
#include <vector>

#include "blas.h"
#include "cpu_ops.h"
#include "norm_vectors.h"
#include "tensor_data.h"

namespace {

// A batch norm as NormArgs gives it (undefined tensors where None).
struct Norm {
  at::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
  std::optional<double> momentum;
  double eps;
  bool batch_stats;

  explicit Norm(const NormArgs& args)
      : weight(std::get<0>(args).value_or(at::Tensor())),
        bias(std::get<1>(args).value_or(at::Tensor())),
        running_mean(std::get<2>(args).value_or(at::Tensor())),
        running_var(std::get<3>(args).value_or(at::Tensor())),
        num_batches_tracked(std::get<4>(args).value_or(at::Tensor())),
        momentum(std::get<5>(args)),
        eps(std::get<6>(args)),
        batch_stats(std::get<7>(args)) {}
};

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A norm's mean and 1 / sqrt(var + eps), (C,).
struct Stats {
  at::Tensor mean, invstd;
};

// The running statistics (copied: the buffers change before backward).
template <typename T>
Stats running_statistics(const Norm& norm) {
  return {norm.running_mean.clone(), inverse_std<T>(norm.running_var, norm.eps)};
}

// Updates the norm's running statistics, if it keeps them, from a batch of
// count values per channel with this mean and biased variance, as one
// training forward of nn.BatchNorm2d does (momentum None: cumulative
// average; running_var from the unbiased variance).
template <typename T>
void update_running_statistics(const Norm& norm, const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  if (!norm.running_mean.defined()) return;
  double factor = norm.momentum.value_or(0.0);
  if (norm.num_batches_tracked.defined()) {
    int64_t& batches = *norm.num_batches_tracked.data_ptr<int64_t>();
    ++batches;
    if (!norm.momentum) factor = 1.0 / static_cast<double>(batches);
  }
  const T f = static_cast<T>(factor), unbiased = static_cast<T>(double(count) / double(count - 1));
  const T *m = mean.data_ptr<T>(), *v = var.data_ptr<T>();
  T *running_mean = norm.running_mean.data_ptr<T>(), *running_var = norm.running_var.data_ptr<T>();
  for (int64_t c = 0; c < mean.numel(); ++c) {
    running_mean[c] += f * (m[c] - running_mean[c]);
    running_var[c] += f * (v[c] * unbiased - running_var[c]);
  }
}

// The terms of the norm's backward through its batch statistics (see
// tail_backward), (C, 2), for count values per channel; undefined with
// running statistics.
template <typename T>
at::Tensor statistics_terms(const Norm& norm, const at::Tensor& scale, const at::Tensor& invstd, int64_t count) {
  if (!norm.batch_stats) return at::Tensor();
  at::Tensor terms = at::empty({invstd.numel(), 2}, invstd.options());
  const T *sc = scale.data_ptr<T>(), *is = invstd.data_ptr<T>();
  T* tm = terms.data_ptr<T>();
  for (int64_t c = 0; c < invstd.numel(); ++c) {
    tm[2 * c] = -sc[c] * is[c] * is[c] / static_cast<T>(count);
    tm[2 * c + 1] = -sc[c] / static_cast<T>(count);
  }
  return terms;
}

// rows (R, K) @ columns^T, columns (N, K) -> (R, N); small (R, N), plain
// loops.
template <typename T>
void rows_times_transposed(const T* rows, const T* columns, int64_t R, int64_t N, int64_t K, T* out) {
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += rows[r * K + k] * columns[n * K + k];
      out[r * N + n] = acc;
    }
  }
}

// The global vectors pooled (B, C) @ global_proj^T -> (B, M).
template <typename T>
at::Tensor global_vectors(const at::Tensor& pooled, const at::Tensor& global_proj) {
  const int64_t B = pooled.size(0), C = pooled.size(1), M = global_proj.size(0);
  at::Tensor glob = at::empty({B, M}, pooled.options());
  rows_times_transposed(pooled.data_ptr<T>(), global_proj.data_ptr<T>(), B, M, C, glob.data_ptr<T>());
  return glob;
}

// local = local_proj(norm(z)) = (W1 * scale) @ centred + W1 @ beta per
// sample, centred (B, C, P) -> (B, M, P).
template <typename T>
at::Tensor local_maps(const at::Tensor& centred, const at::Tensor& proj, const at::Tensor& scale,
                      const at::Tensor& beta) {
  const int64_t B = centred.size(0), C = centred.size(1), P = centred.size(2), M = proj.size(0);
  const T *w = proj.data_ptr<T>(), *sc = scale.data_ptr<T>(), *bias = data_or_null<T>(beta);
  std::vector<T> folded(M * C), offset(M, T(0));
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      folded[m * C + c] = w[m * C + c] * sc[c];
      if (bias) offset[m] += w[m * C + c] * bias[c];
    }
  }
  at::Tensor maps = at::empty({B, M, P}, centred.options());
  T* out = maps.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) std::fill_n(out + (b * M + m) * P, P, offset[m]);
    gemm<T>(false, false, M, P, C, folded.data(), C, centred.data_ptr<T>() + b * C * P, P, 1, out + b * M * P, P);
  }
  return maps;
}

// A = K * softmax over each group's K taps of the logits (B, G*K, P).
at::Tensor tap_softmax(const at::Tensor& logits, int64_t groups) {
  const at::Tensor per_group = logits.view({logits.size(0), groups, -1, logits.size(2)});
  return at::softmax(per_group, 2).mul_(per_group.size(2)).view_as(logits);
}

at::Tensor matrix(const at::Tensor& conv_weight) { return conv_weight.view({conv_weight.size(0), -1}); }

template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& local_conv, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, const Norm& local_norm,
                                     const at::Tensor& local_proj, const std::optional<at::Tensor>& global_proj,
                                     int64_t fusion, const Norm& fuse_norm, const at::Tensor& head_weight,
                                     const at::Tensor& head_bias, int64_t act, int64_t groups) {
  const int64_t batch = x.size(0);
  Stats local = local_norm.batch_stats ? Stats{} : running_statistics<T>(local_norm);
  const std::vector<at::Tensor> context =
      depthwise_context_forward_scratch(x, local_conv.contiguous(), stride, padding, dilation,
                                        local_norm.batch_stats ? std::nullopt : optional(local.mean));
  const at::Tensor& z = context[0];
  const at::Tensor centred = z.view({batch, z.size(1), -1});
  const int64_t count = batch * centred.size(2);
  if (local_norm.batch_stats) {
    update_running_statistics<T>(local_norm, context[1], context[2], count);
    local = {context[1], inverse_std<T>(context[2], local_norm.eps)};
  }
  const at::Tensor maps = local_maps<T>(centred, matrix(local_proj), norm_scale<T>(local_norm.weight, local.invstd),
                                        local_norm.bias);

  at::Tensor pooled, glob;
  if (global_proj.has_value()) {
    pooled = context[3];
    glob = global_vectors<T>(pooled, matrix(*global_proj));
  }
  Stats fuse = fuse_norm.batch_stats ? Stats{} : running_statistics<T>(fuse_norm);
  const std::vector<at::Tensor> tail =
      tail_forward(maps, optional(glob), fusion, optional(fuse.mean), optional(fuse.invstd), fuse_norm.weight,
                   fuse_norm.bias, fuse_norm.eps, matrix(head_weight), head_bias, act);
  if (fuse_norm.batch_stats) {
    update_running_statistics<T>(fuse_norm, tail[1], tail[2], count);
    fuse = {tail[1], tail[3]};  // the invstd the tail normalised with
  }

  // the tail applied the sigmoids
  const at::Tensor activated = act == kSoftmax ? tap_softmax(tail[0], groups) : tail[0];
  const at::Tensor attn = activated.view({batch, groups, -1, z.size(2), z.size(3)});
  return {attn, pooled, maps, local.mean, local.invstd, fuse.mean, fuse.invstd};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& x, const at::Tensor& attn, const at::Tensor& grad_attn,
                                      const std::optional<at::Tensor>& pooled, const at::Tensor& maps,
                                      const Stats& local, const Stats& fuse, const at::Tensor& local_conv,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      const Norm& local_norm, const at::Tensor& local_proj,
                                      const std::optional<at::Tensor>& global_proj, int64_t fusion,
                                      const Norm& fuse_norm, const at::Tensor& head_weight, int64_t act,
                                      int64_t groups, bool need_x, bool need_local_conv,
                                      const std::optional<at::Tensor>& grad_x_into) {
  const int64_t B = maps.size(0), M = maps.size(1), P = maps.size(2), C = x.size(1), count = B * P;
  const at::Tensor flat_attn = attn.view({B, -1, P});

  at::Tensor glob;
  if (global_proj.has_value()) glob = global_vectors<T>(*pooled, matrix(*global_proj));
  const at::Tensor fuse_scale = norm_scale<T>(fuse_norm.weight, fuse.invstd);
  const at::Tensor fuse_terms = statistics_terms<T>(fuse_norm, fuse_scale, fuse.invstd, count);
  const std::vector<at::Tensor> tail =
      tail_backward(maps, optional(glob), fusion, fuse.mean, fuse_scale, optional(fuse_terms),
                    fuse_norm.bias, matrix(head_weight), flat_attn, grad_attn.contiguous().view_as(flat_attn), act,
                    groups);
  const at::Tensor &grad_maps = tail[0], &grad_glob = tail[1];

  // the fusion norm's parameters: d gamma = sum(dN * centred) * invstd
  // (the product norm_scale forms), d beta = sum(dN)
  at::Tensor grad_fuse_weight, grad_fuse_bias;
  if (fuse_norm.weight.defined()) {
    grad_fuse_weight = norm_scale<T>(tail[3], fuse.invstd);
    grad_fuse_bias = tail[2];
  }

  // glob = pooled @ Wg^T: d Wg = d glob^T @ pooled, d pooled = d glob @ Wg
  at::Tensor grad_global, grad_pooled;
  if (global_proj.has_value()) {
    grad_global = at::empty(global_proj->sizes(), x.options());
    grad_pooled = at::empty({B, C}, x.options());
    const T *dg = grad_glob.data_ptr<T>(), *pd = pooled->data_ptr<T>(), *wg = global_proj->data_ptr<T>();
    T *dwg = grad_global.data_ptr<T>(), *dp = grad_pooled.data_ptr<T>();
    std::fill_n(dwg, M * C, T(0));
    std::fill_n(dp, B * C, T(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t m = 0; m < M; ++m) {
        const T g = dg[b * M + m];
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          dwg[m * C + c] += g * pd[b * C + c];
          dp[b * C + c] += g * wg[m * C + c];
        }
      }
    }
  }

  const at::Tensor proj = matrix(local_proj);
  const at::Tensor local_scale = norm_scale<T>(local_norm.weight, local.invstd);
  const at::Tensor local_terms = statistics_terms<T>(local_norm, local_scale, local.invstd, count);
  const std::vector<at::Tensor> dw = depthwise_context_backward(
      grad_maps, proj, x, local_conv.contiguous(), stride, padding, dilation, local.mean, local_scale,
      optional(local_terms), optional(grad_pooled), grad_x_into, need_x, need_local_conv);

  // local = W1 @ (centred * scale + beta), with cross = sum_b dlocal_b
  // centred_b^T (M, C) and dsum = sum dlocal (M,): d W1 = cross * scale +
  // dsum beta^T, d gamma = sum_m cross * W1 * invstd, d beta = W1^T dsum
  std::vector<T> grad_sum(M, T(0));
  const T* gm = grad_maps.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t m = 0; m < M; ++m) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t p = 0; p < P; ++p) acc += gm[(b * M + m) * P + p];
      grad_sum[m] += acc;
    }
  }
  const T *cross = dw[2].data_ptr<T>(), *w = proj.data_ptr<T>(), *sc = local_scale.data_ptr<T>();
  const T *beta = data_or_null<T>(local_norm.bias), *is = local.invstd.data_ptr<T>();
  at::Tensor grad_proj = at::empty(local_proj.sizes(), x.options());
  T* dproj = grad_proj.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      dproj[m * C + c] = cross[m * C + c] * sc[c] + (beta ? grad_sum[m] * beta[c] : T(0));
    }
  }
  at::Tensor grad_local_weight, grad_local_bias;
  if (local_norm.weight.defined()) {
    grad_local_weight = at::zeros({C}, x.options());
    grad_local_bias = at::zeros({C}, x.options());
    T *dgamma = grad_local_weight.data_ptr<T>(), *dbeta = grad_local_bias.data_ptr<T>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < C; ++c) {
        dgamma[c] += cross[m * C + c] * w[m * C + c];
        dbeta[c] += w[m * C + c] * grad_sum[m];
      }
    }
    for (int64_t c = 0; c < C; ++c) dgamma[c] *= is[c];
  }

  return {dw[0],           dw[1],         grad_local_weight, grad_local_bias, grad_proj, grad_global,
          grad_fuse_weight, grad_fuse_bias, tail[4].view_as(head_weight), tail[5]};
}

void check_generator_dtypes(const at::Tensor& x, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.defined() || (t.scalar_type() == x.scalar_type() && t.is_contiguous()),
                "the generator's parameters and buffers must be contiguous and of x's dtype");
  }
}

}  // namespace

// x (B, C, H, W) and the generator's parameters as the modules hold them
// (local_conv (C, 1, kh, kw), local_proj (M, C, 1, 1), global_proj
// (M, C, 1, 1) or None, head weight (G*K, M', 1, 1) and bias) ->
// [A (B, G, K, H_out, W_out), pooled input (B, C; undefined without
// global_proj), local maps (B, M, H_out*W_out), the local and the fusion
// norm's mean and invstd]. With batch statistics the running ones are
// updated.
std::vector<at::Tensor> generator_forward(const at::Tensor& input, const at::Tensor& local_conv, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          const NormArgs& local_norm_args, const at::Tensor& local_proj,
                                          const std::optional<at::Tensor>& global_proj, int64_t fusion,
                                          const NormArgs& fuse_norm_args, const at::Tensor& head_weight,
                                          const at::Tensor& head_bias, int64_t act, int64_t groups) {
  const Norm local_norm(local_norm_args), fuse_norm(fuse_norm_args);
  const at::Tensor x = input.contiguous();
  check_generator_dtypes(x, {local_proj, global_proj.value_or(at::Tensor()), local_norm.weight, local_norm.bias,
                             local_norm.running_mean, local_norm.running_var, fuse_norm.weight, fuse_norm.bias,
                             fuse_norm.running_mean, fuse_norm.running_var});
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "generator_forward", [&] {
    result = forward_impl<scalar_t>(x, local_conv, stride, padding, dilation, local_norm, local_proj, global_proj,
                                    fusion, fuse_norm, head_weight, head_bias, act, groups);
  });
  return result;
}

// The backward of generator_forward from A and dA (B, G, K, H_out, W_out),
// with what it returned after A and the same parameters and options. x's
// gradient is added to grad_x_into (contiguous, x's shape) when given.
// -> [grad_x, and the gradients of local_conv, the local norm's weight and
// bias, local_proj, global_proj, the fusion norm's weight and bias, the
// head's weight and bias], undefined where a parameter is None or (x,
// local_conv) not needed.
std::vector<at::Tensor> generator_backward(
    const at::Tensor& input, const at::Tensor& attn, const at::Tensor& grad_attn, const std::optional<at::Tensor>& pooled,
    const at::Tensor& local_maps, const at::Tensor& local_mean, const at::Tensor& local_invstd,
    const at::Tensor& fuse_mean, const at::Tensor& fuse_invstd, const at::Tensor& local_conv, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, const NormArgs& local_norm_args, const at::Tensor& local_proj,
    const std::optional<at::Tensor>& global_proj, int64_t fusion, const NormArgs& fuse_norm_args,
    const at::Tensor& head_weight, const at::Tensor& /*head_bias: not read*/, int64_t act, int64_t groups,
    bool need_x, bool need_local_conv, const std::optional<at::Tensor>& grad_x_into) {
  const Norm local_norm(local_norm_args), fuse_norm(fuse_norm_args);
  const at::Tensor x = input.contiguous();
  check_generator_dtypes(x, {attn, local_maps, pooled.value_or(at::Tensor()), local_proj,
                             global_proj.value_or(at::Tensor()), local_norm.weight, local_norm.bias, fuse_norm.weight,
                             fuse_norm.bias, local_mean, local_invstd, fuse_mean, fuse_invstd});
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "generator_backward", [&] {
    result = backward_impl<scalar_t>(x, attn, grad_attn, pooled, local_maps, {local_mean, local_invstd},
                                     {fuse_mean, fuse_invstd}, local_conv, stride, padding, dilation, local_norm,
                                     local_proj, global_proj, fusion, fuse_norm, head_weight, act, groups, need_x,
                                     need_local_conv, grad_x_into);
  });
  return result;
}
