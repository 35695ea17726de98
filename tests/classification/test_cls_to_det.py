"""A classification checkpoint initialises the toy detector's backbone
through the documented override ``init_cfg=dict(type='Pretrained',
checkpoint=CLS_CKPT, prefix='backbone.')``; every backbone tensor arrives."""
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmdet.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
# A user's config: the toy detector, its backbone from the classifier
# (``_delete_``: the toy detector's own ``init_cfg`` is None).
DETECTOR_CONFIG = '''
_base_ = '{repo}/configs/demo/faster-rcnn_r18-aik_fpn_toy-coco.py'
model = dict(
    backbone=dict(
        init_cfg=dict(
            _delete_=True,
            type='Pretrained',
            checkpoint='{ckpt}',
            prefix='backbone.')))
'''


def test_cls_checkpoint_initialises_detector_backbone(toy_cls_work_dir,
                                                      tmp_path):
    checkpoint = toy_cls_work_dir / 'epoch_1.pth'
    config = tmp_path / 'faster-rcnn_r18-aik-cls-pretrained_fpn_toy-coco.py'
    config.write_text(DETECTOR_CONFIG.format(repo=REPO, ckpt=checkpoint))
    cfg = Config.fromfile(str(config))
    init_default_scope('mmdet')
    detector = MODELS.build(cfg.model)

    state = torch.load(checkpoint, map_location='cpu',
                       weights_only=False)['state_dict']
    expected = {
        key[len('backbone.'):]: value
        for key, value in state.items() if key.startswith('backbone.')
    }
    backbone = detector.backbone.state_dict()
    assert expected.keys() == backbone.keys()
    # Trained weights that a fresh detector does not already hold, including
    # the attention heads, which start at zero.
    heads = [k for k in expected if k.endswith('generator.head.weight')]
    assert heads and all(expected[k].abs().sum() > 0 for k in heads)
    assert not torch.equal(backbone['conv1.weight'], expected['conv1.weight'])

    detector.init_weights()
    backbone = detector.backbone.state_dict()
    for key, value in expected.items():
        assert torch.equal(backbone[key], value), key
