"""The toy COCO generator: deterministic, valid COCO, all-or-nothing."""
import json

import numpy as np
import pytest
from PIL import Image

from detection_utils import CLASSES, make_toy_coco


def _load(root, split):
    with open(root / 'annotations' / f'{split}.json') as f:
        return json.load(f)


def test_same_arguments_same_files(tmp_path):
    first = make_toy_coco(tmp_path / 'a', num_train=6, num_val=3, seed=3)
    second = make_toy_coco(tmp_path / 'b', num_train=6, num_val=3, seed=3)
    other = make_toy_coco(tmp_path / 'c', num_train=6, num_val=3, seed=4)
    for split in ('train', 'val'):
        assert _load(first, split) == _load(second, split)
        assert _load(first, split) != _load(other, split)
        for path in (first / split).iterdir():
            assert path.read_bytes() == (second / split /
                                         path.name).read_bytes()
    assert _load(first, 'train') != _load(first, 'val')


def test_annotations_describe_the_images(tmp_path):
    root = make_toy_coco(
        tmp_path / 'toy', num_train=20, num_val=2, img_size=96)
    coco = _load(root, 'train')
    assert [c['name'] for c in coco['categories']] == list(CLASSES)
    assert len(coco['images']) == 20
    by_image = {img['id']: [] for img in coco['images']}
    for ann in coco['annotations']:
        by_image[ann['image_id']].append(ann)
    for img in coco['images']:
        pixels = np.asarray(Image.open(root / 'train' / img['file_name']))
        assert pixels.shape == (96, 96, 3)
        anns = by_image[img['id']]
        assert 1 <= len(anns) <= 4
        for ann in anns:
            x, y, w, h = ann['bbox']
            assert 0 <= x and x + w <= 96 and 0 <= y and y + h <= 96
            assert 0 < ann['area'] <= w * h and ann['iscrowd'] == 0
            # the box centre shows the class colour, not the background
            centre = pixels[int(y + h * 0.6), int(x + w / 2)].astype(int)
            assert np.argmax(centre) == [0, 1, 2][ann['category_id'] - 1]
        for a in anns:  # boxes do not overlap
            for b in anns:
                if a is not b:
                    ax, ay, aw, ah = a['bbox']
                    bx, by, bw, bh = b['bbox']
                    assert (ax + aw <= bx or bx + bw <= ax or ay + ah <= by
                            or by + bh <= ay)
    sizes = {ann['bbox'][2] for ann in coco['annotations']}
    assert len(sizes) > 10  # varied sizes


def test_existing_dataset_is_kept_and_partial_one_refused(tmp_path):
    root = make_toy_coco(tmp_path / 'toy', num_train=2, num_val=1)
    stamp = (root / 'annotations' / 'train.json').stat().st_mtime_ns
    assert make_toy_coco(root, num_train=5, num_val=5) == root
    assert (root / 'annotations' / 'train.json').stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ['toy']
    (tmp_path / 'partial').mkdir()
    with pytest.raises(FileExistsError, match='partial'):
        make_toy_coco(tmp_path / 'partial')
