"""fairseq's command-line tools report a refused flag in one line, as argparse reports its own.

The plugin raises :class:`deq_core.UsageError` (and the layer's options
:class:`deq_core.OptionError`) naming the flag, from code fairseq's tools call while they set up;
those tools let the exception reach the interpreter, which would print a traceback through
fairseq's internals. When the running program is one of fairseq's tools, uncaught errors of
these classes print ``<tool>: error: <message>`` instead (exit status 1); any other exception,
and every program that is not a fairseq tool, keeps Python's report.
"""
from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Optional, Type

from deq_core import OptionError, UsageError

__all__ = ["report_flag_errors_in_one_line"]


def _fairseq_tool() -> Optional[str]:
    """The running fairseq tool's name (``fairseq-train``, ``python -m fairseq_cli.train``), or None."""
    path = sys.argv[0] if sys.argv else ""
    name = os.path.basename(path)
    if name.startswith("fairseq-"):
        return name
    if os.path.basename(os.path.dirname(path)) == "fairseq_cli" and name.endswith(".py"):
        return "fairseq-" + name[:-3].replace("_", "-")
    return None


def report_flag_errors_in_one_line() -> None:
    """Install the report in ``sys.excepthook`` when the running program is a fairseq tool (once)."""
    tool = _fairseq_tool()
    previous = sys.excepthook
    if tool is None or getattr(previous, "_reports_flag_errors", False):
        return

    def hook(kind: Type[BaseException], err: BaseException, tb: Optional[TracebackType]) -> None:
        if issubclass(kind, (UsageError, OptionError)):
            sys.stderr.write(f"{tool}: error: {err}\n")
        else:
            previous(kind, err, tb)

    hook._reports_flag_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
