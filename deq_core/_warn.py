"""Warnings attributed to the user's code: the first frame outside deq_core."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first caller outside this package (so that
    the warning names the user's line and the once-per-location filter works per call site)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _internal(filename: str) -> bool:
    # "<string>": code generated at import time, such as a dataclass's __init__.
    return filename == "<string>" or os.path.abspath(filename).startswith(_PACKAGE_DIR)
