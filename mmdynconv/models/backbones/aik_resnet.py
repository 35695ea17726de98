"""AIKResNet: MMDetection's ResNet with AIK convolutions in its blocks."""
from typing import Optional, Sequence

from mmdet.models.backbones.resnet import BasicBlock, ResNet
from mmengine.registry import MODELS

from mmdynconv.cnn import AIKAttention
from .utils import check_stage_with_aik


class AIKBasicBlock(BasicBlock):
    """MMDetection's BasicBlock that takes, as its Bottleneck does, a conv
    config in ``dcn``; both 3x3 convolutions are built from it.

    Shapes:
        x: (B, inplanes, H, W) -> (B, planes, H / stride, W / stride).
    """

    def __init__(self,
                 *args,
                 dcn: Optional[dict] = None,
                 conv_cfg: Optional[dict] = None,
                 **kwargs):
        # BasicBlock builds exactly its two 3x3 convolutions from conv_cfg.
        super().__init__(
            *args, conv_cfg=conv_cfg if dcn is None else dcn, **kwargs)


@MODELS.register_module()
class AIKResNet(ResNet):
    """ResNet whose 3x3 residual convolutions are AIK convolutions.

    In the stages that ``stage_with_aik`` selects, both 3x3 convolutions of
    each BasicBlock (depth 18, 34) and the 3x3 ``conv2`` of each Bottleneck
    (depth 50, 101, 152) are :class:`~mmdynconv.cnn.AIKConv2d`; the stem,
    the 1x1 and the downsampling convolutions stay plain. The AIK layers are
    threaded through MMDetection's ``dcn`` hook, so this is MMDetection's
    ResNet otherwise: same options, same ``forward``, and the same state-dict
    keys (those of torchvision's and MMPretrain's ResNets), plus the
    attention generators' keys, which all contain ``.generator.``. A freshly
    built or initialised model computes exactly its plain twin, so plain
    checkpoints load through ``init_cfg=dict(type='Pretrained', ...)``
    (with ``prefix='backbone.'`` for a classifier's checkpoint).

    v1c is ``deep_stem=True``; v1d adds ``avg_down=True``. Their deep stem
    has MMDetection's key layout (``stem.0``, ``stem.1``, ...), not
    MMPretrain's (``stem.0.conv``, ``stem.0.bn``, ...).

    Registered in mmengine's root ``MODELS``: ``type='AIKResNet'`` builds
    under the ``mmdet`` and the ``mmpretrain`` scopes.

    Args:
        depth: 18, 34, 50, 101 or 152.
        aik_cfg: options of :class:`~mmdynconv.cnn.AIKConv2d` (reduction,
            min_channels, attn_groups, context, fusion, attn_act, norm_cfg).
        stage_with_aik: one bool per stage; None (default) selects all.
        norm_eval: as MMDetection's, but False by default, as in MMPretrain
            and torchvision: classification configs rely on the default,
            detection configs set True. It freezes the statistics of the
            ResNet's own batch norms; the attention generators' norms, which
            a plain ImageNet checkpoint has no statistics for, keep training
            outside the frozen stages.
        **kwargs: MMDetection ResNet's other options: in_channels,
            stem_channels, base_channels, num_stages, strides, dilations,
            out_indices, style, deep_stem, avg_down, frozen_stages, conv_cfg
            (for the plain convolutions; not combinable with AIK stages),
            norm_cfg, plugins, with_cp, zero_init_residual, pretrained,
            init_cfg. ``dcn`` is taken by the AIK convolutions.

    Shapes:
        x: (B, in_channels, H, W) -> one (B, base_channels * 2**i *
        expansion, H / S_i, W / S_i) map per stage i in ``out_indices``,
        where S_i is 4 (stem) times the strides of stages 0..i and
        expansion is 1 (BasicBlock) or 4 (Bottleneck).
    """

    def __init__(self,
                 depth: int,
                 *,
                 num_stages: int = 4,
                 aik_cfg: dict = dict(),
                 stage_with_aik: Optional[Sequence[bool]] = None,
                 norm_eval: bool = False,
                 **kwargs):
        if depth not in self.arch_settings:
            raise KeyError(f'invalid depth {depth!r} for '
                           f'{type(self).__name__}, expected one of '
                           f'{sorted(self.arch_settings)}')
        stage_with_aik = check_stage_with_aik(stage_with_aik, num_stages)
        if kwargs.get('conv_cfg') is not None and any(stage_with_aik):
            raise ValueError(
                'conv_cfg cannot be combined with AIK stages (MMDetection\'s '
                'Bottleneck refuses conv_cfg with a conv2 config), got '
                f'conv_cfg={kwargs["conv_cfg"]!r}')
        super().__init__(
            depth,
            num_stages=num_stages,
            norm_eval=norm_eval,
            dcn=dict(type='AIKConv', **aik_cfg),
            stage_with_dcn=stage_with_aik,
            **kwargs)
        self.aik_cfg = aik_cfg
        self.stage_with_aik = stage_with_aik

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.norm_eval:
            for stage in self.res_layers[max(self.frozen_stages, 0):]:
                for module in getattr(self, stage).modules():
                    if isinstance(module, AIKAttention):
                        module.train()

    def make_res_layer(self, block, **kwargs):
        """One stage; ``dcn`` in kwargs is its AIK conv config or None."""
        # arch_settings keeps MMDetection's block classes, because
        # ResNet.__init__ picks zero_init_residual's norm by class identity.
        if block is BasicBlock:
            block = AIKBasicBlock
        return super().make_res_layer(block=block, **kwargs)
