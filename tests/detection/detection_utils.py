"""Helpers of the detection tests: paths, and running the tools on toy data."""
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOY_FASTER_RCNN = 'configs/demo/faster-rcnn_r18-aik_fpn_toy-coco.py'
TOY_RETINANET = 'configs/demo/retinanet_r18-aik_fpn_toy-coco.py'

sys.path.insert(0, str(REPO / 'tools'))
sys.path.insert(0, str(REPO / 'tools/misc'))
from make_toy_coco import CLASSES, make_toy_coco  # noqa: E402,F401


def run(*args, env: dict = None) -> subprocess.CompletedProcess:
    """Run ``args`` (``python`` stands for this interpreter) in the repo
    root; stdout and stderr together in ``.stdout``. One OpenMP thread, as
    torchrun gives each process: two spin against a busy 2-core machine."""
    args = [sys.executable if a == 'python' else str(a) for a in args]
    return subprocess.run(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env={
            'OMP_NUM_THREADS': '1',
            **os.environ, 'PYTHON': sys.executable,
            **(env or {})
        })


def run_ok(*args, env: dict = None) -> str:
    """:func:`run` that must succeed; returns its output."""
    proc = run(*args, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def toy_options(config: str, root, epochs: int = 1) -> list:
    """``--cfg-options`` for a toy ``config``: data under ``root``,
    ``epochs`` epochs of 4-image batches, validation, checkpoint and log
    every epoch, and every detection kept (an untrained model scores low)."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    options = [f'{loader}.dataset.data_root={root}' for loader in loaders]
    options += [
        f'{phase}_evaluator.ann_file={root}/annotations/val.json'
        for phase in ('val', 'test')
    ]
    test_cfg = 'rcnn.' if config == TOY_FASTER_RCNN else ''
    return options + [
        f'train_cfg.max_epochs={epochs}',
        'train_cfg.val_interval=1',
        'train_dataloader.batch_size=4',
        'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1',
        f'model.test_cfg.{test_cfg}score_thr=0',
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]
