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
// Gluing the compiled passes here rather than in Python saves the
// interpreter's share of a training step (tens of small ops, each a Python
// call), which at ResNet's large maps was as long as the passes themselves.
#include "cpu_ops.h"

namespace {

enum Act : int64_t { kTwoSigmoid = 0, kSigmoid = 1, kSoftmax = 2 };

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

  // weight * invstd, (C,): the norm is (maps - mean) * scale + bias.
  at::Tensor scale(const at::Tensor& invstd) const { return weight.defined() ? weight * invstd : invstd; }

  // The terms through the batch statistics (see tail_backward), (C, 2), for
  // count values per channel; undefined with running statistics.
  at::Tensor statistics_terms(const at::Tensor& scale, const at::Tensor& invstd, int64_t count) const {
    if (!batch_stats) return at::Tensor();
    return at::stack({scale * invstd.square(), scale}, 1).div_(-static_cast<double>(count));
  }

  // The gradients of weight and bias (undefined without affine) from
  // sum(g) and sum(g * centred), g the gradient at the norm's output.
  std::pair<at::Tensor, at::Tensor> param_grads(const at::Tensor& invstd, const at::Tensor& grad_sum,
                                                const at::Tensor& grad_dot) const {
    if (!weight.defined()) return {};
    return {grad_dot * invstd, grad_sum};
  }
};

// A norm's mean and 1 / sqrt(var + eps), (C,).
struct Stats {
  at::Tensor mean, invstd;
};

// The running statistics (copied: the buffers change before backward).
Stats running_statistics(const Norm& norm) {
  return {norm.running_mean.clone(), (norm.running_var + norm.eps).rsqrt()};
}

// The statistics of a batch of count values per channel with this mean and
// biased variance, updating the running ones as one training forward of
// nn.BatchNorm2d does (momentum None: cumulative average; running_var from
// the unbiased variance).
Stats batch_statistics(const Norm& norm, const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  if (norm.running_mean.defined()) {
    double factor = norm.momentum.value_or(0.0);
    if (norm.num_batches_tracked.defined()) {
      norm.num_batches_tracked.add_(1);
      if (!norm.momentum) factor = 1.0 / norm.num_batches_tracked.item<double>();
    }
    norm.running_mean.lerp_(mean, factor);
    norm.running_var.lerp_(var * (static_cast<double>(count) / (count - 1)), factor);
  }
  return {mean, (var + norm.eps).rsqrt()};
}

// A = act(logits), in place on the logits (B, G*K, P).
at::Tensor activate(at::Tensor logits, int64_t act, int64_t groups) {
  if (act == kSoftmax) {
    const at::Tensor per_group = logits.view({logits.size(0), groups, -1, logits.size(2)});
    return at::softmax(per_group, 2).mul_(per_group.size(2)).view_as(logits);
  }
  logits.sigmoid_();
  return act == kTwoSigmoid ? logits.mul_(2) : logits;
}

at::Tensor matrix(const at::Tensor& conv_weight) { return conv_weight.view({conv_weight.size(0), -1}); }

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
  const int64_t batch = x.size(0);

  Stats local = local_norm.batch_stats ? Stats{} : running_statistics(local_norm);
  const std::vector<at::Tensor> context = depthwise_context_forward(
      x, local_conv.contiguous(), stride, padding, dilation,
      local_norm.batch_stats ? std::nullopt : std::optional<at::Tensor>(local.mean));
  const at::Tensor& z = context[0];
  const at::Tensor centred = z.view({batch, z.size(1), -1});
  const int64_t count = batch * centred.size(2);
  if (local_norm.batch_stats) local = batch_statistics(local_norm, context[1], context[2], count);

  const at::Tensor proj = matrix(local_proj);
  const at::Tensor folded = (proj * local_norm.scale(local.invstd)).expand({batch, -1, -1});
  const at::Tensor local_maps = local_norm.bias.defined()
                                    ? at::baddbmm(at::mv(proj, local_norm.bias).unsqueeze(1), folded, centred)
                                    : at::bmm(folded, centred);

  at::Tensor pooled, glob;
  if (global_proj.has_value()) {
    pooled = context[3];
    glob = at::mm(pooled, matrix(*global_proj).t());
  }
  Stats fuse = fuse_norm.batch_stats ? Stats{} : running_statistics(fuse_norm);
  const std::vector<at::Tensor> tail = tail_forward(
      local_maps, glob.defined() ? std::optional<at::Tensor>(glob) : std::nullopt, fusion,
      fuse_norm.batch_stats ? std::nullopt : std::optional<at::Tensor>(fuse.mean),
      fuse_norm.batch_stats ? std::nullopt : std::optional<at::Tensor>(fuse.invstd), fuse_norm.weight,
      fuse_norm.bias, fuse_norm.eps, matrix(head_weight), head_bias);
  if (fuse_norm.batch_stats) fuse = batch_statistics(fuse_norm, tail[1], tail[2], count);

  const at::Tensor attn = activate(tail[0], act, groups).view({batch, groups, -1, z.size(2), z.size(3)});
  return {attn, pooled, local_maps, local.mean, local.invstd, fuse.mean, fuse.invstd};
}

// The backward of generator_forward from A and dA (B, G, K, H_out, W_out),
// with what it returned after A and the same parameters and options. x's gradient is
// added to grad_x_into (contiguous, x's shape) when given.
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
  const int64_t batch = local_maps.size(0), count = batch * local_maps.size(2);
  const at::Tensor flat_attn = attn.reshape({batch, -1, local_maps.size(2)});
  const at::Tensor flat_grad = grad_attn.contiguous().view_as(flat_attn);

  at::Tensor glob;
  if (global_proj.has_value()) glob = at::mm(*pooled, matrix(*global_proj).t());
  const at::Tensor fuse_scale = fuse_norm.scale(fuse_invstd);
  const at::Tensor fuse_terms = fuse_norm.statistics_terms(fuse_scale, fuse_invstd, count);
  const std::vector<at::Tensor> tail = tail_backward(
      local_maps, glob.defined() ? std::optional<at::Tensor>(glob) : std::nullopt, fusion, fuse_mean, fuse_scale,
      fuse_terms.defined() ? std::optional<at::Tensor>(fuse_terms) : std::nullopt, fuse_norm.bias,
      matrix(head_weight), flat_attn.contiguous(), flat_grad, act, groups);
  const at::Tensor &grad_local = tail[0], &grad_glob = tail[1];
  const auto [grad_fuse_weight, grad_fuse_bias] = fuse_norm.param_grads(fuse_invstd, tail[2], tail[3]);

  at::Tensor grad_global, grad_pooled;
  if (global_proj.has_value()) {
    grad_global = at::mm(grad_glob.t(), *pooled).view_as(*global_proj);
    grad_pooled = at::mm(grad_glob, matrix(*global_proj));
  }

  const at::Tensor proj = matrix(local_proj);
  const at::Tensor local_scale = local_norm.scale(local_invstd);
  const at::Tensor local_terms = local_norm.statistics_terms(local_scale, local_invstd, count);
  const std::vector<at::Tensor> dw = depthwise_context_backward(
      grad_local, proj, x, local_conv.contiguous(), stride, padding, dilation, local_mean, local_scale,
      local_terms.defined() ? std::optional<at::Tensor>(local_terms) : std::nullopt,
      grad_pooled.defined() ? std::optional<at::Tensor>(grad_pooled) : std::nullopt, grad_x_into, need_x,
      need_local_conv);
  const at::Tensor& cross = dw[2];  // sum_b grad_local_b z_b^T, (M, C)
  const at::Tensor grad_sum = grad_local.sum({0, 2});
  at::Tensor grad_proj = cross * local_scale;
  if (local_norm.bias.defined()) grad_proj.add_(at::outer(grad_sum, local_norm.bias));
  const auto [grad_local_weight, grad_local_bias] =
      local_norm.param_grads(local_invstd, at::mv(proj.t(), grad_sum), (cross * proj).sum(0));

  return {dw[0],
          dw[1],
          grad_local_weight,
          grad_local_bias,
          grad_proj.view_as(local_proj),
          grad_global,
          grad_fuse_weight,
          grad_fuse_bias,
          tail[4].view_as(head_weight),
          tail[5]};
}
