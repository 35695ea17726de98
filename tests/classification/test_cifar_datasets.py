"""The CIFAR configs build their datasets from a small copy generated in
CIFAR's own on-disk layout (python pickles, no download).

MMPretrain's ``CIFAR10``/``CIFAR100`` verify every file against the md5 of
the real release, which a generated copy cannot match. The stock classes
must therefore reject it (checked below); the configs are then built with a
subclass that differs only in its md5 table, set to the generated files'
own checksums, so the integrity check and the loading code still run.
"""
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmpretrain.datasets import CIFAR10, CIFAR100
from mmpretrain.registry import DATASETS

REPO = Path(__file__).resolve().parents[2]
CIFAR_CONFIGS = sorted((REPO / 'configs/aik_resnet').glob('*cifar*.py'))
PER_FILE = 6  # images per pickle


def write_cifar(root: Path, cls) -> dict:
    """Write ``cls``'s files under ``root/cls.base_folder``; return the
    labels written per split."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    num_classes = len(cls.METAINFO['classes'])
    label_key = 'labels' if cls is CIFAR10 else 'fine_labels'
    rng = np.random.default_rng(0)
    labels = {}
    for split, files in (('train', cls.train_list), ('test', cls.test_list)):
        labels[split] = []
        for name, _ in files:
            batch_labels = rng.integers(0, num_classes, PER_FILE).tolist()
            labels[split] += batch_labels
            entry = {
                'data': rng.integers(0, 256, (PER_FILE, 3 * 32 * 32),
                                     dtype=np.uint8),
                label_key: batch_labels,
            }
            (folder / name).write_bytes(pickle.dumps(entry))
    meta = {cls.meta['key']: list(cls.METAINFO['classes'])}
    (folder / cls.meta['filename']).write_bytes(pickle.dumps(meta))
    return labels


def with_own_checksums(cls, root: Path):
    """``cls`` with its md5 table set to the files under ``root``."""
    folder = root / cls.base_folder

    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    return type(
        f'Generated{cls.__name__}', (cls, ),
        dict(
            train_list=[[name, md5(name)] for name, _ in cls.train_list],
            test_list=[[name, md5(name)] for name, _ in cls.test_list],
            meta={
                **cls.meta, 'md5': md5(cls.meta['filename'])
            }))


@pytest.mark.parametrize('cls', [CIFAR10, CIFAR100])
def test_stock_cifar_rejects_generated_copy(cls, tmp_path):
    write_cifar(tmp_path, cls)
    with pytest.raises(RuntimeError, match='Cannot find'):
        cls(data_root=str(tmp_path), download=False)


@pytest.mark.parametrize('path', CIFAR_CONFIGS, ids=lambda p: p.name)
def test_cifar_config_builds_datasets(path, tmp_path):
    cfg = Config.fromfile(str(path))
    init_default_scope(cfg.default_scope)
    cls = CIFAR100 if cfg.train_dataloader.dataset.type == 'CIFAR100' \
        else CIFAR10
    labels = write_cifar(tmp_path, cls)

    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        dataset_cfg = loader.dataset
        split = dataset_cfg.split
        dataset_cfg.update(
            type=with_own_checksums(cls, tmp_path),
            data_root=str(tmp_path),
            download=False)
        dataset = DATASETS.build(dataset_cfg)

        assert len(dataset.CLASSES) == cfg.model.head.num_classes
        assert len(dataset) == len(labels[split])
        sample = dataset[len(dataset) - 1]
        assert tuple(sample['inputs'].shape) == (3, 32, 32)
        assert sample['data_samples'].gt_label.item() == labels[split][-1]
