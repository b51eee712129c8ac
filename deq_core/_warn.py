"""Warnings attributed to the user's code: the first frame outside deq_core."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside this package and torch
    (module calls, optimizer hooks), so that the warning names the user's line."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: the caller of warn_user
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _internal(filename: str) -> bool:
    # "<string>": code generated at import time, such as a dataclass's __init__.
    path = os.path.abspath(filename)
    return filename == "<string>" or path.startswith(_PACKAGE_DIR) or path.startswith(_TORCH_DIR)
