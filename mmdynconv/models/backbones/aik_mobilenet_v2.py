"""AIKMobileNetV2: MMPretrain's MobileNetV2 with AIK depthwise convolutions."""
from typing import Optional, Sequence

from mmcv.cnn import build_conv_layer
from mmengine.model import Sequential
from mmengine.registry import MODELS
from mmpretrain.models.backbones.mobilenet_v2 import (InvertedResidual,
                                                      MobileNetV2)

from mmdynconv.cnn import AIKConv2d
from .utils import check_stage_with_aik


class AIKInvertedResidual(InvertedResidual):
    """MMPretrain's MobileNetV2 block whose 3x3 depthwise convolution
    (``conv[-2].conv``) is built from ``aik_conv_cfg`` when it is given.

    Shapes:
        x: (B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride).
    """

    def __init__(self, *args, aik_conv_cfg: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if aik_conv_cfg is not None:
            depthwise = self.conv[-2]
            plain = depthwise.conv
            depthwise.conv = build_conv_layer(
                aik_conv_cfg,
                plain.in_channels,
                plain.out_channels,
                plain.kernel_size,
                stride=plain.stride,
                padding=plain.padding,
                dilation=plain.dilation,
                groups=plain.groups,
                bias=plain.bias is not None)
            # keep ConvModule's initialisation of the static kernel
            depthwise.conv.load_state_dict(plain.state_dict(), strict=False)

    def init_weights(self):
        """Re-zero the attention heads after a parent's ``init_cfg``.

        mmengine calls ``init_weights`` of BaseModule children only, and the
        AIK layer sits in a ConvModule inside a plain ``nn.Sequential``.
        """
        super().init_weights()
        for module in self.conv.modules():
            if isinstance(module, AIKConv2d):
                module.init_weights()


@MODELS.register_module()
class AIKMobileNetV2(MobileNetV2):
    """MobileNetV2 whose 3x3 depthwise convolutions (``groups`` = channels)
    are AIK convolutions in the stages that ``stage_with_aik`` selects.

    MMPretrain's MobileNetV2 otherwise: same options and defaults, same
    ``forward`` and the same state-dict keys plus the attention generators'
    (all containing ``.generator.``). A freshly built or initialised model
    computes exactly its plain twin. Registered in mmengine's root
    ``MODELS``.

    Args:
        aik_cfg: options of :class:`~mmdynconv.cnn.AIKConv2d`.
        stage_with_aik: one bool for each of the 7 inverted-residual stages
            (``layer1`` .. ``layer7``); None (default) selects all.
        **kwargs: MobileNetV2's options: widen_factor, out_indices,
            frozen_stages, conv_cfg, norm_cfg, act_cfg, norm_eval, with_cp,
            init_cfg.

    Shapes:
        x: (B, 3, H, W) -> one map per index in ``out_indices`` (0..7), e.g.
        (B, 1280 * max(1, widen_factor), H / 32, W / 32) for index 7.
    """

    def __init__(self,
                 *,
                 aik_cfg: dict = dict(),
                 stage_with_aik: Optional[Sequence[bool]] = None,
                 **kwargs):
        self.stage_with_aik = check_stage_with_aik(stage_with_aik,
                                                   len(self.arch_settings))
        self.aik_cfg = aik_cfg
        # make_layer, which MobileNetV2.__init__ calls once per stage in
        # order, takes the stages' conv configs from this list.
        self._stage_conv_cfgs = [
            dict(type='AIKConv', **aik_cfg) if with_aik else None
            for with_aik in self.stage_with_aik
        ]
        super().__init__(**kwargs)
        del self._stage_conv_cfgs

    def make_layer(self, out_channels: int, num_blocks: int, stride: int,
                   expand_ratio: int) -> Sequential:
        """One stage; an mmengine ``Sequential`` so that ``init_weights``
        reaches its blocks."""
        aik_conv_cfg = self._stage_conv_cfgs.pop(0)
        blocks = []
        for i in range(num_blocks):
            blocks.append(
                AIKInvertedResidual(
                    self.in_channels,
                    out_channels,
                    stride if i == 0 else 1,
                    expand_ratio=expand_ratio,
                    conv_cfg=self.conv_cfg,
                    norm_cfg=self.norm_cfg,
                    act_cfg=self.act_cfg,
                    with_cp=self.with_cp,
                    aik_conv_cfg=aik_conv_cfg))
            self.in_channels = out_channels
        return Sequential(*blocks)
