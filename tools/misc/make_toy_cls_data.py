"""Generate the toy classification dataset of ``configs/demo/*cls*.py``.

An ImageNet-style folder tree that MMPretrain's ``CustomDataset`` reads
(class = sub-folder name)::

    OUT/train/<class>/<index>.png
    OUT/val/<class>/<index>.png

Each image is one filled shape (the class) of random colour, size and
position on a noisy background. The same seed gives the same files.

    python tools/misc/make_toy_cls_data.py data/toy_cls
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'cross', 'square', 'triangle')


def draw_shape(shape: str, size: int,
               rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image showing ``shape``."""
    noise = rng.integers(0, 96, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    radius = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    color = tuple(int(c) for c in rng.integers(128, 256, 3))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(img)
    if shape == 'circle':
        draw.ellipse(box, fill=color)
    elif shape == 'square':
        draw.rectangle(box, fill=color)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius),
                      (cx + radius, cy + radius)],
                     fill=color)
    else:  # cross
        bar = radius / 3
        draw.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), color)
        draw.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), color)
    return img


def make_toy_cls_data(out: str,
                      train_per_class: int = 40,
                      val_per_class: int = 10,
                      size: int = 32,
                      seed: int = 0) -> Path:
    """Write the dataset under ``out`` and return its root."""
    root = Path(out)
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for shape in CLASSES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_shape(shape, size, rng).save(folder / f'{index:04d}.png')
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out', help='output folder, e.g. data/toy_cls')
    parser.add_argument('--train-per-class', type=int, default=40)
    parser.add_argument('--val-per-class', type=int, default=10)
    parser.add_argument('--size', type=int, default=32, help='image side')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    root = make_toy_cls_data(args.out, args.train_per_class,
                             args.val_per_class, args.size, args.seed)
    print(f'toy classification data ({len(CLASSES)} classes) in {root}')


if __name__ == '__main__':
    main()
