"""Sphinx configuration of the deq-jr documentation (built strictly by .ci/run)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "deq-jr"
author = "the deq-jr developers"
copyright = "2026, the deq-jr developers"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "deq-jr"

# The API reference: public members in source order, with the signature's type hints in the
# description; Google-style Args/Returns sections.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Strict: every cross-reference must resolve (-n in .ci/run), except to the libraries this
# project builds on, whose inventories are not fetched (the build runs offline).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|timm|fairseq|omegaconf|argparse|numpy|typing|collections|enum|abc|weakref|types)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|State|T|S|SolverFn|Unread|Choices|Path|Namespace|ContextManager)"),
    (r"py:class", r"deq_core\..*\.(S|T)"),  # type variables
    (r"py:class", r"(optional|callable|Callable|Any|Iterable|Sequence|Mapping|Dict|List|Tuple|Optional|Union|"
                  r"Iterator|Type|ClassVar)(\[.*\])?"),
]
