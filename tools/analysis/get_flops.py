"""Parameters and FLOPs of plain models and their AIK twins, as a markdown
table.

The models are MMPretrain's and MMDetection's own configs with the backbone's
``type`` swapped (ResNet -> AIKResNet, MobileNetV2 -> AIKMobileNetV2, AIK in
every stage unless the row says otherwise). FLOPs are multiply-adds (one
fused multiply-add = 1 FLOP) counted by mmengine's FlopAnalyzer on a batch of
one image, with the AIK convolutions counted by
``mmdynconv.models.flops.aik_conv_flop_jit``; like mmengine, element-wise
operations are not counted. Detectors run in ``mode='tensor'`` on a
1333x800 image padded by their data preprocessor (to 1344x800), the AIK
detector with the plain one's weights, so both see the same proposals.

Usage:
    python tools/analysis/get_flops.py [--models NAME [NAME ...]]
"""
import argparse
import sys
from functools import partial
from typing import Dict, NamedTuple, Sequence, Set, Tuple

import torch
from mmengine.analysis import parameter_count
from mmengine.config import Config
from mmengine.registry import DefaultScope, MODELS

import mmdynconv  # noqa: F401  (registers the AIK backbones)
from mmdynconv.models.flops import aik_flop_analyzer


class Spec(NamedTuple):
    title: str
    scope: str
    config: str
    aik_backbone: dict
    size: Tuple[int, int]  # (H, W)


STAGES_2_4 = (False, True, True, True)
SPECS: Dict[str, Spec] = {
    'resnet18':
    Spec('ResNet-18',
         'mmpretrain', 'mmpretrain::resnet/resnet18_8xb32_in1k.py',
         dict(type='AIKResNet'), (224, 224)),
    'resnet50':
    Spec('ResNet-50',
         'mmpretrain', 'mmpretrain::resnet/resnet50_8xb32_in1k.py',
         dict(type='AIKResNet'), (224, 224)),
    'resnet101':
    Spec('ResNet-101',
         'mmpretrain', 'mmpretrain::resnet/resnet101_8xb32_in1k.py',
         dict(type='AIKResNet'), (224, 224)),
    'mobilenet_v2':
    Spec('MobileNetV2', 'mmpretrain',
         'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
         dict(type='AIKMobileNetV2'), (224, 224)),
    'faster_rcnn':
    Spec('Faster R-CNN R50-FPN', 'mmdet',
         'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
         dict(type='AIKResNet'), (800, 1333)),
    'faster_rcnn_s234':
    Spec('Faster R-CNN R50-FPN, AIK in stages 2-4', 'mmdet',
         'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
         dict(type='AIKResNet', stage_with_aik=STAGES_2_4), (800, 1333)),
    'retinanet':
    Spec('RetinaNet R50-FPN',
         'mmdet', 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
         dict(type='AIKResNet'), (800, 1333)),
    'retinanet_s234':
    Spec('RetinaNet R50-FPN, AIK in stages 2-4', 'mmdet',
         'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
         dict(type='AIKResNet', stage_with_aik=STAGES_2_4), (800, 1333)),
}


def build(spec: Spec, aik: bool) -> torch.nn.Module:
    """The config's model (no pretrained weights), in eval mode."""
    model_cfg = Config.fromstring(f'_base_ = {spec.config!r}', '.py').model
    model_cfg.backbone.pop('init_cfg', None)
    if aik:
        model_cfg.backbone.update(spec.aik_backbone)
    return MODELS.build(model_cfg).eval()


def example_inputs(spec: Spec, model: torch.nn.Module) -> dict:
    """``inputs`` (1, 3, H', W') and, for a detector, its ``data_samples``."""
    height, width = spec.size
    if spec.scope != 'mmdet':
        return dict(inputs=torch.rand(1, 3, height, width))
    from mmdet.structures import DetDataSample
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(height, width),
            ori_shape=(height, width),
            scale_factor=(1.0, 1.0)))
    return model.data_preprocessor(
        dict(inputs=[image], data_samples=[sample]), False)


def count(model: torch.nn.Module, data: dict) -> Tuple[int, int, Set[str]]:
    """Parameters, FLOPs and the kinds of uncounted ops of one forward."""
    if 'data_samples' in data:
        model.forward = partial(
            model.forward, data_samples=data['data_samples'])
    analyzer = aik_flop_analyzer(model, (data['inputs'], ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    with torch.no_grad():
        flops = analyzer.total()
    return parameter_count(model)[''], flops, set(analyzer.unsupported_ops())


def compare(spec: Spec):
    """Counts of the plain model and of its AIK twin (with its weights),
    and the (H, W) of the input they ran on."""
    with DefaultScope.overwrite_default_scope(spec.scope):
        torch.manual_seed(0)
        plain = build(spec, aik=False)
        aik = build(spec, aik=True)
        aik.load_state_dict(plain.state_dict(), strict=False)
        data = example_inputs(spec, plain)
        size = tuple(data['inputs'].shape[2:])
        return count(plain, data), count(aik, data), size


def percent(new: float, old: float) -> str:
    return f'{100 * (new / old - 1):+.2f}%'


def main(names: Sequence[str]):
    rows = [
        '| Model | Input (H x W) | Params plain | Params AIK | Params + '
        '| FLOPs plain | FLOPs AIK | FLOPs + |',
        '|---|---|---|---|---|---|---|---|'
    ]
    uncounted = set()
    for name in names:
        spec = SPECS[name]
        print(f'counting {spec.title} ...', file=sys.stderr, flush=True)
        (p0, f0, u0), (p1, f1, u1), (height, width) = compare(spec)
        uncounted |= u1 - u0
        rows.append(f'| {spec.title} | {height} x {width} '
                    f'| {p0 / 1e6:.2f} M | {p1 / 1e6:.2f} M '
                    f'| {percent(p1, p0)} | {f0 / 1e9:.2f} G '
                    f'| {f1 / 1e9:.2f} G | {percent(f1, f0)} |')
        if name == 'resnet50':
            met = p1 <= 1.02 * p0 and f1 <= 1.03 * f0
            target = (f'ResNet-50 targets (params <= +2%, FLOPs <= +3%): '
                      f'{"met" if met else "MISSED"}')
    print('\n'.join(rows))
    if 'resnet50' in names:
        print('\n' + target)
    if uncounted:
        print('\nNot counted (element-wise) ops that only the AIK models '
              'have: ' + ', '.join(sorted(uncounted)))


def parse_args():
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs of plain and AIK models.')
    parser.add_argument(
        '--models',
        nargs='+',
        choices=list(SPECS),
        default=list(SPECS),
        help='rows to compute (default: all)')
    return parser.parse_args()


if __name__ == '__main__':
    main(parse_args().models)
