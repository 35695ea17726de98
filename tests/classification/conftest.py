"""Shared fixtures: the toy shapes data and a toy classifier trained on it
through ``tools/train.py`` (once per session: the end-to-end test and the
classification-to-detection test both use it)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOY_CLS_CONFIG = 'configs/demo/aik-resnet18_1xb16_toy-cls.py'

sys.path.insert(0, str(REPO / 'tools/misc'))
from make_toy_cls_data import make_toy_cls_data  # noqa: E402


def _run_tool(*args: str) -> str:
    """Run ``python ARGS`` in the repo root; return stdout and stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _data_root_options(root) -> list:
    """``--cfg-options`` pointing every dataloader of a config at ``root``."""
    return [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]


@pytest.fixture(scope='session')
def toy_cls_config():
    return TOY_CLS_CONFIG


@pytest.fixture(scope='session')
def run_tool():
    return _run_tool


@pytest.fixture(scope='session')
def data_root_options():
    return _data_root_options


@pytest.fixture(scope='session')
def toy_cls_root(tmp_path_factory):
    """4 classes x (4 train, 2 val) images of 32x32."""
    return make_toy_cls_data(
        tmp_path_factory.mktemp('toy_cls'),
        train_per_class=4,
        val_per_class=2,
        size=32)


@pytest.fixture(scope='session')
def toy_cls_work_dir(toy_cls_root, tmp_path_factory):
    """Work dir of one epoch (2 iterations of 8 images) of the toy
    classification config through ``tools/train.py``."""
    work_dir = tmp_path_factory.mktemp('toy_cls_work')
    _run_tool('tools/train.py', TOY_CLS_CONFIG, '--work-dir', work_dir,
              '--cfg-options', 'train_cfg.max_epochs=1',
              'train_dataloader.batch_size=8',
              *_data_root_options(toy_cls_root))
    return work_dir
