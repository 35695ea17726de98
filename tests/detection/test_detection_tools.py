"""End to end through the tools: the toy detectors train, write checkpoints,
resume, and test with CocoMetric; two-process CPU DDP through dist_train.sh."""
import json
import pickle

import pytest

from detection_utils import (TOY_FASTER_RCNN, TOY_RETINANET, free_port, run,
                             run_ok, toy_options)

COCO_KEYS = {
    'coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75', 'coco/bbox_mAP_s',
    'coco/bbox_mAP_m', 'coco/bbox_mAP_l'
}


def _test_metrics(work_dir) -> dict:
    """The metrics tools/test.py saved in its run's ``<timestamp>.json``."""
    (log_json, ) = work_dir.glob('*/*.json')
    return json.loads(log_json.read_text())


@pytest.mark.parametrize('config, resume_explicitly',
                         [(TOY_FASTER_RCNN, False), (TOY_RETINANET, True)])
def test_train_resume_test(config, resume_explicitly, toy_coco, tmp_path):
    """A start that fails on missing data leaves no work dir behind; then
    the detector trains an epoch (``--auto-scale-lr`` on), resumes for a
    second (``--resume`` alone finds the last checkpoint), and tests with
    CocoMetric, dumping and drawing the predictions."""
    work_dir = tmp_path / 'train'
    train = ('python', 'tools/train.py', config, '--work-dir', work_dir)
    proc = run(*train, '--cfg-options',
               *toy_options(config, tmp_path / 'nowhere'))
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == (
        'error: train_dataloader.dataset.data_root: no such directory: '
        f'{tmp_path}/nowhere')
    assert not work_dir.exists()

    out = run_ok(*train, '--auto-scale-lr', '--cfg-options',
                 *toy_options(config, toy_coco, epochs=1))
    assert 'Epoch(train) [1][2/2]' in out and 'coco/bbox_mAP' in out
    # batches of 4 where the config's lr is for 8
    assert 'Scaling the original LR by 0.5.' in out
    first = work_dir / 'epoch_1.pth'
    assert (work_dir / 'last_checkpoint').read_text().strip() == str(first)

    resume = ['--resume', first] if resume_explicitly else ['--resume']
    out = run_ok(*train, *resume, '--cfg-options',
                 *toy_options(config, toy_coco, epochs=2))
    assert 'resumed epoch: 1, iter: 2' in out
    assert 'Epoch(train) [1]' not in out and 'Epoch(train) [2][2/2]' in out
    assert (work_dir / 'epoch_2.pth').is_file()

    test_dir, preds = tmp_path / 'test', tmp_path / 'preds.pkl'
    run_ok('python', 'tools/test.py', config, work_dir / 'epoch_2.pth',
           '--work-dir', test_dir, '--out', preds, '--show-dir', 'drawn',
           '--cfg-options', *toy_options(config, toy_coco))
    assert len(list(test_dir.glob('*/drawn/*.png'))) == 4
    metrics = _test_metrics(test_dir)
    assert COCO_KEYS <= metrics.keys()
    assert all(-1 <= metrics[key] <= 1 for key in COCO_KEYS)
    with open(preds, 'rb') as f:
        predictions = pickle.load(f)
    assert len(predictions) == 4
    assert {'pred_instances', 'img_id'} <= predictions[0].keys()


def test_dist_train_two_cpu_processes(toy_coco, tmp_path):
    work_dir = tmp_path / 'ddp'
    out = run_ok(
        'bash',
        'tools/dist_train.sh',
        TOY_FASTER_RCNN,
        2,
        '--work-dir',
        work_dir,
        '--cfg-options',
        *toy_options(TOY_FASTER_RCNN, toy_coco),
        'train_dataloader.batch_size=2',
        env={'PORT': str(free_port())})
    assert 'Distributed training: True' in out
    # 8 images / (2 processes x 2 per batch) = 2 iterations per epoch
    assert 'Epoch(train) [1][2/2]' in out and 'coco/bbox_mAP' in out
    assert (work_dir / 'epoch_1.pth').is_file()
    text = (work_dir / 'faster-rcnn_r18-aik_fpn_toy-coco.py').read_text()
    assert "backend='gloo'" in text and 'MMDistributedDataParallel' in text
