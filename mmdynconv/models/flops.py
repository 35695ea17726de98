"""Counting AIK convolutions with mmengine's FlopAnalyzer.

mmengine traces a model with ``torch.jit`` and counts each graph node with a
handle chosen by its kind. ``aik_conv2d``'s autograd functions appear as
``prim::PythonOp`` nodes, which have no default handle and would count zero.
"""
from typing import Any, List

from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import (elementwise_flop_counter, get_shape)
from torch import nn

# the torch, compiled-CPU and Triton autograd functions
AIK_CONV_OPS = ('prim::PythonOp.AIKConv2dFunction',
                'prim::PythonOp.AIKConv2dCppFunction',
                'prim::PythonOp.AIKConv2dTriton')


def aik_conv_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Multiply-adds of one AIK convolution ``(input, attn, weight, ...)``:

        B*O*H_out*W_out*(C/groups)*K   aggregation (the static convolution's)
      + B*C*K*H_out*W_out              modulation (one multiply per input
                                       channel, kernel tap, output position)

    for input (B, C, H, W), weight (O, C/groups, kh, kw), K = kh*kw and
    output (B, O, H_out, W_out).
    """
    batch, channels = get_shape(inputs[0])[:2]
    out_channels, group_channels, kh, kw = get_shape(inputs[2])
    out_h, out_w = get_shape(outputs[0])[2:]
    windows = batch * out_h * out_w * kh * kw
    return windows * (out_channels * group_channels + channels)


def aik_flop_analyzer(model: nn.Module, inputs) -> FlopAnalyzer:
    """mmengine's FlopAnalyzer that also counts AIK convolutions and the
    global average pooling of their attention generators (``aten::mean``,
    counted as ``aten::adaptive_avg_pool2d`` is: one add per input value)."""
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**{op: aik_conv_flop_jit
                              for op in AIK_CONV_OPS},
                           **{'aten::mean': elementwise_flop_counter(1, 0)})
    return analyzer
