"""FLOP counting of AIK convolutions against hand counts, and the
``tools/analysis/get_flops.py`` comparison on ResNet-18."""
import importlib.util
from pathlib import Path

import pytest
import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn

from mmdynconv.cnn import AIKConv2d
from mmdynconv.models.backbones import AIKResNet
from mmdynconv.models.flops import AIK_CONV_OPS, aik_flop_analyzer
from mmdynconv.ops import aik_conv2d

REPO = Path(__file__).resolve().parents[2]


def aik_op_counts(analyzer):
    """FlopAnalyzer's counts of the AIK autograd functions, by name."""
    return {op: count for op, count in analyzer.by_operator().items()
            if f'prim::{op}' in AIK_CONV_OPS}


class AIKOp(nn.Module):
    """aik_conv2d alone, with the attention given."""

    def __init__(self, in_channels, out_channels, groups, **geometry):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels // groups, 3, 3))
        self.groups = groups
        self.geometry = geometry

    def forward(self, x, attn):
        return aik_conv2d(
            x, attn, self.weight, None, groups=self.groups, **self.geometry)


@pytest.mark.parametrize(
    'case, hand_count',
    [
        # C=8, O=16, groups=2, 3x3, stride 2, pad 1: 9x11 -> 5x6, B=2.
        # aggregation 2*16*5*6*(8/2)*9 = 34560, modulation 2*8*9*5*6 = 4320.
        ((2, 8, 16, 2, (9, 11), (5, 6), dict(stride=2, padding=1)), 38880),
        # C=8, O=16, groups=1 (the compiled CPU path): aggregation twice the
        # above, 69120, modulation 4320.
        ((2, 8, 16, 1, (9, 11), (5, 6), dict(stride=2, padding=1)), 73440),
        # depthwise C=O=groups=8, dilation 2, pad 2: 6x7 -> 6x7, B=1.
        # aggregation 1*8*6*7*1*9 = 3024, modulation 1*8*9*6*7 = 3024.
        ((1, 8, 8, 8, (6, 7), (6, 7), dict(padding=2, dilation=2)), 6048),
    ])
def test_aik_op_flops_match_hand_count(case, hand_count):
    batch, channels, out_channels, groups, size, out_size, geometry = case
    module = AIKOp(channels, out_channels, groups, **geometry)
    inputs = (torch.randn(batch, channels,
                          *size), torch.rand(batch, 1, 9, *out_size))
    analyzer = aik_flop_analyzer(module, inputs)
    assert analyzer.total() == hand_count
    assert sum(aik_op_counts(analyzer).values()) == hand_count
    assert len(aik_op_counts(analyzer)) == 1
    # without the handle mmengine would silently count nothing
    assert FlopAnalyzer(module, inputs).total() == 0


def test_aggregation_counts_as_the_static_convolution():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
    assert FlopAnalyzer(conv, torch.randn(2, 8, 9, 11)).total() == 34560


def test_every_aik_layer_of_a_backbone_is_counted():
    model = AIKResNet(depth=18)
    model.eval()
    shapes = []
    for layer in model.modules():
        if isinstance(layer, AIKConv2d):
            layer.register_forward_hook(lambda m, args, out: shapes.append(
                (args[0].shape, m.weight.shape, out.shape)))
    analyzer = aik_flop_analyzer(model, (torch.rand(1, 3, 64, 64), ))
    counted = sum(aik_op_counts(analyzer).values())
    expected = sum(b * o * ho * wo * (cg * kh * kw) + b * c * kh * kw * ho * wo
                   for (b, c, _, _), (o, cg, kh, kw), (_, _, ho, wo) in shapes)
    assert len(shapes) == 16 and counted == expected
    assert not set(analyzer.unsupported_ops()) & set(AIK_CONV_OPS)


def test_get_flops_compares_resnet18():
    spec = importlib.util.spec_from_file_location(
        'get_flops', REPO / 'tools/analysis/get_flops.py')
    get_flops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(get_flops)
    (params, flops,
     _), (aik_params, aik_flops,
          _), size = get_flops.compare(get_flops.SPECS['resnet18'])
    assert size == (224, 224)
    assert params == 11689512  # torchvision's ResNet-18
    assert 1.8e9 < flops < 1.9e9
    assert 1 < aik_params / params < 1.05
    assert 1 < aik_flops / flops < 1.05
