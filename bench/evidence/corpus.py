"""The language experiments' corpus: all the English prose Python ships, read from its files
(nothing imported, nothing downloaded): every docstring of the standard library's modules and the
language reference's help topics (``pydoc_data.topics``)."""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import List

from fairseq_deq.demo import prose_paragraphs

__all__ = ["stdlib_prose", "SOURCE"]

SOURCE = ("every docstring of the Python standard library's modules (tests, idlelib and turtledemo "
          "left out) and the language reference's help topics in `pydoc_data.topics`")
_SKIP = {"test", "tests", "idlelib", "turtledemo", "site-packages", "dist-packages", "__pycache__"}


def _docstrings(path: Path) -> List[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds) and (doc := ast.get_docstring(node))]


def stdlib_prose() -> List[str]:
    """Tokenized paragraphs of :data:`SOURCE`, in a fixed order (files sorted by path, then the
    topics by name): the same list for a given Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: List[str] = []
    for path in sorted(root.rglob("*.py")):
        if not _SKIP.intersection(path.relative_to(root).parts):
            texts += _docstrings(path)
    from pydoc_data.topics import topics

    texts += [topics[name] for name in sorted(topics)]
    return prose_paragraphs(texts)
