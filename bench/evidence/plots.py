"""The report's PNG figures (matplotlib's object API: no pyplot state, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._summary import curve, mean_sd
from .arms import ARMS
from .language import MODELS

__all__ = ["vision_figures", "methods_figure", "language_figure"]

_COLORS = {"implicit": "tab:blue", "implicit + JR": "tab:orange", "deq_nojr": "tab:blue", "deq_jr": "tab:orange",
           "transformer": "tab:green", "transformer_time": "tab:olive"}
_PALETTE = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:cyan")


def _color(arm: str) -> str:
    others = [a for a in ARMS if a not in _COLORS]
    return _COLORS.get(arm) or _PALETTE[others.index(arm) % len(_PALETTE)]


def _stability(by_arm: Dict[str, List[Dict[str, Any]]], probe_max_iter: int, path: Path, title: str) -> None:
    panels = [
        ("f_steps", f"forward steps to tolerance (limit {probe_max_iter})", False),
        ("b_steps", f"backward steps to tolerance (limit {probe_max_iter})", False),
        ("jac_fro", r"$\|J_f(z^*)\|_F^2\,/\,d$ (Hutchinson)", True),
        ("spectral_radius", r"spectral radius of $J_f(z^*)$", False),
        ("train_f_rel_res", "train: forward rel. residual at the limit", True),
        ("top1", "validation top-1 (%)", False),
    ]
    epochs = [e["epoch"] for runs in by_arm.values() for e in runs[0]["epochs"]]
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    for ax, (key, panel, log) in zip(axes, panels):
        for arm, runs in by_arm.items():
            xs = [e["epoch"] for e in runs[0]["epochs"]]
            mean, low, high = curve([[e.get(key) for e in r["epochs"]] for r in runs])
            seeds = f"{len(runs)} seed" + ("" if len(runs) == 1 else "s")
            ax.plot(xs, mean, marker="o", ms=3, color=_color(arm), label=f"{arm} ({seeds})")
            ax.fill_between(xs, low, high, color=_color(arm), alpha=0.2, linewidth=0)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def methods_figure(by_arm: Dict[str, List[Dict[str, Any]]], probe_max_iter: int, out: Path) -> str:
    """``methods.png``: the panels of ``vision_nfe.png`` for the methods experiment's runs (by arm,
    :func:`.arms.runs_by_arm`), whose probe runs once, after the last epoch; returns the file name."""
    name = "methods.png"
    _stability(by_arm, probe_max_iter, out / name,
               "Every method: training solver and accuracy over training; probe after the last epoch")
    return name


def vision_figures(by_arm: Dict[str, List[Dict[str, Any]]], probe_max_iter: int, out: Path) -> Dict[str, str]:
    """``vision_nfe.png`` (stability probe, training solver and accuracy over training, mean and
    min-max band over seeds, one colour per arm) and ``vision_hard_stop.png`` (accuracy against
    the forward limit) from the runs of each arm (:func:`.arms.runs_by_arm`); file names by key."""
    files = {"nfe": "vision_nfe.png", "hard_stop": "vision_hard_stop.png"}
    _stability(by_arm, probe_max_iter, out / files["nfe"],
               "Vision: solver stability over training (held-out probe batch, eval mode; training solver)")

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    for arm, runs in by_arm.items():
        limits = [h["f_limit"] for h in runs[0]["hard_stop"]]
        stats = [mean_sd(r["hard_stop"][i]["top1"] for r in runs) for i in range(len(limits))]
        ax.errorbar(limits, [m for m, _, _ in stats], yerr=[0 if math.isnan(sd) else sd for _, sd, _ in stats],
                    marker="o", capsize=3, color=_color(arm), label=arm)
    ax.set_xlabel("forward solver limit (iterations)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Vision: accuracy when the forward solver is hard-stopped", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / files["hard_stop"], dpi=110)
    return files


def language_figure(language: Dict[str, Any], out: Path) -> str:
    """``language.png``: validation perplexity against updates and against training wall-clock
    (every run), and the DEQs' training forward steps and forward residual over updates."""
    fig = Figure(figsize=(14, 8), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for model in MODELS:
        runs = [r for r in language["runs"] if r["model"] == model]
        for i, r in enumerate(runs):
            label = MODELS[model] if i == 0 else None
            points = [v for v in r["valid"] if v["seconds"] is not None]
            style = dict(color=_COLORS[model], alpha=0.8, label=label)
            axes[0].plot([v["updates"] for v in points], [v["ppl"] for v in points], marker="o", ms=3, **style)
            axes[1].plot([v["seconds"] for v in points], [v["ppl"] for v in points], marker="o", ms=3, **style)
            if not model.startswith("deq"):
                continue
            axes[2].plot([t["updates"] for t in r["train"]], [t["f_steps"] for t in r["train"]], **style)
            axes[3].plot([t["updates"] for t in r["train"]], [t["f_rel_res"] for t in r["train"]], **style)
    titles = (("validation perplexity", "updates"),
              ("validation perplexity", "training wall-clock (s, validation included)"),
              ("train: forward solver steps per update", "updates"),
              ("train: forward rel. residual at the limit", "updates"))
    for ax, (title, xlabel) in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[1], axes[3]):
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("Language: one line per run (seed)")
    name = "language.png"
    fig.savefig(out / name, dpi=110)
    return name
