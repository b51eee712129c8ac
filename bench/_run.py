"""What every benchmark's command line shares: the device and thread flags, the header line, and
waiting for the device before reading a clock."""
from __future__ import annotations

import argparse

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
