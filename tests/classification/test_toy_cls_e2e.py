"""The toy classification config end to end: generated data, a short
training run through tools/train.py, top-1 accuracy through tools/test.py."""
import re

from mmpretrain.datasets import CustomDataset

# tools/misc is on sys.path through conftest.py
from make_toy_cls_data import CLASSES, make_toy_cls_data


def test_toy_data_is_deterministic_folder_dataset(tmp_path):
    first = make_toy_cls_data(tmp_path / 'a', 2, 1, size=16)
    second = make_toy_cls_data(tmp_path / 'b', 2, 1, size=16)
    files = sorted(p.relative_to(first) for p in first.rglob('*.png'))
    assert len(files) == len(CLASSES) * 3
    assert all((first / f).read_bytes() == (second / f).read_bytes()
               for f in files)
    other_seed = make_toy_cls_data(tmp_path / 'c', 2, 1, size=16, seed=1)
    assert (first / files[0]).read_bytes() != (other_seed /
                                               files[0]).read_bytes()

    dataset = CustomDataset(data_root=str(first), data_prefix='train')
    assert dataset.CLASSES == CLASSES
    assert len(dataset) == len(CLASSES) * 2


def test_train_then_test_reports_top1(toy_cls_config, toy_cls_root,
                                      toy_cls_work_dir, run_tool,
                                      data_root_options, tmp_path):
    checkpoint = toy_cls_work_dir / 'epoch_1.pth'
    assert checkpoint.is_file()

    output = run_tool('tools/test.py', toy_cls_config, checkpoint,
                      '--work-dir', tmp_path, '--cfg-options',
                      *data_root_options(toy_cls_root))
    top1 = float(re.search(r'accuracy/top1: ([\d.]+)', output).group(1))
    # 8 validation images: top-1 is a multiple of 12.5%.
    assert 0 <= top1 <= 100 and top1 % 12.5 == 0
