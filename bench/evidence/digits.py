"""scikit-learn's bundled handwritten digits (UCI optdigits test set: 1797 8x8 images, 10 classes)
as a timm ImageFolder, upscaled; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image

__all__ = ["write_digits"]


def write_digits(root: Path, img_size: int, limit: int = 0, val_every: int = 5) -> Dict[str, int]:
    """Write ``root/train/<digit>/*.png`` and ``root/validation/<digit>/*.png``: every
    ``val_every``-th image of each class goes to validation. Images are upscaled from 8x8 to
    ``img_size`` (bilinear) and stored as RGB. Returns the image count per split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = data.images, data.target
    if limit:
        images, labels = images[:limit], labels[:limit]
    counts = {"train": 0, "validation": 0}
    seen = np.zeros(10, dtype=int)
    for i, (image, label) in enumerate(zip(images, labels)):
        split = "validation" if seen[label] % val_every == 0 else "train"
        seen[label] += 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image * (255.0 / 16.0)).round().astype(np.uint8)  # digits' pixels range over 0..16
        Image.fromarray(pixels).resize((img_size, img_size), Image.BILINEAR).convert("RGB").save(
            folder / f"{i:04d}.png")
        counts[split] += 1
    return counts
