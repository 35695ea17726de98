"""Generate the toy COCO-format detection dataset of ``configs/demo/``.

Synthetic scenes of one to four non-overlapping filled shapes (the classes:
red squares, green discs, blue triangles) at varied sizes and positions on
a noisy greyish background, laid out as MMDetection's ``CocoDataset`` reads
them::

    OUT/train/000000.png ...        OUT/annotations/train.json
    OUT/val/000000.png ...          OUT/annotations/val.json

The same arguments give the same files. The dataset is written to a temporary
sibling folder and renamed into place, so OUT is either complete or absent;
an existing complete OUT is left as it is.

    python tools/misc/make_toy_coco.py data/toy_coco
"""
import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('square', 'disc', 'triangle')
COLOURS = ((210, 40, 40), (40, 170, 60), (40, 70, 220))
SPLITS = ('train', 'val')


def polygon(shape: str, x: int, y: int, side: int) -> list:
    """Outline of ``shape`` filling the box (x, y, side, side), as [(x, y)]."""
    if shape == 'square':
        return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
    if shape == 'triangle':
        return [(x + side / 2, y), (x + side, y + side), (x, y + side)]
    radius = side / 2
    return [(x + radius + radius * math.cos(2 * math.pi * i / 32),
             y + radius + radius * math.sin(2 * math.pi * i / 32))
            for i in range(32)]


def apart(a: tuple, b: tuple, gap: int = 2) -> bool:
    """Whether square boxes ``a`` and ``b``, (x, y, side), are ``gap``
    pixels apart."""
    (ax, ay, a_side), (bx, by, b_side) = a, b
    return (ax + a_side + gap <= bx or bx + b_side + gap <= ax
            or ay + a_side + gap <= by or by + b_side + gap <= ay)


def place_boxes(rng: np.random.Generator, img_size: int, min_side: int,
                max_side: int, max_objects: int) -> list:
    """Up to ``max_objects`` square boxes (x, y, side) inside the image,
    apart from each other."""
    boxes = []
    target = rng.integers(1, max_objects + 1)
    for _ in range(50 * max_objects):
        if len(boxes) == target:
            break
        side = int(rng.integers(min_side, max_side + 1))
        x, y = (int(v) for v in rng.integers(0, img_size - side + 1, 2))
        if all(apart((x, y, side), box) for box in boxes):
            boxes.append((x, y, side))
    return boxes


def draw_scene(rng: np.random.Generator, img_size: int, min_side: int,
               max_side: int, max_objects: int):
    """One RGB image and its objects as (class index, polygon, box)."""
    background = rng.integers(70, 190) + rng.integers(-30, 31, 3)
    noise = rng.normal(0, 12, (img_size, img_size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    objects = []
    for x, y, side in place_boxes(rng, img_size, min_side, max_side,
                                  max_objects):
        label = int(rng.integers(len(CLASSES)))
        outline = polygon(CLASSES[label], x, y, side)
        colour = np.clip(
            np.array(COLOURS[label]) + rng.integers(-25, 26, 3), 0, 255)
        draw.polygon(outline, fill=tuple(int(c) for c in colour))
        objects.append((label, outline, (x, y, side, side)))
    return img, objects


def polygon_area(outline: list) -> float:
    """Shoelace area of a closed polygon [(x, y)]."""
    xs, ys = np.array(outline).T
    return float(abs(xs @ np.roll(ys, 1) - ys @ np.roll(xs, 1)) / 2)


def write_split(root: Path, split: str, count: int, img_size: int,
                seed: int) -> None:
    """Write ``count`` scenes to root/split/ and root/annotations/."""
    (root / split).mkdir(parents=True)
    min_side, max_side = round(img_size * 0.12), round(img_size * 0.4)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS.index(split), index])
        img, objects = draw_scene(rng, img_size, min_side, max_side, 4)
        file_name = f'{index:06d}.png'
        img.save(root / split / file_name)
        images.append(
            dict(
                id=index, file_name=file_name, width=img_size,
                height=img_size))
        for label, outline, box in objects:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=index,
                    category_id=label + 1,
                    bbox=list(box),
                    area=polygon_area(outline),
                    iscrowd=0,
                    segmentation=[[round(v, 2) for xy in outline
                                   for v in xy]]))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    coco = dict(images=images, annotations=annotations, categories=categories)
    with open(root / 'annotations' / f'{split}.json', 'w') as f:
        json.dump(coco, f)


def make_toy_coco(out: str,
                  num_train: int = 400,
                  num_val: int = 100,
                  img_size: int = 128,
                  seed: int = 0) -> Path:
    """Write the dataset to ``out`` unless it is already there; return it."""
    root = Path(out)
    if all((root / 'annotations' / f'{s}.json').is_file() for s in SPLITS):
        return root
    if root.exists():
        raise FileExistsError(f'{root} exists but is not a complete toy COCO '
                              'dataset; remove it and run again')
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}-', dir=root.parent))
    try:
        tmp.chmod(0o755)
        (tmp / 'annotations').mkdir()
        for split, count in zip(SPLITS, (num_train, num_val)):
            write_split(tmp, split, count, img_size, seed)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='output folder, e.g. data/toy_coco')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument(
        '--img-size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    try:
        root = make_toy_coco(args.out, args.num_train, args.num_val,
                             args.img_size, args.seed)
    except FileExistsError as error:
        raise SystemExit(f'error: {error}')
    print(f'toy COCO dataset ({", ".join(CLASSES)}) in {root}')


if __name__ == '__main__':
    main()
