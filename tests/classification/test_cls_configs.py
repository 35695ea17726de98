"""Every classification config loads, builds a model that runs, and each AIK
config differs from its plain twin only in the backbone type."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.registry import MODELS

from mmdynconv.cnn import AIKConv2d

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIRS = ('configs/aik_resnet', 'configs/aik_mobilenet_v2')
CONFIGS = sorted(
    [p for d in CONFIG_DIRS for p in (REPO / d).glob('*.py')] +
    list((REPO / 'configs/demo').glob('*cls*.py')))
# The AIK configs with a plain twin (the toy one has none).
AIK_CONFIGS = [
    p for p in CONFIGS if p.name.startswith('aik-') and 'toy' not in p.name
]


def config_id(path):
    return path.name


def load(path) -> Config:
    return Config.fromfile(str(path))


def test_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    for arch in ('resnet18', 'resnet50', 'resnet101'):
        assert {f'{arch}_8xb32_in1k.py', f'aik-{arch}_8xb32_in1k.py'} <= names
        if arch != 'resnet101':
            for data in ('cifar10', 'cifar100'):
                assert f'aik-{arch}_8xb16_{data}.py' in names
    assert 'aik-mobilenet-v2_8xb32_in1k.py' in names


@pytest.mark.parametrize('path', CONFIGS, ids=config_id)
def test_config_builds_and_runs(path):
    cfg = load(path)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model).eval()
    has_aik = any(isinstance(m, AIKConv2d) for m in model.modules())
    assert has_aik == path.name.startswith('aik-')
    assert has_aik == ('custom_imports' in cfg)

    side = 8 if 'cifar' in path.name else 32  # 1x1 after the last stage
    with torch.no_grad():
        logits = model(torch.rand(2, 3, side, side), mode='tensor')
    assert logits.shape == (2, cfg.model.head.num_classes)
    assert cfg.data_preprocessor.num_classes == cfg.model.head.num_classes


@pytest.mark.parametrize('path', AIK_CONFIGS, ids=config_id)
def test_aik_config_is_its_twin_with_aik_backbone(path):
    plain_path = path.with_name(path.name[len('aik-'):])
    assert plain_path.exists(), f'{plain_path.name} missing'
    aik, plain = load(path).to_dict(), load(plain_path).to_dict()

    assert aik.pop('custom_imports') == dict(
        imports=['mmdynconv'], allow_failed_imports=False)
    plain_type = plain['model']['backbone'].pop('type')
    aik_type = aik['model']['backbone'].pop('type')
    assert aik_type == 'AIK' + plain_type
    assert aik == plain


@pytest.mark.parametrize('name, batch, epochs, scheduler', [
    ('aik-resnet18_8xb32_in1k.py', 32, 100, 'MultiStepLR'),
    ('aik-resnet50_8xb32_in1k.py', 32, 100, 'MultiStepLR'),
    ('aik-resnet101_8xb32_in1k.py', 32, 100, 'MultiStepLR'),
    ('aik-mobilenet-v2_8xb32_in1k.py', 32, 300, 'StepLR'),
    ('aik-resnet18_8xb16_cifar10.py', 16, 200, 'MultiStepLR'),
    ('aik-resnet18_8xb16_cifar100.py', 16, 200, 'MultiStepLR'),
    ('aik-resnet50_8xb16_cifar100.py', 16, 200, 'MultiStepLR'),
])
def test_recipe(name, batch, epochs, scheduler):
    path = next(p for p in AIK_CONFIGS if p.name == name)
    cfg = load(path)
    assert cfg.train_dataloader.batch_size == batch
    assert cfg.train_cfg.max_epochs == epochs
    assert cfg.param_scheduler.type == scheduler
    dataset = 'CIFAR' if 'cifar' in name else 'ImageNet'
    assert cfg.train_dataloader.dataset.type.startswith(dataset)
