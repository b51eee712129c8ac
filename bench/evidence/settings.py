"""The experiment settings: a seconds-long smoke setting, the CPU ``--quick`` run and the full GPU run."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Tuple

__all__ = ["Settings", "PRESETS"]


@dataclass(frozen=True)
class Settings:
    """Everything that sizes the evidence run. Vision and methods: ``mdeq_tiny_cifar`` on an image
    set of :mod:`.datasets` at ``img_size`` for ``epochs`` (``methods_epochs`` in the methods
    experiment); language: ``deq_transformer_lm_tiny`` and a matched ``transformer_lm`` on the
    standard-library docstring corpus, each for ``lm_max_update`` updates (and the baseline also
    for the DEQ's wall-clock); cost: the core benchmark's cases with ``cost_repeats`` timed
    repetitions."""

    name: str
    device: str = "cpu"
    seeds: int = 3
    jobs: int = 2                     # concurrent single-threaded runs (CPU); 1 runs them in this process
    # vision
    dataset: str = "mnist5k"         # bench.evidence.datasets: "digits" (8x8, 1797) or "mnist5k" (28x28, 5000)
    img_size: int = 28
    epochs: int = 8
    methods_epochs: int = 3           # the methods experiment's shorter budget (every arm the same)
    batch_size: int = 64
    digits_limit: int = 0             # use only the first N images of the set (0: all)
    jac_weight: float = 0.4
    jac_freq: float = 0.5
    f_max_iter: int = 8               # training forward limit
    b_max_iter: int = 7               # training backward limit
    probe_images: int = 128           # held-out images the per-epoch stability probe uses
    probe_max_iter: int = 40          # the probe's solver limit (steps needed to reach the tolerance)
    hard_stop_limits: Tuple[int, ...] = tuple(range(1, 13))
    # language
    lm_max_update: int = 2000         # updates per run (the equal-updates comparison)
    lm_validate_every: int = 250      # updates between validations (and training log records)
    lm_paragraphs: int = 0            # corpus size in docstring paragraphs (0: all)
    lm_pretrain_steps: int = 200
    lm_eval_max_iter: int = 30        # the DEQs' forward limit in validation (steps to tolerance)
    # JR (weight, frequency) pairs tried on the validation split with seed lm_tune_seed
    lm_jr_grid: Tuple[Tuple[float, float], ...] = ((1.0, 0.35), (0.3, 0.35), (0.1, 0.35), (0.3, 1.0))
    lm_tune_seed: int = 100
    # cost
    cost_repeats: int = 3

    def override(self, **changes) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS = {
    # End to end in about a minute: for tests of the experiment code (worker pools included), not for reading.
    "tiny": Settings(name="tiny", seeds=1, jobs=2, dataset="digits", img_size=16, epochs=1, methods_epochs=1,
                     batch_size=32, digits_limit=200, probe_images=16, probe_max_iter=10, hard_stop_limits=(1, 4),
                     lm_max_update=12, lm_validate_every=6, lm_paragraphs=300, lm_pretrain_steps=4,
                     lm_eval_max_iter=10, lm_jr_grid=((0.3, 1.0),), cost_repeats=1),
    # The CPU run (2 cores: 1.6 to 4 hours, by machine).
    "quick": Settings(name="quick"),
    # The GPU run (one GPU): longer training, more seeds.
    "full": Settings(name="full", device="cuda", seeds=5, jobs=1, epochs=60, methods_epochs=30,
                     batch_size=128, probe_images=256, probe_max_iter=60, lm_max_update=50000,
                     lm_validate_every=2500, lm_pretrain_steps=2000, cost_repeats=10),
}
