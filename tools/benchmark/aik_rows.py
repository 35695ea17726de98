"""What the CPU and the GPU AIK benchmarks share: the shapes, the op alone,
the layer on a chosen op path, and the count of bytes kept for backward."""
import torch
from torch import nn

from mmdynconv.ops import aik_conv2d

# (in = out channels, input size, stride) of ResNet-50's 3x3 convolutions
SHAPES = [(64, 56, 1), (128, 28, 1), (256, 14, 1), (512, 7, 1),
          (128, 56, 2), (256, 28, 2), (512, 14, 2)]


class AIKOp(nn.Module):
    """The AIK op alone: static kernel and attention are both parameters.

    x: (batch, channels, H, W) -> (batch, channels, *out_size).
    """

    def __init__(self, channels, stride, batch, out_size, impl=None):
        super().__init__()
        self.stride, self.impl = stride, impl
        self.weight = nn.Parameter(
            torch.randn(channels, channels, 3, 3) / (9 * channels)**0.5)
        self.attn = nn.Parameter(2 * torch.rand(batch, 1, 9, *out_size))

    def forward(self, x):
        return aik_conv2d(x, self.attn, self.weight, None, self.stride, 1,
                          impl=self.impl)


def aik_layer(impl):
    """An AIKConv2d subclass whose op runs on ``impl`` (needs mmcv)."""
    from mmdynconv.cnn import AIKConv2d

    class Layer(AIKConv2d):

        def forward(self, x):
            return aik_conv2d(x, self.attention(x), self.weight, self.bias,
                              self.stride, self.padding, self.dilation,
                              self.groups, impl=impl)

    Layer.__name__ = f'AIKConv2d_{impl}'
    return Layer


def saved_bytes(forward):
    """Bytes of the unique storages autograd keeps while ``forward()``
    builds its graph (a tensor saved twice is kept once)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())
