"""Errors that name the options they refuse, so that a command line can name its flags."""
from __future__ import annotations

from typing import Tuple

__all__ = ["OptionError", "OptionValueError", "OptionTypeError", "UsageError"]


class OptionError(Exception):
    """An option value refused; ``options`` names the options involved, the one to change
    first (e.g. ``("f_max_iter_jitter", "f_max_iter")``), so that an entry point can name the
    flags that set them.

    Args:
        message: the explanation.
        *options: the options' names (config fields or model keyword arguments).
    """

    def __init__(self, message: str, *options: str) -> None:
        super().__init__(message)
        self.options: Tuple[str, ...] = tuple(options)


class OptionValueError(OptionError, ValueError):
    """An option with a value outside what it accepts."""


class OptionTypeError(OptionError, TypeError):
    """An option of the wrong type."""


class UsageError(ValueError):
    """A command-line value a run cannot use; the message names the flag and what it accepts.

    Library functions raise it (a ``ValueError``, for callers that use them as a library); the
    command-line tools report it in one line, as argparse reports its own errors.
    """
