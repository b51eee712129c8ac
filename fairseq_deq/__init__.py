"""fairseq_deq: the DEQ-Transformer language model for ``fairseq-train --user-dir fairseq_deq``.

fairseq imports this package by its folder name, then its ``models/`` and ``tasks/`` subfolders;
importing everything here registers the model, its architectures, the criterions
(``adaptive_loss_jr``, ``cross_entropy_jr``) and the task (``deq_language_modeling``) whichever
way the package is imported first.
"""
from . import criterions, models, tasks  # noqa: F401  (registration)
from ._cli_errors import report_flag_errors_in_one_line

report_flag_errors_in_one_line()
