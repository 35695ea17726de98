"""Bad input to the tools ends in one ``error:`` line naming the culprit,
before anything is written."""
import importlib.util

import pytest
import torch
from mmengine.config import Config

from detection_utils import REPO, TOY_FASTER_RCNN, TOY_RETINANET
import train  # tools/train.py, on sys.path through detection_utils


def _toy_cfg(config, root) -> Config:
    cfg = Config.fromfile(REPO / config)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = str(root)
    for evaluator in ('val_evaluator', 'test_evaluator'):
        cfg[evaluator].ann_file = f'{root}/annotations/val.json'
    return cfg


def _error(cfg, phases=('train', 'val')) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.check_inputs(cfg, phases)
    return str(exit_info.value)


@pytest.mark.parametrize('config', [TOY_FASTER_RCNN, TOY_RETINANET])
def test_valid_toy_config_passes(config, toy_coco):
    train.check_inputs(_toy_cfg(config, toy_coco), ['train', 'val', 'test'])


def test_missing_data_files_are_named(toy_coco, tmp_path):
    cfg = _toy_cfg(TOY_FASTER_RCNN, tmp_path / 'nowhere')
    assert _error(cfg) == ('error: train_dataloader.dataset.data_root: no '
                           f'such directory: {tmp_path}/nowhere')

    cfg = _toy_cfg(TOY_FASTER_RCNN, toy_coco)
    cfg.val_dataloader.dataset.ann_file = 'annotations/missing.json'
    assert _error(cfg) == ('error: val_dataloader.dataset.ann_file: no such '
                           f'file: {toy_coco}/annotations/missing.json')

    cfg = _toy_cfg(TOY_FASTER_RCNN, toy_coco)
    cfg.train_dataloader.dataset.data_prefix.img = 'images/'
    assert _error(cfg) == ('error: train_dataloader.dataset.data_prefix.img: '
                           f'no such path: {toy_coco}/images/')

    cfg = _toy_cfg(TOY_FASTER_RCNN, toy_coco)
    cfg.test_evaluator.ann_file = str(tmp_path / 'gt.json')
    assert _error(cfg, ['test']) == ('error: test_evaluator.ann_file: no '
                                     f'such file: {tmp_path}/gt.json')


@pytest.mark.parametrize('backbone, names', [
    (dict(type='AIKResNett'), ['AIKResNett', 'registry']),
    (dict(widht=2), ["'widht'"]),
    (dict(aik_cfg=dict(reductoin=4)), ["'reductoin'"]),
])
def test_bad_backbone_is_named(backbone, names, toy_coco):
    cfg = _toy_cfg(TOY_RETINANET, toy_coco)
    cfg.model.backbone.update(backbone)
    message = _error(cfg)
    assert message.startswith('error: cannot build the model RetinaNet, '
                              f'backbone {cfg.model.backbone.type}: ')
    assert '\n' not in message
    for name in names:
        assert name in message


def test_test_tool_names_a_missing_checkpoint(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location('test_tool',
                                                  REPO / 'tools/test.py')
    test_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_tool)
    monkeypatch.setattr('sys.argv', [
        'test.py',
        str(REPO / TOY_FASTER_RCNN),
        str(tmp_path / 'epoch_9.pth'), '--work-dir',
        str(tmp_path / 'work')
    ])
    with pytest.raises(SystemExit, match='no such checkpoint: .*epoch_9.pth'):
        test_tool.main()
    assert not (tmp_path / 'work').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only behaviour')
def test_amp_without_cuda_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr('sys.argv', [
        'train.py',
        str(REPO / TOY_FASTER_RCNN), '--amp', '--work-dir',
        str(tmp_path / 'work')
    ])
    with pytest.raises(SystemExit, match='^error: --amp needs a CUDA device$'):
        train.main()
    assert not (tmp_path / 'work').exists()
