"""Every detection and demo config loads and builds its model; the AIK
configs differ from their plain twins only in the backbone; the pipelines
build, and the toy datasets load."""
from pathlib import Path

import pytest
import torch
import torchvision
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.registry import DATASETS, MODELS, DefaultScope

from detection_utils import REPO, TOY_FASTER_RCNN, TOY_RETINANET
from mmdynconv.cnn import AIKConv2d

CONFIGS = sorted(
    str(path.relative_to(REPO))
    for folder in ('faster_rcnn', 'retinanet', 'demo')
    for path in (REPO / 'configs' / folder).glob('*.py'))
AIK_COCO_CONFIGS = [
    c for c in CONFIGS if '-aik_' in c and not c.startswith('configs/demo')
]
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def _twin(config: str) -> str:
    return config.replace('-aik_', '_')


def test_every_coco_config_has_a_twin():
    assert len(AIK_COCO_CONFIGS) == 4
    for config in AIK_COCO_CONFIGS:
        assert _twin(config) in CONFIGS


@pytest.mark.parametrize('config', CONFIGS)
def test_config_builds_its_model(config):
    cfg = Config.fromfile(REPO / config)
    cfg.model.backbone.init_cfg = None  # no weights download
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    aik_layers = [m for m in model.modules() if isinstance(m, AIKConv2d)]
    assert bool(aik_layers) == ('aik' in Path(config).name)
    if config in AIK_COCO_CONFIGS:
        assert cfg.custom_imports.imports == ['mmdynconv']
        assert cfg.model.backbone.init_cfg is None
        stages = {
            name.split('.')[1]
            for name, m in model.named_modules() if isinstance(m, AIKConv2d)
        }
        assert stages == {'layer2', 'layer3', 'layer4'}


@pytest.mark.parametrize('config', AIK_COCO_CONFIGS)
def test_aik_config_is_its_twin_but_the_backbone(config):
    aik = Config.fromfile(REPO / config).to_dict()
    plain = Config.fromfile(REPO / _twin(config)).to_dict()
    assert aik.pop('custom_imports')['imports'] == ['mmdynconv']
    aik_backbone = aik['model'].pop('backbone')
    plain_backbone = plain['model'].pop('backbone')
    assert aik == plain
    assert aik_backbone.pop('type') == 'AIKResNet'
    assert plain_backbone.pop('type') == 'ResNet'
    assert aik_backbone.pop('stage_with_aik') == (False, True, True, True)
    assert aik_backbone == plain_backbone
    assert plain_backbone['init_cfg']['checkpoint'].startswith(
        'torchvision://resnet')


@pytest.mark.parametrize('config', CONFIGS)
def test_pipelines_build(config):
    cfg = Config.fromfile(REPO / config)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        for loader in LOADERS:
            pipeline = Compose(cfg[loader].dataset.pipeline)
            steps = cfg[loader].dataset.pipeline
            assert len(pipeline.transforms) == len(steps)


@pytest.mark.parametrize('config', [TOY_FASTER_RCNN, TOY_RETINANET])
def test_toy_datasets_load(config, toy_coco):
    cfg = Config.fromfile(REPO / config)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        for loader, size in zip(LOADERS, (8, 4, 4)):
            cfg[loader].dataset.data_root = str(toy_coco)
            dataset = DATASETS.build(cfg[loader].dataset)
            assert len(dataset) == size
            item = dataset[0]
            assert item['inputs'].shape == (3, 128, 128)
            gt = item['data_samples'].gt_instances
            assert 1 <= len(gt) <= 4
            assert ((gt.bboxes.tensor >= 0) & (gt.bboxes.tensor <= 128)).all()
            assert set(gt.labels.tolist()) <= {0, 1, 2}
            assert dataset.metainfo['classes'] == ('square', 'disc',
                                                   'triangle')
    assert torch.is_tensor(item['inputs'])


def test_aik_coco_config_loads_a_torchvision_checkpoint(tmp_path):
    """The AIK configs' init_cfg path: a torchvision ResNet-50 state dict
    (random here, ImageNet in the config) fills the static kernels."""
    resnet = torchvision.models.resnet50()
    torch.save(resnet.state_dict(), tmp_path / 'resnet50.pth')
    config = 'configs/faster_rcnn/faster-rcnn_r50-aik_fpn_1x_coco.py'
    cfg = Config.fromfile(REPO / config)
    init_cfg = cfg.model.backbone.init_cfg
    assert init_cfg.checkpoint == 'torchvision://resnet50'
    init_cfg.checkpoint = str(tmp_path / 'resnet50.pth')
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    model.init_weights()
    backbone = model.backbone.state_dict()
    for key, value in resnet.state_dict().items():
        if not key.startswith('fc.'):
            torch.testing.assert_close(backbone[key], value, msg=key)
    aik = model.backbone.layer2[0].conv2
    assert isinstance(aik, AIKConv2d)
    assert not aik.generator.head.weight.any()
