"""The language experiment: ``deq_transformer_lm_tiny`` with and without JR and a fairseq
``transformer_lm`` of the same width and non-embedding size, each trained by ``fairseq-train`` for
the same number of updates (the baseline also for the JR model's wall-clock) on the standard
library's prose (:mod:`.corpus`), after the JR weight and frequency are chosen on the validation
split."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.fairseq_lm import baseline_flags
from fairseq_deq.demo import USER_DIR, fairseq_tool, log_records, write_corpus

from ._jobs import run_jobs
from ._summary import mean_sd
from .corpus import SOURCE, stdlib_prose
from .settings import Settings

__all__ = ["MODELS", "VARIANTS", "jr_flags", "final", "choose_jr", "run_language"]

# run name -> description (as the report shows it)
MODELS = {
    "deq_nojr": "deq_transformer_lm_tiny, no JR",
    "deq_jr": "deq_transformer_lm_tiny + JR (tuned)",
    "transformer": "transformer_lm, matched size, equal updates",
    "transformer_time": "transformer_lm, matched size, the JR model's wall-clock",
}
# more DEQ variants (run name -> flags), trained by bench.methods --lm beside "deq_jr"
VARIANTS = {
    # the reversible mode as the paper trains it: no regularization, a few coupled steps
    "deq_reversible": ("--backward", "reversible", "--reversible-steps", "4", "--reversible-beta", "0.5",
                       "--jac-weight", "0"),
}
TOKENS_PER_SAMPLE, BATCH_SIZE = 32, 16
_HYDRA = threading.Lock()
# a tuned JR setting may cost at most this much validation perplexity against no JR
PPL_MARGIN = 0.02


def jr_flags(weight: float, freq: float) -> Tuple[str, ...]:
    """The DEQ's JR flags for ``weight`` at ``freq`` (the architecture's weight schedule off)."""
    return ("--jac-weight", f"{weight:g}", "--jac-freq", f"{freq:g}", "--jac-weight-increment", "0")


def _prepare(work: Path, s: Settings) -> Dict[str, int]:
    shutil.rmtree(work / "data-bin", ignore_errors=True)  # fairseq-preprocess refuses to overwrite
    tokens = write_corpus(work / "raw", limit=s.lm_paragraphs, paragraphs=stdlib_prose())
    _call(fairseq_tool("fairseq-preprocess") + [
        "--only-source", "--trainpref", str(work / "raw/train.txt"), "--validpref", str(work / "raw/valid.txt"),
        "--testpref", str(work / "raw/test.txt"), "--destdir", str(work / "data-bin"), "--nwordssrc", "5000",
        "--workers", "1"], work / "preprocess.log")
    return tokens


def _call(args: List[str], log: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}); last lines of {log}:\n{tail}")
    return proc.stdout


def _train_args(s: Settings, data: Path, run_dir: Path, model: str, seed: int, extra: Sequence[str],
                seconds: float) -> List[str]:
    # --save-dir: fairseq-train probes its save folder (writing and removing a file in it) even with
    # --no-save; the default, ./checkpoints, is shared by concurrent runs, which then race on it
    args = [str(data), "--save-dir", str(run_dir), "--tokens-per-sample", str(TOKENS_PER_SAMPLE),
            "--batch-size", str(BATCH_SIZE),
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.003", "--lr-scheduler",
            "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "0.5", "--seed", str(seed),
            "--log-format", "json", "--log-interval", str(s.lm_validate_every),
            "--validate-interval-updates", str(s.lm_validate_every), "--validate-interval", "100000",
            "--no-save", "--num-workers", "0"]
    if s.device == "cpu":
        args.append("--cpu")
    if seconds > 0:  # fairseq's clock: from the trainer's start, validation included
        args += ["--stop-time-hours", f"{seconds / 3600:.6f}"]
    else:
        args += ["--max-update", str(s.lm_max_update)]
    if model.startswith("transformer"):
        # fairseq's config conversion initializes hydra's global state: one thread at a time
        with _HYDRA, warnings.catch_warnings():  # and its deprecation notices
            warnings.simplefilter("ignore")
            return args + ["--task", "language_modeling", *baseline_flags("tiny")]
    args += ["--user-dir", USER_DIR, "--task", "deq_language_modeling", "--arch", "deq_transformer_lm_tiny",
             "--criterion", "cross_entropy_jr", "--pretrain-steps", str(s.lm_pretrain_steps),
             "--eval-max-iter", str(s.lm_eval_max_iter)]
    return args + list(extra)


def _number(record: Dict[str, Any], key: str) -> Optional[float]:
    value = record.get(key)
    return None if value is None else float(value)


def parse_log(output: str) -> Dict[str, Any]:
    """Training records (every logging interval), validation records placed on the training
    clock (fairseq's ``wall``: seconds since the trainer started, validation included) and the
    parameter count, from a ``fairseq-train --log-format json`` log."""
    wall: Dict[int, float] = {}
    train = []
    for tag, prefix in (("train_inner", ""), ("train", "train_")):  # epoch records prefix their keys
        for r in log_records(output, tag):
            wall[int(r[prefix + "num_updates"])] = float(r[prefix + "wall"])
            if tag == "train_inner":
                train.append(dict(updates=int(r["num_updates"]), seconds=float(r["wall"]), ppl=float(r["ppl"]),
                                  wps=float(r["wps"]), **{k: _number(r, k) for k in (
                                      "f_steps", "f_rel_res", "b_steps", "b_rel_res", "jr")}))
    valid = []
    for r in log_records(output, "valid"):
        updates = int(r["valid_num_updates"])
        valid.append(dict(updates=updates, seconds=wall.get(updates), ppl=float(r["valid_ppl"]),
                          f_steps=_number(r, "valid_f_steps"), f_rel_res=_number(r, "valid_f_rel_res")))
    params = re.search(r"num\. (?:shared )?model params: ([\d,]+)", output)
    return dict(train=train, valid=valid, params=int(params.group(1).replace(",", "")) if params else None,
                updates=max(wall) if wall else 0, seconds=wall[max(wall)] if wall else 0.0)


def train_one(s: Settings, work: Path, model: str, seed: int, extra: Sequence[str] = (), seconds: float = 0.0,
              name: str = "") -> Dict[str, Any]:
    """One ``fairseq-train`` run of ``model`` (a key of :data:`MODELS` or :data:`VARIANTS`) with
    ``extra`` flags, for ``seconds`` of wall-clock if above 0 (else ``s.lm_max_update`` updates)."""
    name = f"{name or model}_seed{seed}"
    flags = [*extra, *VARIANTS.get(model, ())]
    if model == "deq_nojr":
        flags = ["--jac-weight", "0", *flags]
    args = _train_args(s, work / "data-bin", work / name, model, seed, flags, seconds)
    output = _call(fairseq_tool("fairseq-train") + args, work / name / "train.log")
    result = dict(name=name, model=model, seed=seed, flags=flags, **parse_log(output))
    (work / name / "result.json").write_text(json.dumps(result, indent=1))
    return result


def final(run: Dict[str, Any], key: str) -> float:
    """A run's last validation value of ``key`` (NaN when no validation reported it)."""
    points = [v[key] for v in run["valid"] if v.get(key) is not None]
    return points[-1] if points else math.nan


def choose_jr(reference: Dict[str, Any], trials: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The trial (runs with ``weight`` and ``freq`` keys) with the fewest final validation forward
    steps among those whose final validation perplexity is within :data:`PPL_MARGIN` of
    ``reference`` (the run without JR); the lowest perplexity when none is."""
    limit = final(reference, "ppl") * (1 + PPL_MARGIN)
    close = [t for t in trials if final(t, "ppl") <= limit]
    if close:
        return min(close, key=lambda t: (final(t, "f_steps"), final(t, "ppl")))
    return min(trials, key=lambda t: final(t, "ppl"))


def run_language(s: Settings, work: Path, models: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The experiment, ``s.jobs`` single-threaded runs at a time on CPU. With ``models`` (keys of
    :data:`MODELS` and :data:`VARIANTS`), only those at equal updates with the JR settings of
    ``s`` (``bench.methods --lm``); else: JR tuned on the validation split, then every model of
    :data:`MODELS` for every seed."""
    work.mkdir(parents=True, exist_ok=True)
    tokens = _prepare(work, s)
    workers = s.jobs if s.device == "cpu" else 1
    base = dict(source=SOURCE, tokens=tokens, tokens_per_sample=TOKENS_PER_SAMPLE, batch_size=BATCH_SIZE)
    if models is not None:
        jobs = [(s, work, model, seed) for seed in range(s.seeds) for model in models]
        return dict(base, runs=run_jobs(train_one, jobs, workers, "language runs", processes=False))
    seed = s.lm_tune_seed
    jobs = [(s, work, "deq_nojr", seed, (), 0.0, "tune_nojr")]
    jobs += [(s, work, "deq_jr", seed, jr_flags(w, f), 0.0, f"tune_jr_w{w:g}_f{f:g}") for w, f in s.lm_jr_grid]
    tuning = run_jobs(train_one, jobs, workers, "JR tuning runs", processes=False)
    for run, (w, f) in zip(tuning[1:], s.lm_jr_grid):
        run.update(weight=w, freq=f)
    chosen = choose_jr(tuning[0], tuning[1:])
    jr = jr_flags(chosen["weight"], chosen["freq"])
    jobs = [(s, work, model, seed, jr if model == "deq_jr" else ()) for seed in range(s.seeds)
            for model in ("deq_nojr", "deq_jr", "transformer")]
    runs = run_jobs(train_one, jobs, workers, "language runs", processes=False)
    seconds = mean_sd(r["seconds"] for r in runs if r["model"] == "deq_jr")[0]
    jobs = [(s, work, "transformer_time", seed, (), seconds) for seed in range(s.seeds)]
    runs += run_jobs(train_one, jobs, workers, "language runs at equal wall-clock", processes=False)
    return dict(base, tuning=tuning, jr=dict(weight=chosen["weight"], freq=chosen["freq"]), margin=PPL_MARGIN,
                wall_clock=seconds, runs=runs)
