"""What the report says about the machine and the code a part ran on: the hardware line, the
package versions, the commit, and a speed figure that tells apart machines printing the same
name (cloud CPUs sold under one model string differ by up to 2x here)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The calibration workload: one 3x3 convolution of the vision runs' kind (batch 64, 32 channels,
# 28x28), float32; the runs themselves are single-threaded, so it is timed on one thread.
_CONV = dict(batch=64, channels=32, size=28)


def hardware(device: str) -> str:
    """The CPU's model name and logical CPU count, and the GPU's name when ``device`` is CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs"
    if device.startswith("cuda"):
        text += f", {torch.cuda.get_device_name(torch.device(device))}"
    else:
        text += ", no GPU used"
    return text


def versions() -> str:
    """Python, torch, timm, fairseq and this project's versions, as one line."""
    import fairseq
    import timm

    import deq_core
    out = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"timm {timm.__version__}",
           f"fairseq {fairseq.__version__}", f"deq-jr {deq_core.__version__}"]
    return ", ".join(out)


def commit() -> str:
    """The checkout's short commit, marked when the tree has uncommitted changes."""
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=here, check=True).stdout.strip()
        return f"`{rev}`" + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def conv_gflops(device: str, repeats: int = 7) -> float:
    """GFLOP/s of the calibration convolution on ``device`` (one CPU thread), the median of
    ``repeats`` timings after a warm-up."""
    dev = torch.device(device)
    n, c, hw = _CONV["batch"], _CONV["channels"], _CONV["size"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=generator).to(dev)
    weight = torch.randn(c, c, 3, 3, generator=generator).to(dev)
    flops = 2 * n * c * c * 9 * hw * hw
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for i in range(repeats + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            F.conv2d(x, weight, padding=1)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:  # the first call is the warm-up
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return flops / statistics.median(times) / 1e9
