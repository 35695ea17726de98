"""AIKConv2d: a convolution whose kernel carries attention inside."""
from mmengine.registry import MODELS
from torch import Tensor, nn

from mmdynconv.ops import aik_conv2d
from . import fused_layer
from .aik_attention import AIKAttention


@MODELS.register_module('AIKConv')
class AIKConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose k*k kernel is re-weighted per sample,
    output position and kernel tap by an attention generator.

    The static kernel keeps ``nn.Conv2d``'s parameters (``weight``, ``bias``)
    and initialisation, so plain checkpoints load into it. The generator's
    head starts at zero: a freshly built layer computes exactly its static
    convolution (for ``attn_act`` '2sigmoid' and 'softmax').

    Registered as ``'AIKConv'`` in mmengine's root ``MODELS``, so
    ``build_conv_layer(dict(type='AIKConv', ...), ...)`` and MMDetection's
    ``ResNet(dcn=dict(type='AIKConv', ...))`` find it from any scope.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: as ``nn.Conv2d`` (zero padding, numeric padding only).
        reduction, min_channels, attn_groups, context, fusion, attn_act,
        norm_cfg: the attention generator's, see :class:`AIKAttention`.

    Shapes:
        x: (B, C, H, W) -> (B, O, H_out, W_out).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 *,
                 reduction: int = 16,
                 min_channels: int = 8,
                 attn_groups: int = 1,
                 context: str = 'local_global',
                 fusion: str = 'add',
                 attn_act: str = '2sigmoid',
                 norm_cfg: dict = dict(type='BN')):
        if isinstance(padding, str):
            raise ValueError(
                f'padding must be an int or a pair of ints, got {padding!r}')
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         padding, dilation, groups, bias)
        self.generator = AIKAttention(
            in_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            attn_groups=attn_groups,
            reduction=reduction,
            min_channels=min_channels,
            context=context,
            fusion=fusion,
            act=attn_act,
            norm_cfg=norm_cfg)

    def init_weights(self) -> None:
        """Re-zero the head after a parent's ``init_cfg`` touched it
        (mmengine calls this after applying the parent's initialisers)."""
        self.generator.reset_head()

    def output_size(self, x: Tensor):
        """(H_out, W_out) of this convolution on input ``x``."""
        return tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // st + 1
            for size, pad, dil, k, st in zip(x.shape[2:], self.padding,
                                             self.dilation, self.kernel_size,
                                             self.stride))

    def attention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> A of shape (B, G, K, H_out, W_out)."""
        return self.generator(x, self.output_size(x))

    def forward(self, x: Tensor) -> Tensor:
        geo = fused_layer.geometry(self, x)
        if fused_layer.applies(self, x, geo):  # one autograd node (CPU)
            return fused_layer.aik_layer(self, x, geo)
        return aik_conv2d(x, self.attention(x), self.weight, self.bias,
                          self.stride, self.padding, self.dilation,
                          self.groups)
