"""A lean forward and backward for the attention generator of an AIK
convolution (:class:`~mmdynconv.cnn.AIKAttention`) whose norms are plain
batch norms.

Every map is held per sample as (B, channels, P), P = H_out * W_out (NCHW
with the spatial dims flattened), so that 1*1 convs are batched GEMMs
W @ map; the head's GEMM writes the logits and A as contiguous
(B, G*K, P), the layout the AIK op reads.

The full-resolution part, the depthwise conv z = local_conv(x) centred by
the local norm's mean, that mean, the batch variance and the pooled input
for the global branch, is one pass over x
(:func:`mmdynconv.ops.depthwise_context`, compiled on CPU). The norm is
z * a + beta per channel, a = gamma * invstd, so

    local = (W1 * a) @ z + W1 @ beta,

and the normalised C-channel map is never built. The local maps (B, M, P)
are kept for backward. From their gradient dlocal, one pass per channel
(:func:`mmdynconv.ops.depthwise_context_backward`) recomputes z, forms the
gradient at the norm's output u = W1^T @ dlocal, adds the norm's terms
through its batch statistics (from sum u * z and sum u) and gives the
gradients of x and of the depthwise weight, and

    S = sum_b dlocal_b @ z_b^T (M, C),  dW1 = S * a + (sum dlocal) beta^T,

so that no C-channel map but x's gradient is written.

The tail (fusion, fusion norm, ReLU, head, activation) works on M or fewer
channels and is differentiated by hand from the kept local maps and the
attention itself (which the AIK op keeps anyway).

On CPU the whole generator is one compiled call each way
(:mod:`mmdynconv.ops.attention_generator`, the same algebra in C++);
elsewhere the torch ops below compute it.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mmdynconv.ops import attention_generator
from mmdynconv.ops.depthwise_context import (depthwise_context,
                                            depthwise_context_backward)


def uses_batch_statistics(norm: nn.BatchNorm2d) -> bool:
    """Whether ``norm`` normalises by the batch's statistics (as
    ``nn.BatchNorm2d.forward`` decides)."""
    return norm.training or norm._buffers['running_mean'] is None


def can_fuse(gen: nn.Module, x: Tensor) -> bool:
    """Whether :class:`FusedAttention` computes what ``gen``'s modules do.

    It needs a local branch, plain ``nn.BatchNorm2d`` norms (no subclass such
    as ``SyncBatchNorm``, no other norm), x in float32 or float64 like every
    parameter and buffer, no autocast, no module hooks on the submodules
    (they would not run), and more than one value per channel when batch
    statistics are used (else the module path raises, as ``nn.BatchNorm2d``
    does).
    """
    modules = gen._modules  # see fused_params
    if modules.get('local_conv') is None or x.dim() != 4:
        return False
    if _has_call_hooks(gen):
        return False
    norms = (modules['local_norm'], modules['fuse_norm'])
    if any(type(norm) is not nn.BatchNorm2d for norm in norms):
        return False
    if x.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    # every floating-point parameter and buffer of the generator (listed,
    # not walked: walking the module tree costs more than the check)
    tensors = fused_params(gen)
    for norm in norms:
        tensors += [norm._buffers['running_mean'], norm._buffers['running_var']]
    if any(t is not None and (t.dtype != x.dtype or t.device != x.device)
           for t in tensors):
        return False
    if any(uses_batch_statistics(norm) for norm in norms):
        return x.shape[0] * _local_out_size(gen, x).numel() > 1
    return True


def _has_call_hooks(gen: nn.Module) -> bool:
    """Whether a module call on one of gen's submodules would run hooks
    (forward or backward, global or the submodule's own)."""
    module = nn.modules.module
    if (module._global_forward_hooks or module._global_forward_pre_hooks
            or module._global_backward_hooks
            or module._global_backward_pre_hooks):
        return True
    return any(
        m is not None and (m._forward_hooks or m._forward_pre_hooks
                           or m._backward_hooks or m._backward_pre_hooks)
        for m in gen._modules.values())


def _local_out_size(gen: nn.Module, x: Tensor) -> torch.Size:
    """(H_out, W_out) of the depthwise conv on x."""
    conv = gen.local_conv
    return torch.Size(
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, pad, dil, k, st in zip(x.shape[2:], conv.padding,
                                         conv.dilation, conv.kernel_size,
                                         conv.stride))


def fused_params(gen: nn.Module) -> List[Optional[Tensor]]:
    """The generator's parameters in :class:`FusedAttention`'s order (None
    for the global projection of the local-only context, and for a norm
    without affine parameters).

    Read from the modules' parameter dicts: ``nn.Module`` attribute lookup
    costs about a microsecond a name, thirty times more, and every training
    step reads these twice."""
    modules = gen._modules  # an absent branch's name is not in it
    conv, local_norm, local_proj, global_proj, fuse_norm, head = (
        None if modules.get(name) is None else modules[name]._parameters
        for name in ('local_conv', 'local_norm', 'local_proj', 'global_proj',
                     'fuse_norm', 'head'))
    return [
        conv['weight'], local_norm['weight'], local_norm['bias'],
        local_proj['weight'],
        None if global_proj is None else global_proj['weight'],
        fuse_norm['weight'], fuse_norm['bias'], head['weight'], head['bias']
    ]


# --- batch norm as a per-channel affine map ---------------------------------


class _Stats(NamedTuple):
    """A batch norm's mean and 1 / sqrt(var + eps) in one call, (C,)."""
    mean: Tensor
    invstd: Tensor


def _running_statistics(norm: nn.BatchNorm2d) -> _Stats:
    """The statistics of a norm that uses its running ones (copied: the
    buffers may change before backward)."""
    return _Stats(norm.running_mean.clone(),
                  torch.rsqrt(norm.running_var + norm.eps))


def _centre(norm: nn.BatchNorm2d, maps: Tensor,
            stats: Optional[_Stats] = None) -> Tuple[Tensor, _Stats]:
    """maps (B, C, P) minus the mean ``norm`` normalises them by, and the
    norm's statistics: computed (and the running ones updated) unless
    given."""
    if stats is None and uses_batch_statistics(norm):
        count = maps.numel() // maps.shape[1]
        # two passes, sum then centred squares: torch.var_mean over
        # dims (0, 2) is several times slower on CPU
        mean = maps.sum((0, 2)).div_(count)
        centred = maps - mean[:, None]
        var = (centred * centred).sum((0, 2)).div_(count)
        return centred, _batch_statistics(norm, mean, var, count)
    if stats is None:
        stats = _running_statistics(norm)
    return maps - stats.mean[:, None], stats


def _batch_statistics(norm: nn.BatchNorm2d, mean: Tensor, var: Tensor,
                      count: int) -> _Stats:
    """The statistics of a batch of count values per channel with mean and
    biased variance var (C,).

    Updates the running statistics and ``num_batches_tracked`` exactly as one
    training forward of ``norm`` does (momentum None: cumulative average;
    running_var from the unbiased variance).
    """
    if norm.training and norm.track_running_stats:
        momentum = _momentum(norm)
        norm.running_mean.lerp_(mean, momentum)
        norm.running_var.lerp_(var * (count / (count - 1)), momentum)
    return _Stats(mean, torch.rsqrt(var + norm.eps))


def _momentum(norm: nn.BatchNorm2d) -> float:
    """The running average factor of this training call, counting it."""
    if norm.num_batches_tracked is None:
        return norm.momentum
    norm.num_batches_tracked.add_(1)
    if norm.momentum is None:
        return 1.0 / float(norm.num_batches_tracked)
    return norm.momentum


def _scale(norm: nn.BatchNorm2d, stats: _Stats) -> Tensor:
    """(C,) with norm(maps) = (maps - mean) * scale + bias."""
    if norm.weight is None:
        return stats.invstd
    return norm.weight * stats.invstd


def _normalise(norm: nn.BatchNorm2d, centred: Tensor,
               scale: Tensor) -> Tensor:
    """norm's output from centred maps (B, C, P)."""
    if norm.bias is None:
        return centred * scale[:, None]
    return torch.addcmul(norm.bias[:, None], centred, scale[:, None])


def _statistics_terms(norm: nn.BatchNorm2d, stats: _Stats, scale: Tensor,
                      count: int) -> Optional[Tensor]:
    """A batch norm's backward through its batch statistics, per channel:
    with g the gradient at its output and count values per channel,

        grad_input = g * scale + t[:, 0] * sum(g * (input - mean))
                     * (input - mean) + t[:, 1] * sum(g),

    t (C, 2) returned; None with running statistics, where the terms
    vanish."""
    if not uses_batch_statistics(norm):
        return None
    return torch.stack([scale * stats.invstd.square(), scale], 1).div_(-count)


def _norm_param_grads(norm: nn.BatchNorm2d, stats: _Stats, grad_sum: Tensor,
                      grad_dot: Tensor):
    """The gradients of a batch norm's weight and bias (None without
    affine) from grad_sum = sum g and grad_dot = sum g * (input - mean),
    (C,), g the gradient at its output."""
    if norm.weight is None:
        return None, None
    return grad_dot * stats.invstd, grad_sum


# --- the generator, forward --------------------------------------------------


class _Local(NamedTuple):
    """The local branch of one call: the depthwise conv's output centred by
    the norm's mean (B, C, P), the pooled input (B, C), the norm's
    statistics, scale and bias (C,; None without affine), and local_proj's
    weight W1 (M, C)."""
    centred: Tensor
    pooled: Tensor
    stats: _Stats
    scale: Tensor
    bias: Optional[Tensor]
    weight: Tensor

    def output(self) -> Tensor:
        """local = local_proj(local_norm(z)), (B, M, P)."""
        folded = (self.weight * self.scale).expand(self.centred.shape[0], -1,
                                                   -1)
        if self.bias is None:
            return torch.bmm(folded, self.centred)
        return torch.baddbmm((self.weight @ self.bias)[:, None], folded,
                             self.centred)


def _local(gen: nn.Module, x: Tensor) -> _Local:
    """The local branch on x (B, C, H, W); with batch statistics, the norm's
    running ones are updated."""
    norm, conv = gen.local_norm, gen.local_conv
    batch_stats = uses_batch_statistics(norm)
    stats = None if batch_stats else _running_statistics(norm)
    context = depthwise_context(x, conv.weight, conv.stride, conv.padding,
                                conv.dilation,
                                None if batch_stats else stats.mean)
    centred = context.centred.flatten(2)
    if batch_stats:
        stats = _batch_statistics(norm, context.mean, context.var,
                                  centred.shape[0] * centred.shape[2])
    return _Local(centred, context.pooled, stats, _scale(norm, stats),
                  norm.bias, gen.local_proj.weight.flatten(1))


def _global(gen: nn.Module, pooled: Optional[Tensor]) -> Optional[Tensor]:
    """global_proj of the pooled input (B, C) -> (B, M); None without."""
    if pooled is None:
        return None
    return pooled @ gen.global_proj.weight.flatten(1).t()


def _combine(gen: nn.Module, local: Tensor,
             glob: Optional[Tensor]) -> Tensor:
    """The fusion: local (B, M, P) and glob (B, M) -> (B, M or 2M, P)."""
    if glob is None:
        return local
    glob = glob[:, :, None]
    if gen.fusion == 'add':
        return local + glob
    if gen.fusion == 'mul':
        return local * torch.sigmoid(glob)
    return torch.cat([local, glob.expand_as(local)], dim=1)


class _Tail(NamedTuple):
    """The maps after the local branch, (B, channels, P)."""
    local: Tensor  # (B, M, P)
    glob: Optional[Tensor]  # (B, M)
    centred: Tensor  # the fusion minus the fusion norm's mean, (B, M', P)
    stats: _Stats  # the fusion norm's, (M',)
    scale: Tensor  # the fusion norm's, (M',)
    hidden: Tensor  # relu(fuse_norm(fusion)), (B, M', P)


def _tail(gen: nn.Module, local: Tensor, pooled: Optional[Tensor],
          stats: Optional[_Stats] = None) -> _Tail:
    """Fusion, fusion norm and ReLU on the local maps (B, M, P); the fusion
    norm's statistics are computed (and its running ones updated) unless
    given."""
    norm = gen.fuse_norm
    glob = _global(gen, pooled)
    centred, stats = _centre(norm, _combine(gen, local, glob), stats)
    scale = _scale(norm, stats)
    hidden = _normalise(norm, centred, scale).relu_()
    return _Tail(local, glob, centred, stats, scale, hidden)


def _logits(gen: nn.Module, hidden: Tensor) -> Tensor:
    """The head on hidden maps (B, M', P) -> logits (B, G*K, P)."""
    weight = gen.head.weight.flatten(1).expand(hidden.shape[0], -1, -1)
    return torch.baddbmm(gen.head.bias[:, None], weight, hidden)


def _by_group(t: Tensor, gen: nn.Module) -> Tensor:
    """(B, G*K, P) -> (B, G, K, P) view."""
    return t.view(t.shape[0], gen.attn_groups, -1, t.shape[2])


def _flat(attn: Tensor) -> Tensor:
    """(B, G, K, h, w) -> (B, G*K, h*w); a view for contiguous attn."""
    return attn.reshape(attn.shape[0], attn.shape[1] * attn.shape[2], -1)


def _activate(gen: nn.Module, logits: Tensor) -> Tensor:
    """Head logits -> A, both (B, G*K, P)."""
    if gen.act == 'softmax':
        per_group = _by_group(logits, gen)
        taps = per_group.shape[2]
        return torch.softmax(per_group, dim=2).mul_(taps).view_as(logits)
    attn = torch.sigmoid(logits)
    return attn.mul_(2) if gen.act == '2sigmoid' else attn


def _attention(gen: nn.Module, local_maps: Tensor,
               pooled: Optional[Tensor]) -> Tuple[Tensor, _Stats]:
    """The tail on the local maps (B, M, P): A (B, G*K, P) and the fusion
    norm's statistics (with batch statistics, its running ones updated)."""
    tail = _tail(gen, local_maps, pooled)
    return _activate(gen, _logits(gen, tail.hidden)), tail.stats


def _forward(gen: nn.Module, x: Tensor):
    """(B, C, H, W) -> A (B, G, K, h, w) contiguous, and for backward the
    pooled input (B, C; None without a global branch), the local maps
    (B, M, h*w), the two norms' statistics and, on the compiled path, the
    generator's arguments (None on the torch path)."""
    if attention_generator.compiled(x):
        args = _compiled_args(gen)
        attn, pooled, local_maps, *stats = \
            attention_generator.generator_forward(x, args)
        return (attn, pooled, local_maps, _Stats(*stats[:2]),
                _Stats(*stats[2:]), args)
    local = _local(gen, x)
    pooled = None if gen.global_proj is None else local.pooled
    local_maps = local.output()
    attn, fuse_stats = _attention(gen, local_maps, pooled)
    attn = attn.view(x.shape[0], gen.attn_groups, -1,
                     *_local_out_size(gen, x))
    return attn, pooled, local_maps, local.stats, fuse_stats, None


def _compiled_args(gen: nn.Module) -> attention_generator.GeneratorArgs:
    (local_conv, local_gamma, local_beta, local_proj, global_proj, fuse_gamma,
     fuse_beta, head_weight, head_bias) = fused_params(gen)
    modules = gen._modules
    conv = modules['local_conv']
    return attention_generator.GeneratorArgs(
        local_conv, conv.stride, conv.padding, conv.dilation,
        _norm_args(modules['local_norm'], local_gamma, local_beta),
        local_proj, global_proj, None if global_proj is None else gen.fusion,
        _norm_args(modules['fuse_norm'], fuse_gamma, fuse_beta), head_weight,
        head_bias, gen.act, gen.attn_groups)


def _norm_args(norm: nn.BatchNorm2d, gamma: Optional[Tensor],
               beta: Optional[Tensor]) -> attention_generator.NormArgs:
    buffers = norm._buffers  # see fused_params
    return attention_generator.NormArgs(gamma, beta, buffers['running_mean'],
                                        buffers['running_var'],
                                        buffers['num_batches_tracked'],
                                        norm.momentum, norm.eps,
                                        uses_batch_statistics(norm))


def fused_attention(gen: nn.Module, x: Tensor) -> Tensor:
    """(B, C, H, W) -> A (B, G, K, H_out, W_out), for no-grad forwards."""
    return _forward(gen, x)[0]


# --- the generator, backward -------------------------------------------------


def _activation_backward(gen: nn.Module, attn: Tensor,
                         grad: Tensor) -> Tensor:
    """Gradient at the head logits from A and dA, all (B, G*K, P)."""
    if gen.act == 'softmax':
        per_group = _by_group(attn, gen)
        weighted = grad.view_as(per_group) * per_group
        mean = weighted.mean(2, keepdim=True)
        return weighted.sub_(per_group * mean).view_as(attn)
    # sigmoid' = s (1 - s), with s = A / 2 for 2 * sigmoid
    half = 0.5 if gen.act == '2sigmoid' else 1.0
    return torch.addcmul(attn, attn, attn, value=-half).mul_(grad)


def _combine_backward(gen: nn.Module, tail: _Tail, grad_fused: Tensor):
    """Gradients of local (B, M, P) and glob (B, M; None without) from that
    of the fusion (B, M', P)."""
    if tail.glob is None:
        return grad_fused, None
    if gen.fusion == 'add':
        return grad_fused, grad_fused.sum(2)
    if gen.fusion == 'mul':
        gate = torch.sigmoid(tail.glob)
        grad_local = grad_fused * gate[:, :, None]
        grad_gate = (grad_fused * tail.local).sum(2)
        return grad_local, grad_gate.mul_(gate - gate * gate)
    hidden = tail.glob.shape[1]
    return grad_fused[:, :hidden], grad_fused[:, hidden:].sum(2)


def _tail_backward(gen: nn.Module, tail: _Tail, grad_logits: Tensor):
    """Backward of head(relu(fuse_norm(fusion))) from the gradient of the
    logits (B, G*K, P).

    Returns:
        Gradients of the local maps (B, M, P), of glob (B, M; None without)
        and of the fusion norm's weight and bias and the head's weight and
        bias.
    """
    head_weight = gen.head.weight.flatten(1)
    grad_head = torch.bmm(grad_logits, tail.hidden.transpose(1, 2)).sum(0)
    grad_hidden = torch.bmm(
        head_weight.t().expand(grad_logits.shape[0], -1, -1), grad_logits)
    # the ReLU's backward, from its output
    grad_hidden = torch.ops.aten.threshold_backward(grad_hidden, tail.hidden,
                                                    0)
    grad_sum = grad_hidden.sum((0, 2))
    grad_dot = (grad_hidden * tail.centred).sum((0, 2))
    terms = _statistics_terms(gen.fuse_norm, tail.stats, tail.scale,
                              grad_hidden.numel() // grad_hidden.shape[1])
    grad_fused = grad_hidden.mul_(tail.scale[:, None])
    if terms is not None:
        grad_fused += torch.addcmul((terms[:, 1] * grad_sum)[:, None],
                                    tail.centred,
                                    (terms[:, 0] * grad_dot)[:, None])
    grad_gamma, grad_beta = _norm_param_grads(gen.fuse_norm, tail.stats,
                                              grad_sum, grad_dot)
    grad_local, grad_glob = _combine_backward(gen, tail, grad_fused)
    return (grad_local, grad_glob, grad_gamma, grad_beta,
            grad_head.view_as(gen.head.weight), grad_logits.sum((0, 2)))


def _attention_backward(gen: nn.Module, local_maps: Tensor,
                        pooled: Optional[Tensor], attn: Tensor,
                        grad_attn: Tensor, stats: _Stats):
    """Backward of :func:`_attention` from A and dA (B, G, K, h, w).

    Returns:
        The gradients of the local maps (B, M, P), of glob (B, M; None
        without) and of the fusion norm's weight and bias and the head's
        weight and bias.
    """
    tail = _tail(gen, local_maps, pooled, stats)
    grad_logits = _activation_backward(gen, _flat(attn), _flat(grad_attn))
    return _tail_backward(gen, tail, grad_logits)


def _local_backward(gen: nn.Module, x: Tensor, stats: _Stats,
                    grad_local: Tensor, grad_pooled: Optional[Tensor],
                    needs: List[bool], grad_x_into: Optional[Tensor]):
    """Backward of local = local_proj(local_norm(local_conv(x))) from its
    gradient (B, M, P), and of the pooled input from grad_pooled (B, C; None
    without a global branch); x's gradient is added to grad_x_into when
    given (see :func:`_backward`).

    Returns:
        The gradients of x and of local_conv's weight (None where ``needs``
        says not needed), of the norm's weight and bias (None without
        affine) and of local_proj's weight.
    """
    norm, conv = gen.local_norm, gen.local_conv
    scale = _scale(norm, stats)
    weight = gen.local_proj.weight.flatten(1)
    count = grad_local.numel() // grad_local.shape[1]
    grad_x, grad_dw, cross = depthwise_context_backward(
        grad_local, weight, x, conv.weight, conv.stride, conv.padding,
        conv.dilation, stats.mean, scale,
        _statistics_terms(norm, stats, scale, count), grad_pooled, needs,
        grad_x_into)
    grad_sum = grad_local.sum((0, 2))  # (M,)
    grad_proj = cross * scale
    if norm.bias is not None:
        grad_proj += torch.outer(grad_sum, norm.bias)
    grad_gamma, grad_beta = _norm_param_grads(norm, stats, grad_sum @ weight,
                                              (cross * weight).sum(0))
    return (grad_x, grad_dw, grad_gamma, grad_beta,
            grad_proj.view_as(gen.local_proj.weight))


def _backward(gen: nn.Module, x: Tensor, attn: Tensor, grad_attn: Tensor,
              pooled: Optional[Tensor], local_maps: Tensor,
              local_stats: _Stats, fuse_stats: _Stats,
              args: Optional[attention_generator.GeneratorArgs],
              needs: List[bool], grad_x_into: Optional[Tensor] = None):
    """Gradients of x and of :func:`fused_params`, in that order, from what
    :func:`_forward` returned (args: on the compiled path, the generator's
    arguments of that forward).

    grad_x_into: None, or a contiguous tensor of x's shape and dtype to which
    x's gradient is added in place (and which is returned as it), saving a
    full-size tensor and a pass when x has another gradient already."""
    if args is not None:
        return attention_generator.generator_backward(
            x, attn, grad_attn,
            [pooled, local_maps, *local_stats, *fuse_stats], args, needs[:2],
            grad_x_into)
    (grad_local, grad_glob, grad_fuse_w, grad_fuse_b, grad_head,
     grad_head_b) = _attention_backward(gen, local_maps, pooled, attn,
                                        grad_attn, fuse_stats)
    grad_global = grad_pooled = None
    if grad_glob is not None:
        grad_global = (grad_glob.t() @ pooled).view_as(gen.global_proj.weight)
        grad_pooled = grad_glob @ gen.global_proj.weight.flatten(1)
    return (*_local_backward(gen, x, local_stats, grad_local, grad_pooled,
                             needs[:2], grad_x_into), grad_global, grad_fuse_w,
            grad_fuse_b, grad_head, grad_head_b)


class FusedAttention(torch.autograd.Function):
    """A = the attention map of x, differentiated without keeping any map
    of more than M channels but A itself (which the AIK op keeps anyway).

    ``apply(gen, x, *fused_params(gen))``: the parameters are passed so that
    their gradients flow through this function; backward reads them from gen
    again rather than saving them (they live there anyway).
    """

    @staticmethod
    def forward(ctx, gen, x, *params):
        attn, pooled, local_maps, local_stats, fuse_stats, ctx.args = \
            _forward(gen, x)
        ctx.gen = gen
        ctx.save_for_backward(x, attn, pooled, local_maps, *local_stats,
                              *fuse_stats)
        return attn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_attn):
        x, attn, pooled, local_maps, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        grads = _backward(ctx.gen, x, attn, grad_attn, pooled, local_maps,
                          _Stats(*stats[:2]), _Stats(*stats[2:]), ctx.args,
                          needs)
        return (None, *(g if need else None for g, need in zip(grads, needs)))
