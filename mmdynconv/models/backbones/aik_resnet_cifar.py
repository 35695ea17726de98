"""AIKResNet with the CIFAR stem of MMPretrain's ResNet_CIFAR."""
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.registry import MODELS
from torch import nn

from .aik_resnet import AIKResNet


@MODELS.register_module()
class AIKResNet_CIFAR(AIKResNet):
    """:class:`AIKResNet` for 32x32 images: the stem is one 3x3 stride-1
    convolution, a norm and a ReLU, without max-pooling, as in MMPretrain's
    ``ResNet_CIFAR`` (whose state-dict keys it shares, plus the attention
    generators'). Options as :class:`AIKResNet`; ``deep_stem`` must be False.

    Shapes:
        x: (B, in_channels, H, W) -> one (B, base_channels * 2**i *
        expansion, H / S_i, W / S_i) map per stage i in ``out_indices``,
        where S_i is the product of the strides of stages 0..i.
    """

    def __init__(self, depth: int, *, deep_stem: bool = False, **kwargs):
        if deep_stem:
            raise ValueError(f'{type(self).__name__} has a fixed CIFAR stem, '
                             'deep_stem must be False')
        super().__init__(depth, **kwargs)

    def _make_stem_layer(self, in_channels: int, stem_channels: int):
        self.conv1 = build_conv_layer(
            self.conv_cfg,
            in_channels,
            stem_channels,
            kernel_size=3,
            stride=1,
            padding=1,
            bias=False)
        self.norm1_name, norm1 = build_norm_layer(
            self.norm_cfg, stem_channels, postfix=1)
        self.add_module(self.norm1_name, norm1)
        self.relu = nn.ReLU(inplace=True)
        # ResNet.forward max-pools after the stem; the CIFAR stem does not.
        self.maxpool = nn.Identity()
