"""``RESULTS.md``: what was run, on what, and the four experiments' tables with their figures."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from fairseq_deq.demo import STDLIB_MODULES

from ._summary import fmt, mean_sd
from .datasets import DESCRIPTIONS
from .language import MODELS

__all__ = ["write_report"]


# Training speed relative to Transformer-XL on WikiText-103 (paper, RTX 2080 Ti): 3.1x the time
# without JR, 1.4-1.6x with it.
_PAPER_SPEED = {"deq_nojr": "paper, vs Transformer-XL: 0.32x", "deq_jr": "paper, vs Transformer-XL: 0.63-0.71x"}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _concurrency(s: Dict[str, Any]) -> str:
    if s["device"] == "cpu" and s["jobs"] > 1:
        return f"Runs are single-threaded processes, {s['jobs']} at a time, in the order of the seeds."
    return "Runs go one after another."


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _last(runs, key):
    return [r["epochs"][-1].get(key) for r in runs]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"


def _vision(v: Dict[str, Any], s: Dict[str, Any], figures: Dict[str, str], img_dir: str) -> List[str]:
    by = {jr: [r for r in v["runs"] if r["jr"] == jr] for jr in (False, True)}
    seeds = len(by[True])
    c, cj = by[False][0]["config"], by[True][0]["config"]  # the equilibrium layers' settings as trained
    p = s["probe_max_iter"]
    lines = [
        "## 1. Vision: solver steps over training",
        "",
        f"`{v['model']}` from `timm_deq` ({s['img_size']}x{s['img_size']} inputs) trained through "
        f"`timm_deq.train` on {DESCRIPTIONS[v.get('dataset', 'digits')]}, at {s['img_size']}x{s['img_size']} "
        f"({v['images']['train']} training and "
        f"{v['images']['validation']} validation images, every 5th image of a class held out), "
        f"{_n(s['epochs'], 'epoch')}, batch {s['batch_size']}, AdamW 2e-3 with cosine decay, "
        f"training forward/backward limits {c['f_max_iter']}/{c['b_max_iter']} ({c['f_solver']}/{c['b_solver']}, "
        f"{c['f_stop_mode']}. tolerance {c['f_tol']:g} forward, {c['b_stop_mode']}. {c['b_tol']:g} backward). "
        f"The JR model adds weight {cj['jac_weight']:g} at frequency {cj['jac_freq']:g}; "
        f"everything else, seeds included, is the same. {_n(seeds, 'seed')} per model. {_concurrency(s)}",
        "",
        f"After every epoch a fixed batch of {s['probe_images']} validation images is probed in eval mode with "
        f"the solver limits raised to {p}: the forward and backward solver steps needed to reach the tolerances "
        f"(a sample that never reaches it counts {p}), ‖J_f(z*)‖_F²/d (Hutchinson, 8 probes, the quantity "
        "JR penalizes) and the spectral radius of `J_f(z*)` (20 power iterations). Epoch 0 is the initialization.",
        "",
        f"![solver stability over training]({img_dir}/{figures['nfe']})",
        "",
    ]
    header = ["model", "top-1 (%)", f"fwd steps to tol (<= {p})", "fwd converged", f"bwd steps to tol (<= {p})",
              "‖J_f‖_F²/d", "spectral radius", "train fwd rel. residual", "train+eval s/epoch"]
    rows = []
    for jr, runs in by.items():
        rows.append(["MDEQ + JR" if jr else "MDEQ, no JR", fmt(_last(runs, "top1")), fmt(_last(runs, "f_steps"), 1),
                     fmt(_last(runs, "f_converged"), 2), fmt(_last(runs, "b_steps"), 1),
                     fmt(_last(runs, "jac_fro"), 3), fmt(_last(runs, "spectral_radius"), 3),
                     fmt(_last(runs, "train_f_rel_res"), 4),
                     fmt([r["epochs"][-1]["seconds"] / (len(r["epochs"]) - 1) for r in runs], 1)])
    lines += ["At the last epoch (mean ± sd over seeds):", ""] + _table(header, rows) + [""]
    f_no, f_jr = mean_sd(_last(by[False], "f_steps"))[0], mean_sd(_last(by[True], "f_steps"))[0]
    f0_no = mean_sd(r["epochs"][0]["f_steps"] for r in by[False])[0]
    low = {jr: mean_sd(min(e["f_steps"] for e in r["epochs"]) for r in by[jr])[0] for jr in (False, True)}
    b_no, b_jr = mean_sd(_last(by[False], "b_steps"))[0], mean_sd(_last(by[True], "b_steps"))[0]
    acc_no, acc_jr = mean_sd(_last(by[False], "top1"))[0], mean_sd(_last(by[True], "top1"))[0]
    lines += [
        f"Read from the table: without JR the probe needed {f_no:.1f} forward steps at the end "
        f"({f0_no:.1f} at initialization, {low[False]:.1f} at its lowest), with JR {f_jr:.1f} (lowest "
        f"{low[True]:.1f}): no JR / JR = {_ratio(f_no, f_jr)} forward and "
        f"{_ratio(b_no, b_jr)} backward; top-1 {acc_no:.2f}% without JR and {acc_jr:.2f}% with it "
        f"({acc_jr - acc_no:+.2f} points).",
        "",
    ]
    return lines


def _hard_stop(v: Dict[str, Any], figures: Dict[str, str], img_dir: str) -> List[str]:
    by = {jr: [r for r in v["runs"] if r["jr"] == jr] for jr in (False, True)}
    limits = [h["f_limit"] for h in v["runs"][0]["hard_stop"]]
    rows = []
    for i, limit in enumerate(limits):
        row = [str(int(limit))]
        for jr in (False, True):
            row += [fmt([r["hard_stop"][i]["top1"] for r in by[jr]]),
                    fmt([r["hard_stop"][i]["f_rel_res"] for r in by[jr]], 3)]
        rows.append(row)
    return [
        "## 2. Vision: hard stopping",
        "",
        "The last checkpoint of each run of section 1 evaluated by `timm_deq.validate --eval-max-iter` with the "
        "forward solver stopped after at most the given number of iterations (it stops earlier at the tolerance), "
        "the shape of the paper's Table 3. Mean ± sd over seeds, full validation split. A limit of k "
        "iterations is k evaluations of f, and the layer returns f at the lowest-residual iterate z* among "
        "those it evaluated, f(z*), as it does in training: at limit 1 that is f(z0), one application of "
        "the weight-tied layer to the initial state z0 = 0.",
        "",
    ] + _table(["forward limit", "no JR: top-1 (%)", "no JR: rel. residual", "JR: top-1 (%)", "JR: rel. residual"],
               rows) + ["", f"![accuracy against the forward limit]({img_dir}/{figures['hard_stop']})", ""]


def _tokens_per_s(run: Dict[str, Any]) -> float:
    """A language run's mean training tokens/s over its logging intervals (fairseq's ``wps``)."""
    return mean_sd(t["wps"] for t in run["train"])[0]


def _final(run: Dict[str, Any], key: str) -> Optional[float]:
    points = [v for v in run["valid"] if v.get(key) is not None]
    return points[-1][key] if points else None


def _language(lang: Dict[str, Any], s: Dict[str, Any], figure: str, img_dir: str) -> List[str]:
    budget = []
    if s["lm_seconds"] > 0:
        budget.append(f"{s['lm_seconds']:.0f} s of wall-clock (`--stop-time-hours`; validation passes count)")
    if s["lm_max_update"]:
        budget.append(f"{s['lm_max_update']} updates (`--max-update`)")
    corpus = f"the first {s['lm_paragraphs']} paragraphs of " if s["lm_paragraphs"] else ""
    t = lang["tokens"]
    lines = [
        "## 3. Language: stability and speed",
        "",
        f"Corpus: {corpus}the docstrings of {len(STDLIB_MODULES)} "
        f"Python standard-library modules (English prose; lower-cased, punctuation split off; "
        f"{t['train']:,} / {t['valid']:,} / {t['test']:,} train/valid/test tokens, 5,000-word vocabulary), "
        "built offline by `fairseq_deq.demo.write_corpus`. Each model is trained by `fairseq-train` for "
        f"{' or '.join(budget)}, {lang['batch_size']} x "
        f"{lang['tokens_per_sample']} tokens per update, Adam 3e-3 with inverse-sqrt warm-up over 100 updates, "
        "clip 0.5. The DEQs (`--task deq_language_modeling`, 32 tokens of segment memory) start with "
        f"{s['lm_pretrain_steps']} pretraining updates of a 2-layer unrolled stack and then solve with Anderson "
        "(<= 8 forward) and Broyden (<= 8 backward); the baseline is fairseq's `transformer_lm` with 2 layers "
        "of the same width and heads and as many parameters outside the embeddings, on the stock "
        f"`language_modeling` task (no memory). {_concurrency(s)}",
        "",
        f"![validation perplexity against wall-clock]({img_dir}/{figure})",
        "",
    ]
    rows = []
    for model, label in MODELS.items():
        runs = [r for r in lang["runs"] if r["model"] == model]
        deq = model != "transformer"
        wps = [_tokens_per_s(r) for r in runs]
        rows.append([label, fmt([r["params"] / 1e6 if r["params"] else None for r in runs], 3),
                     fmt([_final(r, "ppl") for r in runs], 1), fmt([r["updates"] for r in runs], 0),
                     fmt(wps, 0),
                     fmt([_final(r, "f_steps") for r in runs], 2) if deq else "-",
                     fmt([_final(r, "f_rel_res") for r in runs], 4) if deq else "-",
                     fmt([r["train"][-1]["f_steps"] if r["train"] else None for r in runs], 2) if deq else "-"])
    lines += ["Mean ± sd over seeds at the end of the budget:", ""]
    lines += _table(["model", "params (M)", "valid ppl", "updates", "train tokens/s", "valid fwd steps",
                     "valid fwd rel. residual", "train fwd steps (last interval)"], rows) + [""]
    ppl = {m: mean_sd(_final(r, "ppl") for r in lang["runs"] if r["model"] == m)[0] for m in MODELS}
    growth = {m: mean_sd(_residual_growth(r, s["lm_pretrain_steps"]) for r in lang["runs"] if r["model"] == m)[0]
              for m in ("deq_nojr", "deq_jr")}
    lines += [
        f"Read from the table: at the end of the budget the validation perplexity is {ppl['deq_nojr']:.1f} without "
        f"JR, {ppl['deq_jr']:.1f} with JR and {ppl['transformer']:.1f} for transformer_lm. The training forward "
        "residual at the end over its lowest value after pretraining (growth of the solver's error over "
        f"training at a fixed limit): {growth['deq_nojr']:.2f}x without JR, {growth['deq_jr']:.2f}x with JR.",
        "",
    ]
    return lines


def _residual_growth(run: Dict[str, Any], pretrain_steps: int) -> Optional[float]:
    values = [t["f_rel_res"] for t in run["train"] if t["updates"] > pretrain_steps and t["f_rel_res"]]
    return values[-1] / min(values) if values else None


def _cost(cost: Dict[str, Any], v: Optional[Dict[str, Any]], lang: Optional[Dict[str, Any]]) -> List[str]:
    rows = []
    for name, ratio in cost["jr_overhead"].items():
        rows.append([f"JR training step / plain step, {name} cell, 12 fwd + 12 bwd iterations, 1 probe",
                     f"{ratio:.2f}x", "<= 1.3x (paper: one extra VJP)"])
    if v:
        pairs = []
        for r in v["runs"]:
            if r["jr"]:
                other = next((o for o in v["runs"] if not o["jr"] and o["seed"] == r["seed"]), None)
                if other:
                    pairs.append(r["epochs"][-1]["seconds"] / other["epochs"][-1]["seconds"])
        rows.append(["vision run time, JR / no JR (side by side, per seed)", fmt(pairs, 2) + "x", "-"])
    for name, m in cost["memory"].items():
        rows.append([f"saved-for-backward bytes, implicit / unrolled stack of 12, {name} cell",
                     f"{m['implicit'] / m['unrolled']:.3f} ({m['implicit'] / 2**20:.1f} / "
                     f"{m['unrolled'] / 2**20:.1f} MiB)", "<= 0.125"])
    for name, share in cost["solver_outside_f"].items():
        now = share["after"] if isinstance(share, dict) else share  # results.json files before 2026-12-01: a float
        floor = f" (bandwidth floor {share['floor']:.1%})" if isinstance(share, dict) and "floor" in share else ""
        rows.append([f"solver time outside f, Anderson m=5, 30 iterations, {name} cell", f"{now:.1%}{floor}", "<= 5%"])
    if cost["torchdeq"] is None:
        rows.append(["TorchDEQ 0.1.0 Anderson time / ours", "not measured (`pip install torchdeq==0.1.0`)", ">= 1.2x"])
    else:
        for name, c in cost["torchdeq"].items():
            rows.append([f"TorchDEQ 0.1.0 Anderson time / ours, same f and absolute tolerance, {name}",
                         f"{c['ratio']:.2f}x (ours {c['steps']} steps; host reads {c['reads_ours']} / "
                         f"{c['reads_theirs']})", ">= 1.2x"])
    if lang:
        base = [_tokens_per_s(r) for r in lang["runs"] if r["model"] == "transformer"]
        for model in ("deq_nojr", "deq_jr"):
            wps = [_tokens_per_s(r) for r in lang["runs"] if r["model"] == model]
            rows.append([f"language training tokens/s, {MODELS[model]} / transformer_lm",
                         _ratio(mean_sd(wps)[0], mean_sd(base)[0]), _PAPER_SPEED[model]])
    return ["## 4. Cost", "",
            "Cell figures: the core benchmark's cases (`bench/core.py`: a transformer cell on 8x128x256 and a "
            "convolution cell on 8x64x32x32 states), each pair of settings timed alternately in one run. Run "
            "figures: from sections 1 and 3.", ""] + _table(["measurement", "result", "target / paper"], rows) + [""]


def write_report(path: Path, img_dir: str, results: Dict[str, Any], figures: Dict[str, Any]) -> None:
    """Write ``path`` from ``results`` (the experiments present, their ``settings`` and the run's
    ``meta``) and the figure file names (relative to ``img_dir``, itself relative to the report)."""
    s, meta = results["settings"], results["meta"]
    lines = [
        "# Results: Jacobian regularization at small scale",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} in {meta['minutes']:.0f} minutes "
        f"(`{s['name']}` settings). Hardware: {meta['hardware']}. Versions: {meta['versions']}. "
        f"Commit: {meta['commit']}.",
        "",
        "Everything below comes from this one run: the tables and figures are written by "
        "`bench/evidence/` from the logs of the runs it starts, nothing is typed in by hand. The "
        "models are small and the budgets are minutes, so these figures test the direction of the "
        "paper's claims (JR keeps the solver's work low at a small cost in accuracy and speed), not its "
        "ImageNet / WikiText-103 numbers.",
        "",
    ]
    if "vision" in results:
        lines += _vision(results["vision"], s, figures["vision"], img_dir)
        lines += _hard_stop(results["vision"], figures["vision"], img_dir)
    if "language" in results:
        lines += _language(results["language"], s, figures["language"], img_dir)
    if "cost" in results:
        lines += _cost(results["cost"], results.get("vision"), results.get("language"))
    lines += [
        "## Settings",
        "",
        "```",
        *(f"{k} = {v}" for k, v in s.items()),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))
