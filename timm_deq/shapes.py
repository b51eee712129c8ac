"""A generated image-classification dataset for offline demos and tests.

    python -m timm_deq.shapes OUT_DIR [--train-per-class 300] [--val-per-class 60] [--size 32]

Writes ``OUT_DIR/train/<class>/*.png`` and ``OUT_DIR/validation/<class>/*.png`` (an ImageFolder
that ``timm.data.create_dataset`` reads), ten classes of drawn shapes with random position, size,
colour, rotation and background noise. Nothing is downloaded; the same seed gives the same files.
"""
import argparse
import math
import os
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'make_shapes']

_Box = Tuple[float, float, float]  # centre x, centre y, radius


def _polygon(n: int, star: bool = False) -> Callable:
    def draw(d: ImageDraw.ImageDraw, box: _Box, angle: float, color) -> None:
        cx, cy, r = box
        k = 2 * n if star else n
        pts = []
        for i in range(k):
            rr = r * (0.45 if star and i % 2 else 1.0)
            a = angle + 2 * math.pi * i / k
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=color)
    return draw


def _circle(d, box, angle, color) -> None:
    cx, cy, r = box
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)


def _ring(d, box, angle, color) -> None:
    cx, cy, r = box
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(r / 3)))


def _cross(d, box, angle, color) -> None:
    cx, cy, r = box
    w = max(2, int(r / 2.5))
    for a in (angle, angle + math.pi / 2):
        dx, dy = r * math.cos(a), r * math.sin(a)
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=color, width=w)


def _stripes(direction: float) -> Callable:
    def draw(d, box, angle, color) -> None:
        cx, cy, r = box
        a = direction + 0.2 * (angle - math.pi)
        nx, ny = -math.sin(a), math.cos(a)
        for off in (-r, -r / 3, r / 3, r):
            ox, oy = cx + off * nx, cy + off * ny
            dx, dy = 1.5 * r * math.cos(a), 1.5 * r * math.sin(a)
            d.line([ox - dx, oy - dy, ox + dx, oy + dy], fill=color, width=max(1, int(r / 5)))
    return draw


def _dots(d, box, angle, color) -> None:
    cx, cy, r = box
    s = max(1.0, r / 5)
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            x, y = cx + i * r * 0.7, cy + j * r * 0.7
            d.ellipse([x - s, y - s, x + s, y + s], fill=color)


CLASSES: Dict[str, Callable] = {
    'circle': _circle,
    'ring': _ring,
    'triangle': _polygon(3),
    'square': _polygon(4),
    'hexagon': _polygon(6),
    'star': _polygon(5, star=True),
    'cross': _cross,
    'horizontal_stripes': _stripes(0.0),
    'vertical_stripes': _stripes(math.pi / 2),
    'dots': _dots,
}


def _image(rng: np.random.Generator, draw: Callable, size: int) -> Image.Image:
    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), 'RGB')
    color = tuple(int(c) for c in (background + rng.integers(90, 166, size=3) * rng.choice([-1, 1], size=3)) % 256)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    draw(ImageDraw.Draw(img), (cx, cy, r), rng.uniform(0, 2 * math.pi), color)
    return img


def make_shapes(root: str, train_per_class: int = 300, val_per_class: int = 60, size: int = 32,
                seed: int = 0) -> str:
    """Write the dataset under ``root`` (created if needed) and return ``root``."""
    for name, count in (('train', train_per_class), ('validation', val_per_class)):
        if count < 1:
            raise ValueError(f'{name} images per class must be >= 1, got {count}')
    if size < 16:
        raise ValueError(f'image size must be >= 16 pixels, got {size}')
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('validation', val_per_class)):
        for cls, draw in CLASSES.items():
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                _image(rng, draw, size).save(os.path.join(folder, f'{i:05d}.png'))
    return root


def main() -> None:
    """Run the shape generator from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='output folder')
    parser.add_argument('--train-per-class', type=int, default=300)
    parser.add_argument('--val-per-class', type=int, default=60)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    make_shapes(args.root, args.train_per_class, args.val_per_class, args.size, args.seed)
    print(f'wrote {len(CLASSES)} classes to {args.root}')


if __name__ == '__main__':
    main()
