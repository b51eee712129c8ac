"""fairseq's precision flags as the plugin reads them, and the combinations that cannot run here.

fairseq's ``--amp`` is CUDA autocast (``torch.cuda.amp``): on a CPU run it changes nothing and
the model trains in float32 without a word. Its ``--fp16`` keeps flattened float32 master weights
on the current CUDA device and fails on CPU with a CUDA error. Its ``--bf16`` (and
``--memory-efficient-bf16``) implies ``--tpu`` and needs ``torch_xla`` on any device. The plugin's
task and criterions refuse these where they cannot run, with what to use instead;
``--memory-efficient-fp16`` and ``--fp16 --fp16-no-flatten-grads`` (half-precision models with
float32 master weights) run on CPU.
"""
# No ``from __future__ import annotations`` here: fairseq reads the dataclass field types at run time.
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import II

from fairseq.dataclass import FairseqDataclass

from deq_core import UsageError

__all__ = ["PrecisionFlags", "check_precision_flags"]


@dataclass
class PrecisionFlags(FairseqDataclass):
    """fairseq's own precision and device flags (``common.*``), mirrored into a task or criterion
    config so that it can check them."""

    fp16: bool = II("common.fp16")
    memory_efficient_fp16: bool = II("common.memory_efficient_fp16")
    fp16_no_flatten_grads: bool = II("common.fp16_no_flatten_grads")
    amp: bool = II("common.amp")
    bf16: bool = II("common.bf16")
    memory_efficient_bf16: bool = II("common.memory_efficient_bf16")
    cpu: bool = II("common.cpu")


def _flag(cfg: Any, name: str) -> bool:
    try:
        value = getattr(cfg, name, False)
    except Exception:  # an interpolation that cannot resolve outside fairseq-train's config
        return False
    return value is True


def check_precision_flags(cfg: Any) -> None:
    """Raise for precision flags fairseq cannot honour on this device (see the module docstring).

    Args:
        cfg: a config holding :class:`PrecisionFlags`' fields (missing or unresolved ones read
            as False).
    """
    bf16 = next((f"--{name.replace('_', '-')}" for name in ("memory_efficient_bf16", "bf16") if _flag(cfg, name)), None)
    if bf16 and importlib.util.find_spec("torch_xla") is None:
        raise UsageError(f"{bf16} in fairseq implies --tpu, which needs torch_xla (not installed): use "
                         "--memory-efficient-fp16, or --fp16 on CUDA (bfloat16 is not one of fairseq's precisions "
                         "off TPUs)")
    on_cuda = torch.cuda.is_available() and not _flag(cfg, "cpu")
    if on_cuda:
        return
    if _flag(cfg, "amp"):
        raise UsageError("--amp is fairseq's CUDA autocast (torch.cuda.amp): on CPU it does nothing and "
                         "the model would train in float32. Without CUDA use --memory-efficient-fp16 (a "
                         "half-precision model with float32 master weights), or drop --amp")
    if _flag(cfg, "fp16") and not (_flag(cfg, "memory_efficient_fp16") or _flag(cfg, "fp16_no_flatten_grads")):
        raise UsageError("--fp16 keeps its flattened float32 master weights on a CUDA device, and there "
                         "is none here: add --fp16-no-flatten-grads or use --memory-efficient-fp16")
