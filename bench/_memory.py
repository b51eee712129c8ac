"""Activation memory as autograd sees it, for benchmarks that run on CPU (no allocator stats)."""
from typing import Callable, Dict, Iterable, TypeVar

import torch

T = TypeVar("T")


def saved_activation_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> "tuple[T, int]":
    """Run ``fn`` and return its result with the bytes of the distinct storages autograd saved
    for backward meanwhile, leaving out those of ``exclude`` (the parameters)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())
