"""A whole :class:`~mmdynconv.cnn.AIKConv2d` step as one autograd node on
the compiled CPU path: the fused attention generator
(:mod:`.fused_attention`) and the compiled op
(:mod:`mmdynconv.ops.aik_conv2d_cpp`) in one forward and one backward.

One node instead of two saves autograd's per-node cost, hands A's gradient
from the op to the generator directly, and adds the generator's input
gradient into the op's in place, inside the generator's backward pass
(autograd would sum the two into a new tensor). Autograd keeps what the two
nodes would: x, A, the static weight, the generator's local maps and
per-channel vectors.
"""
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mmdynconv.ops.aik_conv2d import ConvGeometry
from mmdynconv.ops.aik_conv2d_cpp import (compiled_backward, compiled_forward,
                                          supports)
from .fused_attention import _backward, _forward, _Stats, fused_params


def geometry(layer: nn.Conv2d, x: Tensor) -> ConvGeometry:
    """The op's geometry of ``layer`` on x (B, C, H, W)."""
    return ConvGeometry(layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups,
                        layer.generator.attn_groups, layer.output_size(x))


def applies(layer: nn.Conv2d, x: Tensor, geo: ConvGeometry) -> bool:
    """Whether :class:`AIKLayerFunction` computes ``layer(x)``: in training
    (gradients on), with the op on its compiled CPU path and a generator
    :mod:`.fused_attention` handles; x of the layer's channels and dtype."""
    return (torch.is_grad_enabled() and x.dim() == 4
            and x.shape[1] == layer.in_channels
            and x.dtype == layer.weight.dtype and supports(x, geo)
            and layer.generator._fusable(x))


class AIKLayerFunction(torch.autograd.Function):
    """``apply(layer.generator, x, weight, bias, geo, *fused_params(gen))``
    -> (B, O, H_out, W_out) in x's layout."""

    @staticmethod
    def forward(ctx, gen, x, weight, bias, geo, *params):
        attn, pooled, local_maps, local_stats, fuse_stats, ctx.args = \
            _forward(gen, x)
        ctx.gen, ctx.geo, ctx.has_bias = gen, geo, bias is not None
        ctx.save_for_backward(x, attn, weight, pooled, local_maps,
                              *local_stats, *fuse_stats)
        return compiled_forward(x, attn, weight, bias, geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, attn, weight, pooled, local_maps, *stats = ctx.saved_tensors
        # the generator's: x and fused_params
        gen_needs = [ctx.needs_input_grad[1], *ctx.needs_input_grad[5:]]
        need_attn = any(gen_needs)
        grad_x, grad_attn, grad_weight, grad_bias = compiled_backward(
            grad_out, x, attn, weight, ctx.has_bias, ctx.geo,
            (gen_needs[0], need_attn, *ctx.needs_input_grad[2:4]))
        gen_grads = [None] * len(gen_needs)
        if need_attn:
            into = grad_x is not None and grad_x.is_contiguous()
            gen_grads = _backward(ctx.gen, x, attn, grad_attn, pooled,
                                  local_maps, _Stats(*stats[:2]),
                                  _Stats(*stats[2:]), ctx.args, gen_needs,
                                  grad_x if into else None)
            if grad_x is not None and not into:
                grad_x.add_(gen_grads[0])
        return (None, grad_x, grad_weight, grad_bias, None,
                *(g if need else None
                  for g, need in zip(gen_grads[1:], gen_needs[1:])))


def aik_layer(layer: nn.Conv2d, x: Tensor, geo: ConvGeometry) -> Tensor:
    """``layer(x)`` through :class:`AIKLayerFunction`."""
    return AIKLayerFunction.apply(layer.generator, x, layer.weight,
                                  layer.bias, geo,
                                  *fused_params(layer.generator))
