"""The full-resolution part of the AIK attention generator: a depthwise conv
centred per channel, its batch statistics and the input's spatial mean, in
one pass over x; and its backward through the norm that follows it, which
recomputes the conv, in one pass.

On CPU in float32/float64 the compiled extension ``_depthwise_cpu``
(``csrc/depthwise_context_cpu.cpp``) does each direction in one pass over
NCHW maps; elsewhere (or unbuilt) torch's ops compute the same. These are
plain functions: :mod:`mmdynconv.cnn.fused_attention` differentiates by
hand and calls :func:`depthwise_context_backward` itself.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from . import _depthwise_cpu
except ImportError:  # not built: running from a plain source tree
    _depthwise_cpu = None

AVAILABLE = _depthwise_cpu is not None
Pair = Tuple[int, int]


class DepthwiseContext(NamedTuple):
    """What :func:`depthwise_context` returns."""
    centred: Tensor  # (B, C, H_out, W_out): conv(x) - mean
    mean: Tensor  # (C,): the batch mean of conv(x), or the mean given
    var: Optional[Tensor]  # (C,): biased batch variance; None if mean given
    pooled: Tensor  # (B, C): x's spatial mean


def compiled(x: Tensor) -> bool:
    """Whether the extension handles x."""
    return (AVAILABLE and x.device.type == 'cpu'
            and x.dtype in (torch.float32, torch.float64))


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
        z, mean, var, pooled = _depthwise_cpu.forward(
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
        grad_norm: Tensor, x: Tensor, weight: Tensor, stride: Pair,
        padding: Pair, dilation: Pair, mean: Tensor, scale: Tensor,
        stat: Optional[Tensor], grad_pooled: Optional[Tensor],
        needs: Tuple[bool, bool]) -> List[Optional[Tensor]]:
    """The backward of n = z * scale + bias, z = the depthwise conv of x
    (B, C, H, W) by weight (C, 1, kh, kw) minus mean (mean, scale: (C,)),
    from u = grad_norm (B, C, H_out, W_out), the gradient at n.

    z is recomputed, and the gradient at the conv's output is, per channel,

        g = scale[c] * u + stat[c, 0] * <u, z>_c * z + stat[c, 1] * sum_c(u)

    (sums over the batch and positions; stat (C, 2) or None: a batch norm's
    terms through its batch statistics). grad_pooled (B, C) or None adds the
    pooled mean's gradient to x's.

    Returns:
        [grad_x, grad_weight] (None where needs says not needed) and z
        (B, C, H_out, W_out).
    """
    if compiled(x):
        return _depthwise_cpu.backward(
            grad_norm.contiguous(), x.contiguous(), weight.contiguous(),
            stride, padding, dilation, mean.contiguous(), scale.contiguous(),
            stat if stat is None else stat.contiguous(),
            grad_pooled if grad_pooled is None else grad_pooled.contiguous(),
            *needs)
    z = F.conv2d(x, weight, -mean, stride, padding, dilation, x.shape[1])
    grad_z = grad_norm * scale[:, None, None]
    if stat is not None:
        zu = (grad_norm * z).sum((0, 2, 3))
        u_sum = grad_norm.sum((0, 2, 3))
        grad_z += torch.addcmul((stat[:, 1] * u_sum)[:, None, None], z,
                                (stat[:, 0] * zu)[:, None, None])
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_z, x, weight, None, stride, padding, dilation, False, [0, 0],
        x.shape[1], [needs[0], needs[1], False])
    if needs[0] and grad_pooled is not None:
        grad_x = grad_x + (grad_pooled / x[0, 0].numel())[:, :, None, None]
    return [grad_x, grad_weight, z]
