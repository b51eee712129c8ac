"""fairseq_deq: the DEQ-Transformer language model for ``fairseq-train --user-dir fairseq_deq``.

fairseq imports this package by its folder name, then its ``models/`` and ``tasks/`` subfolders.
"""
