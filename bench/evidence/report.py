"""``RESULTS.md``: what was run, on what, which of the paper's claims hold at this scale, and each
experiment's tables with their figures."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ._summary import fmt, mean_sd
from .arms import ARMS, VISION_ARMS, runs_by_arm
from .corpus import SOURCE
from .datasets import DESCRIPTIONS
from .language import MODELS, final

__all__ = ["write_report"]

# Training speed relative to Transformer-XL on WikiText-103 (paper, RTX 2080 Ti): 3.1x the time
# without JR, 1.4-1.6x with it.
_PAPER_SPEED = {"deq_nojr": "paper, vs Transformer-XL: 0.32x", "deq_jr": "paper, vs Transformer-XL: 0.63-0.71x"}
_MIB = 2.0 ** 20
# a residual more than this factor above its lowest epoch's has grown; within it, it is flat
_GROWTH = 1.25


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _concurrency(s: Dict[str, Any]) -> str:
    if s["device"] == "cpu" and s["jobs"] > 1:
        return (f"Runs are single-threaded processes, {s['jobs']} at a time, the arms of a seed next to each "
                "other.")
    return "Runs go one after another."


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _mean(values) -> float:
    return mean_sd(values)[0]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "-"


def _mib(runs: Sequence[Dict[str, Any]]) -> str:
    """The runs' mean bytes saved for backward in MiB."""
    saved = _mean(r.get("saved_bytes") for r in runs)
    return "-" if math.isnan(saved) else f"{saved / _MIB:.1f}"


def _runs(part: Dict[str, Any], arm: str) -> List[Dict[str, Any]]:
    """The runs of ``arm`` in an experiment's results ``part``."""
    return runs_by_arm(part).get(arm, [])


def _last(runs: Sequence[Dict[str, Any]], key: str) -> List[Optional[float]]:
    return [r["epochs"][-1].get(key) for r in runs]


def _first(runs: Sequence[Dict[str, Any]], key: str) -> List[Optional[float]]:
    return [r["epochs"][1].get(key) for r in runs]  # epoch 0 is the initialization


def _lowest(runs: Sequence[Dict[str, Any]], key: str) -> List[Optional[float]]:
    """Each run's lowest value of ``key`` over its trained epochs."""
    return [min(e[key] for e in r["epochs"][1:]) for r in runs]


def _per_epoch_seconds(run: Dict[str, Any]) -> float:
    last = run["epochs"][-1]
    return last["seconds"] / last["epoch"]


def _arms_present(part: Dict[str, Any], arms: Sequence[str]) -> List[str]:
    return [a for a in arms if _runs(part, a)]


def _claims(results: Dict[str, Any]) -> List[str]:
    """The headline ratios against the paper's claims, each with its verdict at this scale."""
    rows = []
    vision = results.get("vision", {})
    no, jr = _runs(vision, "implicit"), _runs(vision, "implicit + JR")
    if no and jr:
        f_no, f_jr = _mean(_last(no, "f_steps")), _mean(_last(jr, "f_steps"))
        gap = _mean(_last(jr, "top1")) - _mean(_last(no, "top1"))
        ratio = f_no / f_jr
        verdict = "holds" if ratio >= 2 and abs(gap) <= 1 else (
            "partly: fewer steps, short of 2x" if ratio > 1 and abs(gap) <= 1 else "does not hold")
        rows.append(["vision: forward steps to tolerance, no JR / JR (held-out batch, after training)",
                     f"{ratio:.2f}x at {gap:+.2f} points top-1", ">= 2x at <= 1 point", verdict])
        for arm, runs in (("no JR", no), ("JR", jr)):
            first, last = _mean(_first(runs, "train_f_rel_res")), _mean(_last(runs, "train_f_rel_res"))
            low = _mean(_lowest(runs, "train_f_rel_res"))
            steps, steps_low = _mean(_last(runs, "f_steps")), _mean(_lowest(runs, "f_steps"))
            grows = last > _GROWTH * low
            verdict = ("holds" if grows else "does not hold") if arm == "no JR" else (
                "holds" if not grows else "does not hold")
            rows.append([f"vision: training forward residual at the limit, {arm}: last epoch / its lowest epoch "
                         "(first epoch -> last); probe steps to tolerance, last / lowest",
                         f"{last / low:.2f}x ({first:.3g} -> {last:.3g}); steps {steps / steps_low:.2f}x",
                         "grows without JR" if arm == "no JR" else "stays flat with JR", verdict])
    lang = results.get("language")
    if lang and lang.get("tuning") is not None:
        by = {m: [r for r in lang["runs"] if r["model"] == m] for m in MODELS}
        ppl = {m: _mean(final(r, "ppl") for r in by[m]) for m in MODELS}
        steps = {m: _mean(final(r, "f_steps") for r in by[m]) for m in ("deq_nojr", "deq_jr")}
        rel = ppl["deq_jr"] / ppl["deq_nojr"] - 1
        rows.append(["language: validation perplexity, JR vs no JR, equal updates", f"{rel:+.1%}",
                     "within 2%", "holds" if abs(rel) <= 0.02 else "does not hold"])
        ratio = steps["deq_nojr"] / steps["deq_jr"]
        rows.append(["language: validation forward steps to tolerance, no JR / JR", f"{ratio:.2f}x", ">= 1.5x",
                     "holds" if ratio >= 1.5 else ("partly" if ratio > 1 else "does not hold")])
        growth = {m: _mean(_residual_growth(r, results["settings"]["lm_pretrain_steps"]) for r in by[m])
                  for m in ("deq_nojr", "deq_jr")}
        no_grows, jr_grows = growth["deq_nojr"] > _GROWTH, growth["deq_jr"] > _GROWTH
        verdict = "holds" if no_grows and not jr_grows else (
            "partly: both grow, less with JR" if no_grows and growth["deq_jr"] < growth["deq_nojr"] else "does not hold")
        rows.append(["language: training forward residual at the limit, last / lowest interval after pretraining",
                     f"no JR {growth['deq_nojr']:.2f}x, JR {growth['deq_jr']:.2f}x",
                     "grows without JR, flat with JR", verdict])
        rows.append(["language: validation perplexity, JR DEQ / transformer_lm at the DEQ's wall-clock",
                     f"{ppl['deq_jr']:.1f} / {ppl['transformer_time']:.1f}",
                     "about as fast as the explicit network",
                     "holds" if ppl["deq_jr"] <= 1.02 * ppl["transformer_time"] else "does not hold"])
    if not rows:
        return []
    return ["## Which claims hold at this scale", "",
            "Computed from the sections below (means over seeds). \"Holds\" means the figure meets the "
            f"target at this scale; a residual more than {_GROWTH:g}x its lowest epoch's has grown, within that it "
            "is flat. The paper's own scale (ImageNet, WikiText-103, GPUs) is not tested here.",
            ""] + _table(["claim (paper)", "measured", "target", "verdict"], rows) + [""]


def _vision(results: Dict[str, Any], s: Dict[str, Any], figures: Dict[str, str], img_dir: str) -> List[str]:
    v = results["vision"]
    arms = _arms_present(v, v["arms"])
    c = _runs(v, arms[0])[0]["config"]
    p = s["probe_max_iter"]
    package = f" ({v['package']})" if v.get("package") else ""
    flags = "; ".join(f"{a}: `{' '.join(ARMS[a].train_flags + ARMS[a].model_flags)}`" for a in arms
                      if ARMS[a].train_flags or ARMS[a].model_flags)
    lines = [
        "## 1. Vision: solver steps and residuals over training",
        "",
        f"`{v['model']}` from `timm_deq` trained through `timm_deq.train` on {DESCRIPTIONS[v['dataset']]}"
        f"{package}, at {s['img_size']}x{s['img_size']} ({v['images']['train']} training and "
        f"{v['images']['validation']} validation images, every 5th image of a class held out), "
        f"{_n(s['epochs'], 'epoch')}, batch {s['batch_size']}, AdamW 2e-3 with cosine decay, "
        f"training forward/backward limits {c['f_max_iter']}/{c['b_max_iter']} ({c['f_solver']}/{c['b_solver']}, "
        f"{c['f_stop_mode']}. tolerance {c['f_tol']:g} forward, {c['b_stop_mode']}. {c['b_tol']:g} backward). "
        f"JR: weight {s['jac_weight']:g} at frequency {s['jac_freq']:g}. Arms: {', '.join(arms)} ({flags}); "
        f"everything else, seeds included, is the same. {_n(s['seeds'], 'seed')} per arm. {_concurrency(s)}",
        "",
        f"After every epoch a fixed batch of {s['probe_images']} validation images is probed in eval mode with "
        f"the standard solves (the implicit backward, whatever the arm trains with) and their limits raised to "
        f"{p}: the forward and backward solver steps needed to reach the tolerances (a sample that never reaches "
        f"it counts {p}), ‖J_f(z*)‖_F²/d (Hutchinson, the quantity JR penalizes) and the spectral radius of "
        "`J_f(z*)` (20 power iterations). Epoch 0 is the initialization. The training columns are the means "
        "over the epoch's updates of the training solver at its limit.",
        "",
        f"![solver stability over training]({img_dir}/{figures['nfe']})",
        "",
    ]
    header = ["arm", "top-1 (%)", f"fwd steps to tol (<= {p})", "fwd converged", f"bwd steps to tol (<= {p})",
              "‖J_f‖_F²/d", "spectral radius", "train fwd rel. residual", "train fwd evaluations", "s/epoch",
              "saved for backward (MiB)"]
    rows = []
    for arm in arms:
        runs = _runs(v, arm)
        rows.append([arm, fmt(_last(runs, "top1")), fmt(_last(runs, "f_steps"), 1),
                     fmt(_last(runs, "f_converged"), 2), fmt(_last(runs, "b_steps"), 1),
                     fmt(_last(runs, "jac_fro"), 3), fmt(_last(runs, "spectral_radius"), 3),
                     fmt(_last(runs, "train_f_rel_res"), 4), fmt(_last(runs, "train_f_steps"), 1),
                     fmt([_per_epoch_seconds(r) for r in runs], 1), _mib(runs)])
    lines += ["At the last epoch (mean ± sd over seeds; saved for backward: what autograd keeps for one training "
              "step of the whole model at the training batch size, the JR term included where the arm uses it, "
              "parameters left out):", ""] + _table(header, rows) + [""]

    epochs = range(1, len(_runs(v, arms[0])[0]["epochs"]))
    header = ["epoch"] + [f"{a}: {k}" for a in arms for k in ("train rel. residual", "probe fwd steps")]
    rows = []
    for e in epochs:
        row = [str(e)]
        for arm in arms:
            runs = _runs(v, arm)
            row += [fmt([r["epochs"][e].get("train_f_rel_res") for r in runs], 4),
                    fmt([r["epochs"][e].get("f_steps") for r in runs], 1)]
        rows.append(row)
    lines += ["Per epoch (mean ± sd over seeds): the training solver's forward residual at its limit and the "
              "probe's forward steps to tolerance.", ""] + _table(header, rows) + [""]

    header = ["arm", "seed", "top-1 (%)", "fwd steps to tol", "bwd steps to tol",
              "train rel. residual, first -> last epoch", "s/epoch"]
    rows = []
    for arm in arms:
        for r in _runs(v, arm):
            last = r["epochs"][-1]
            rows.append([arm, str(r["seed"]), f"{last['top1']:.2f}", f"{last['f_steps']:.2f}", f"{last['b_steps']:.2f}",
                         f"{r['epochs'][1]['train_f_rel_res']:.4f} -> {last['train_f_rel_res']:.4f}",
                         f"{_per_epoch_seconds(r):.1f}"])
    lines += ["Each seed at the last epoch:", ""] + _table(header, rows) + [""]
    return lines


def _hard_stop(results: Dict[str, Any], figures: Dict[str, str], img_dir: str) -> List[str]:
    v = results["vision"]
    arms = _arms_present(v, v["arms"])
    runs = {a: _runs(v, a) for a in arms}
    limits = [h["f_limit"] for h in runs[arms[0]][0]["hard_stop"]]
    rows = []
    for i, limit in enumerate(limits):
        row = [str(int(limit))]
        for arm in arms:
            row += [fmt([r["hard_stop"][i]["top1"] for r in runs[arm]]),
                    fmt([r["hard_stop"][i]["f_rel_res"] for r in runs[arm]], 3)]
        rows.append(row)
    header = ["forward limit"] + [f"{a}: {k}" for a in arms for k in ("top-1 (%)", "rel. residual")]
    return [
        "## 2. Vision: hard stopping",
        "",
        "The last checkpoint of each run of section 1 evaluated by `timm_deq.validate --eval-max-iter` with the "
        "forward solver stopped after at most the given number of iterations (it stops earlier at the tolerance), "
        "the shape of the paper's Table 3. Mean ± sd over seeds, full validation split. A limit of k "
        "iterations is k evaluations of f, and the layer returns f at the lowest-residual iterate z* among "
        "those it evaluated, f(z*), as it does in training: at limit 1 that is f(z0), one application of "
        "the weight-tied layer to the initial state z0 = 0. The reversible arm's checkpoint is evaluated the same "
        "way (the model's solver on its learned f), not with its training iteration.",
        "",
    ] + _table(header, rows) + ["", f"![accuracy against the forward limit]({img_dir}/{figures['hard_stop']})", ""]


def _methods(m: Dict[str, Any], s: Dict[str, Any], figure: str, img_dir: str) -> List[str]:
    arms = _arms_present(m, m["arms"])
    base = _mean(r.get("saved_bytes") for r in _runs(m, "implicit"))
    seconds = _mean(_per_epoch_seconds(r) for r in _runs(m, "implicit"))
    rows = []
    for arm in arms:
        runs = _runs(m, arm)
        rows.append([arm, fmt(_last(runs, "top1")), fmt(_last(runs, "f_steps"), 1), fmt(_last(runs, "b_steps"), 1),
                     f"{fmt(_last(runs, 'train_f_steps'), 1)} / {fmt(_last(runs, 'train_b_steps'), 1)}",
                     fmt(_last(runs, "train_f_rel_res"), 4), fmt([_per_epoch_seconds(r) for r in runs], 1),
                     _ratio(_mean(_per_epoch_seconds(r) for r in runs), seconds), _mib(runs),
                     _ratio(_mean(r.get("saved_bytes") for r in runs), base)])
    flags = "; ".join(f"{a}: `{' '.join(ARMS[a].train_flags + ARMS[a].model_flags)}`" for a in arms
                      if ARMS[a].train_flags or ARMS[a].model_flags)
    return [
        "## 3. Every training method on the vision task",
        "",
        f"The project's other training methods beside the implicit reference, each trained with the settings of "
        f"section 1 (no JR) but for {_n(m['epochs'], 'epoch')}, the budget at which the slowest method fits the "
        f"run; the implicit reference trains again at that budget. {_n(s['seeds'], 'seed')} per arm: {flags}. "
        "JR and the reversible mode, with the same measurements at the longer budget, are in section 1. Steps "
        "to tolerance come from the probe of section 1, run once after the last epoch (the standard solves on "
        "the learned f); the training columns are the evaluations the arm's own forward and backward spent per "
        "update in the last epoch and its forward residual at the limit; saved for backward is what autograd "
        "keeps for one training step of the whole model at the training batch size, parameters left out.",
        "",
    ] + _table(["arm", "top-1 (%)", "fwd steps to tol", "bwd steps to tol", "train fwd / bwd evaluations",
                "train fwd rel. residual", "s/epoch", "vs implicit", "saved for backward (MiB)", "vs implicit"],
               rows) + ["", f"![every method over training]({img_dir}/{figure})", ""]


def _tokens_per_s(run: Dict[str, Any]) -> float:
    """A language run's mean training tokens/s over its logging intervals (fairseq's ``wps``)."""
    return _mean(t["wps"] for t in run["train"])


def _residual_growth(run: Dict[str, Any], pretrain_steps: int) -> Optional[float]:
    """The training forward residual of the last logging interval over the lowest one after pretraining."""
    values = [t["f_rel_res"] for t in run["train"] if t["updates"] > pretrain_steps and t["f_rel_res"]]
    return values[-1] / min(values) if values else None


def _language(lang: Dict[str, Any], s: Dict[str, Any], figure: str, img_dir: str) -> List[str]:
    corpus = f"the first {s['lm_paragraphs']} paragraphs of " if s["lm_paragraphs"] else ""
    t = lang["tokens"]
    jr = lang["jr"]
    lines = [
        "## 4. Language: JR against no JR at equal updates, and the explicit baseline",
        "",
        f"Corpus: {corpus}{lang.get('source', SOURCE)} (English prose; lower-cased, punctuation split off; "
        f"{t['train']:,} / {t['valid']:,} / {t['test']:,} train/valid/test tokens, 5,000-word vocabulary), "
        "read from this Python's files by `bench/evidence/corpus.py`. Each run is one `fairseq-train` with "
        f"{lang['batch_size']} x {lang['tokens_per_sample']} tokens per update, Adam 3e-3 with inverse-sqrt "
        "warm-up over 100 updates, clip 0.5, validation every "
        f"{s['lm_validate_every']} updates. The DEQs (`deq_transformer_lm_tiny`, `--task deq_language_modeling`, "
        f"32 tokens of segment memory) start with {s['lm_pretrain_steps']} pretraining updates of a 2-layer "
        "unrolled stack, then solve with Anderson (<= 8 forward in training) and Broyden (<= 8 backward); "
        f"validation solves to the tolerance with up to {s['lm_eval_max_iter']} forward steps "
        "(`--eval-max-iter`). The baseline is fairseq's `transformer_lm` with 2 layers of the same width and "
        "heads and as many parameters outside the embeddings, on the stock `language_modeling` task (no memory), "
        f"trained for the same {s['lm_max_update']} updates and, separately, for the JR model's mean wall-clock "
        f"({lang['wall_clock']:.0f} s, `--stop-time-hours`; fairseq's clock counts validation). {_concurrency(s)}",
        "",
        f"**JR tuned on the validation split** (seed {s['lm_tune_seed']}, not one of the compared seeds, "
        f"{s['lm_max_update']} updates each): the setting with the fewest validation forward steps among those "
        f"within {lang['margin']:.0%} of the no-JR run's validation perplexity (the lowest perplexity if none "
        f"is). Chosen: weight {jr['weight']:g} at frequency {jr['freq']:g}.",
        "",
    ]
    rows = []
    for run in lang["tuning"]:
        label = "no JR" if "weight" not in run else f"weight {run['weight']:g}, frequency {run['freq']:g}"
        rows.append([label, f"{final(run, 'ppl'):.2f}", f"{final(run, 'f_steps'):.2f}",
                     f"{final(run, 'f_rel_res'):.2g}"])
    lines += _table(["JR setting", "valid ppl", "valid fwd steps", "valid fwd rel. residual"], rows) + [""]
    lines += [f"![validation perplexity against updates and wall-clock]({img_dir}/{figure})", ""]
    rows = []
    for model, label in MODELS.items():
        runs = [r for r in lang["runs"] if r["model"] == model]
        deq = model.startswith("deq")
        rows.append([label, fmt([r["params"] / 1e6 if r["params"] else None for r in runs], 3),
                     fmt([final(r, "ppl") for r in runs], 1), fmt([r["updates"] for r in runs], 0),
                     fmt([r["seconds"] for r in runs], 0), fmt([_tokens_per_s(r) for r in runs], 0),
                     fmt([final(r, "f_steps") for r in runs], 2) if deq else "-",
                     fmt([final(r, "f_rel_res") for r in runs], 4) if deq else "-",
                     fmt([_residual_growth(r, s["lm_pretrain_steps"]) for r in runs], 2) if deq else "-"])
    lines += ["Mean ± sd over seeds at the end of each run:", ""]
    lines += _table(["model", "params (M)", "valid ppl", "updates", "wall-clock (s)", "train tokens/s",
                     "valid fwd steps", "valid fwd rel. residual",
                     "train fwd residual, last / lowest interval after pretraining"], rows) + [""]
    rows = [[r["model"], str(r["seed"]), f"{final(r, 'ppl'):.2f}",
             "-" if math.isnan(final(r, "f_steps")) else f"{final(r, 'f_steps'):.2f}",
             str(r["updates"]), f"{r['seconds']:.0f}"] for r in lang["runs"]]
    lines += ["Each run:", ""] + _table(["model", "seed", "valid ppl", "valid fwd steps", "updates",
                                         "wall-clock (s)"], rows) + [""]
    return lines


def _cost(results: Dict[str, Any]) -> List[str]:
    cost, lang = results["cost"], results.get("language")
    rows = []
    for name, ratio in cost["jr_overhead"].items():
        rows.append([f"JR training step / plain step, {name} cell, 12 fwd + 12 bwd iterations, 1 probe",
                     f"{ratio:.2f}x", "<= 1.3x (paper: one extra VJP)"])
    vision = results.get("vision", {})
    pairs = [_per_epoch_seconds(j) / _per_epoch_seconds(n) for j in _runs(vision, "implicit + JR")
             for n in _runs(vision, "implicit") if n["seed"] == j["seed"]]
    if pairs:
        rows.append(["vision s/epoch, JR / no JR (side by side, per seed)", fmt(pairs, 2) + "x", "-"])
    for name, m in cost["memory"].items():
        rows.append([f"saved-for-backward bytes, implicit / unrolled stack of 12, {name} cell",
                     f"{m['implicit'] / m['unrolled']:.3f} ({m['implicit'] / _MIB:.1f} / "
                     f"{m['unrolled'] / _MIB:.1f} MiB)", "<= 0.125"])
    for name, share in cost["solver_outside_f"].items():
        floor = f" (bandwidth floor {share['floor']:.1%})" if "floor" in share else ""
        rows.append([f"solver time outside f, Anderson m=5, 30 iterations, {name} cell", f"{share['after']:.1%}{floor}",
                     "<= 5%"])
    if cost["torchdeq"] is None:
        rows.append(["TorchDEQ 0.1.0 Anderson time / ours", "not measured (`pip install torchdeq==0.1.0`)", ">= 1.2x"])
    else:
        for name, c in cost["torchdeq"].items():
            rows.append([f"TorchDEQ 0.1.0 Anderson time / ours, same f and absolute tolerance, {name}",
                         f"{c['ratio']:.2f}x (ours {c['steps']} steps; host reads {c['reads_ours']} / "
                         f"{c['reads_theirs']})", ">= 1.2x"])
    if lang and lang.get("tuning") is not None:
        base = _mean(_tokens_per_s(r) for r in lang["runs"] if r["model"] == "transformer")
        for model in ("deq_nojr", "deq_jr"):
            wps = _mean(_tokens_per_s(r) for r in lang["runs"] if r["model"] == model)
            rows.append([f"language training tokens/s, {MODELS[model]} / transformer_lm", _ratio(wps, base),
                         _PAPER_SPEED[model]])
    return ["## 5. Cost", "",
            "Cell figures: the core benchmark's cases (`bench/core.py`: a transformer cell on 8x128x256 and a "
            "convolution cell on 8x64x32x32 states), each pair of settings timed alternately in one run. Run "
            "figures: from sections 1 and 4.", ""] + _table(["measurement", "result", "target / paper"], rows) + [""]


def _parts(results: Dict[str, Any]) -> List[str]:
    names = [name for name in ("vision", "methods", "language", "cost") if "minutes" in results.get(name, {})]
    if not names:
        return []
    rows = []
    for name in names:
        part = results[name]
        speed = part.get("speed_gflops")  # (parts run before 2026-12-07 have none)
        rows.append([name, f"{part['minutes']:.1f}", "-" if speed is None else f"{speed:.1f}", part.get("date", "-"),
                     part.get("commit", "-"), f"`{part['command']}`" if "command" in part else "-"])
    total = sum(results[name]["minutes"] for name in names)
    rows.append(["all parts", f"{total:.1f}", "", "", "", "the sum: one command runs the parts one after another"])
    intro = ("Each part, alone on the machine (machine speed: GFLOP/s of a 3x3 float32 convolution of the vision "
             "runs' size, 64x32x28x28, on one thread, timed at the part's start; machines that print the same "
             "name differ by up to 2x, so read minutes against it; it varies by about 20% on one machine):")
    return [intro, ""] + _table(["part", "minutes", "machine speed", "date", "commit", "command"], rows) + [""]


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
        "Everything below comes from the runs this command starts (parts rerun with `--only` keep the other "
        "parts' saved results): the tables and figures are written by `bench/evidence/` from their logs, "
        "nothing is typed in by hand. The models are small and the budgets are minutes to hours on a CPU, so "
        "these figures test the direction of the paper's claims, not its ImageNet / WikiText-103 numbers.",
        "",
    ]
    lines += _claims(results) + _parts(results)
    if "vision" in results:
        lines += _vision(results, s, figures["vision"], img_dir)
        lines += _hard_stop(results, figures["vision"], img_dir)
    if "methods" in results:
        lines += _methods(results["methods"], s, figures["methods"], img_dir)
    if "language" in results and results["language"].get("tuning") is not None:
        lines += _language(results["language"], s, figures["language"], img_dir)
    if "cost" in results:
        lines += _cost(results)
    lines += [
        "## Settings",
        "",
        "```",
        *(f"{k} = {v}" for k, v in s.items()),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))
