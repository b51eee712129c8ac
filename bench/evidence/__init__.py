"""The evidence suite: the paper's claims reproduced at small scale with this project's code.

``python -m bench.evidence --quick`` runs every experiment on a CPU and writes ``docs/RESULTS.md``
with its figures; see ``__main__.py`` for the options and ``settings.py`` for what each preset runs.
"""
