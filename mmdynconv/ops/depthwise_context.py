"""The full-resolution part of the AIK attention generator: a depthwise conv
centred per channel, its batch statistics and the input's spatial mean, in
one pass over x; and its backward through the norm and the 1*1 projection
that follow it, which recomputes the conv, in one pass.

On CPU in float32/float64 the compiled extension
(``csrc/depthwise_context_cpu.cpp``) does each direction in one pass over
NCHW maps; elsewhere (or unbuilt) torch's ops compute the same. These are
plain functions: :mod:`mmdynconv.cnn.fused_attention` differentiates by
hand and calls :func:`depthwise_context_backward` itself on its torch path;
its compiled path, :mod:`.attention_generator`, runs the compiled passes
from C++.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import extension

AVAILABLE = extension.cpu is not None
Pair = Tuple[int, int]


class DepthwiseContext(NamedTuple):
    """What :func:`depthwise_context` returns."""
    centred: Tensor  # (B, C, H_out, W_out): conv(x) - mean
    mean: Tensor  # (C,): the batch mean of conv(x), or the mean given
    var: Optional[Tensor]  # (C,): biased batch variance; None if mean given
    pooled: Tensor  # (B, C): x's spatial mean


def compiled(x: Tensor) -> bool:
    """Whether the extension handles x."""
    return AVAILABLE and extension.takes(x)


def depthwise_context(x: Tensor,
                      weight: Tensor,
                      stride: Pair,
                      padding: Pair,
                      dilation: Pair,
                      mean: Optional[Tensor] = None) -> DepthwiseContext:
    """z = depthwise conv of x (B, C, H, W) by weight (C, 1, kh, kw), without
    bias, centred by its own batch mean per channel (mean None) or by mean
    (C,); and x's spatial mean (B, C)."""
    if compiled(x):
        z, mean, var, pooled = extension.cpu.depthwise_context_forward(
            x.contiguous(), weight.contiguous(), stride, padding, dilation,
            mean if mean is None else mean.contiguous())
        return DepthwiseContext(z, mean, var, pooled)
    pooled = x.mean((2, 3))
    if mean is not None:
        z = F.conv2d(x, weight, -mean, stride, padding, dilation, x.shape[1])
        return DepthwiseContext(z, mean, None, pooled)
    z = F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])
    var, mean = torch.var_mean(z, (0, 2, 3), correction=0)
    return DepthwiseContext(z - mean[:, None, None], mean, var, pooled)


def depthwise_context_backward(
        grad_local: Tensor,
        proj: Tensor,
        x: Tensor,
        weight: Tensor,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        mean: Tensor,
        scale: Tensor,
        stat: Optional[Tensor],
        grad_pooled: Optional[Tensor],
        needs: Tuple[bool, bool],
        grad_x_into: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """The backward of local = proj @ n, n = z * scale + bias, z = the
    depthwise conv of x (B, C, H, W) by weight (C, 1, kh, kw) minus mean
    (mean, scale: (C,); proj (M, C)), from grad_local (B, M, H_out*W_out).

    z is recomputed, u = proj^T grad_local is the gradient at n, and the
    gradient at the conv's output is, per channel,

        g = scale[c] * u + stat[c, 0] * <u, z>_c * z + stat[c, 1] * sum_c(u)

    (sums over the batch and positions; stat (C, 2) or None: a batch norm's
    terms through its batch statistics). grad_pooled (B, C) or None adds the
    pooled mean's gradient to x's. x's gradient is added to grad_x_into (a
    contiguous tensor of x's shape, returned) when given.

    Returns:
        [grad_x, grad_weight] (None where needs says not needed) and
        cross = sum_b grad_local_b @ z_b^T (M, C), from which proj's
        gradient follows.
    """
    if compiled(x):
        return extension.cpu.depthwise_context_backward(
            grad_local.contiguous(), proj.contiguous(), x.contiguous(),
            weight.contiguous(), stride, padding, dilation,
            mean.contiguous(), scale.contiguous(),
            stat if stat is None else stat.contiguous(),
            grad_pooled if grad_pooled is None else grad_pooled.contiguous(),
            grad_x_into, *needs)
    z_maps = F.conv2d(x, weight, -mean, stride, padding, dilation,
                      x.shape[1])
    z = z_maps.flatten(2)
    u = torch.bmm(proj.t().expand(x.shape[0], -1, -1), grad_local)
    grad_z = u * scale[:, None]
    if stat is not None:
        zu = (u * z).sum((0, 2))
        grad_z += torch.addcmul((stat[:, 1] * u.sum((0, 2)))[:, None], z,
                                (stat[:, 0] * zu)[:, None])
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_z.view_as(z_maps), x, weight, None, stride, padding, dilation,
        False, [0, 0], x.shape[1], [needs[0], needs[1], False])
    if needs[0] and grad_pooled is not None:
        grad_x = grad_x + (grad_pooled / x[0, 0].numel())[:, :, None, None]
    if needs[0] and grad_x_into is not None:
        grad_x = grad_x_into.add_(grad_x)
    cross = torch.bmm(grad_local, z.transpose(1, 2)).sum(0)
    return [grad_x, grad_weight, cross]
