"""What every benchmark's command line shares: the device and thread flags, the header line,
waiting for the device before reading a clock, timing functions alternately, and the relative
error of a set of tensors."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Mapping, Sequence

import torch


def add_device_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--device`` (default cpu) and ``--threads`` (0: leave torch's count as it is)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    return parser


def device_from(args: argparse.Namespace) -> torch.device:
    """The device named by ``args.device``, after applying ``args.threads``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def describe(device: torch.device) -> str:
    """``torch <version>, device <device> (<GPU name> | <n> threads)``, the first line of a report."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, device {device} ({where})"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a clock read measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each function of ``fns``, after one warm-up call of each, the
    calls interleaved (A B C A B C ...) so that machine noise hits every function alike."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def relative_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """``||got - ref|| / ||ref||`` over all the tensors together (in float64), e.g. every
    parameter's gradient against a reference's."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, ref))
    den = sum(float(b.double().pow(2).sum()) for b in ref)
    return (num / max(den, 1e-300)) ** 0.5
