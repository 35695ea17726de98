"""The compiled CPU path of :func:`aik_conv2d` (``csrc/aik_conv2d_cpu.cpp``).

The output positions of each image are cut into tiles of whole output rows;
per tile the attention-modulated patch matrix (C*K x positions) is built in a
buffer and contracted with the weight by one GEMM that writes the tile's
part of the output in place. Backward, per tile: one GEMM gives the patch
gradient, one fused pass turns it into the attention and input gradients and
rebuilds the patches in its place, which feed one GEMM into the weight gradient. Thin
layers with large maps run small cache-resident tiles in parallel; wide
layers with small maps run the whole batch as one tile with every GEMM on all
threads.
Strided convolutions read the input through its stride phases. Autograd
keeps only (input, attn, weight), as in the torch path.

The extension works on contiguous NCHW tensors; channels_last input is
copied to NCHW and the output returned channels_last.

Covers ``groups == 1`` (any attention groups) in float32 and float64 on CPU
tensors; everything else runs on the torch path (``AIKConv2dFunction``). The
extension is built by ``pip install`` (setup.py); :data:`AVAILABLE` is False
when it was not.
"""
from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import extension
from .aik_conv2d import AIKConv2dFunction, ConvGeometry, in_layout_of

AVAILABLE = extension.cpu is not None
# Elements of one tile's patch matrix (512 KiB in float32: a thread's tile
# buffer stays in its L2 cache); also decides the schedule.
TILE_ELEMENTS = 1 << 17
# Patch-matrix elements below which a pass does not start another thread.
THREAD_ELEMENTS = 1 << 15


def supports(input: Tensor, geo: ConvGeometry) -> bool:
    """Whether the compiled path covers this call."""
    return (AVAILABLE and extension.takes(input) and geo.groups == 1
            and input.numel() > 0)


def _conv_args(geo: ConvGeometry):
    return geo.stride, geo.padding, geo.dilation, TILE_ELEMENTS, THREAD_ELEMENTS


def compiled_forward(input: Tensor, attn: Tensor, weight: Tensor,
                     bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    """The op by the extension (no autograd), in input's layout."""
    out = extension.cpu.aik_forward(input.contiguous(), attn.contiguous(),
                                    weight.contiguous(), *_conv_args(geo))
    if bias is not None:
        out.add_(bias.view(1, -1, 1, 1))
    return in_layout_of(out, input)


def compiled_backward(grad_out: Tensor, input: Tensor, attn: Tensor,
                      weight: Tensor, has_bias: bool, geo: ConvGeometry,
                      needs) -> List[Optional[Tensor]]:
    """Gradients of input (in its layout), attn, weight and bias from that of
    the output; needs: which of the four (None where not)."""
    need_input, need_attn, need_weight, need_bias = needs
    grad_input, grad_attn, grad_weight = extension.cpu.aik_backward(
        grad_out.contiguous(), input.contiguous(), attn.contiguous(),
        weight.contiguous(), *_conv_args(geo), need_input, need_attn,
        need_weight)
    if need_input:
        grad_input = in_layout_of(grad_input, input)
    grad_bias = None
    if has_bias and need_bias:
        grad_bias = grad_out.sum((0, 2, 3))
    return [
        grad_input if need_input else None,
        grad_attn if need_attn else None,
        grad_weight if need_weight else None, grad_bias
    ]


class AIKConv2dCppFunction(torch.autograd.Function):
    """Autograd around the extension; saves only (input, attn, weight)."""

    @staticmethod
    def forward(ctx, input: Tensor, attn: Tensor, weight: Tensor,
                bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
        ctx.geo, ctx.has_bias = geo, bias is not None
        ctx.save_for_backward(input, attn, weight)
        return compiled_forward(input, attn, weight, bias, geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        return (*compiled_backward(grad_out, *ctx.saved_tensors, ctx.has_bias,
                                   ctx.geo, ctx.needs_input_grad[:4]), None)


def aik_conv2d_cpp(input: Tensor, attn: Tensor, weight: Tensor,
                   bias: Optional[Tensor], geo: ConvGeometry) -> Tensor:
    """The compiled path where it applies, else the torch path."""
    if not AVAILABLE:
        raise RuntimeError(
            "impl='cpp' needs the compiled extension mmdynconv.ops._cpu, "
            'which is not built; install mmdynconv with pip (see README)')
    if supports(input, geo):
        return AIKConv2dCppFunction.apply(input, attn, weight, bias, geo)
    return AIKConv2dFunction.apply(input, attn, weight, bias, geo)
