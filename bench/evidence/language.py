"""Experiment 3: ``deq_transformer_lm_tiny`` with and without JR and a fairseq ``transformer_lm``
of the same width and non-embedding size, each trained by ``fairseq-train`` for the same
wall-clock budget on an English corpus built offline (docstrings of Python's standard library)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from bench.fairseq_lm import baseline_flags
from fairseq_deq.demo import USER_DIR, fairseq_tool, log_records, write_corpus

from ._jobs import run_jobs
from .settings import Settings

__all__ = ["MODELS", "VARIANTS", "run_language"]

# run name -> description (as the report shows it)
MODELS = {
    "deq_nojr": "deq_transformer_lm_tiny, no JR",
    "deq_jr": "deq_transformer_lm_tiny + JR (weight 1.0, frequency 0.35)",
    "transformer": "transformer_lm, 2 layers, matched size",
}
# more DEQ variants (run name -> flags), trained by bench.methods --lm beside "deq_jr"
VARIANTS = {
    # the reversible mode as the paper trains it: no regularization, a few coupled steps
    "deq_reversible": ("--backward", "reversible", "--reversible-steps", "4", "--reversible-beta", "0.5",
                       "--jac-weight", "0"),
}
TOKENS_PER_SAMPLE, BATCH_SIZE = 32, 16


def _prepare(work: Path, s: Settings) -> Dict[str, int]:
    shutil.rmtree(work / "data-bin", ignore_errors=True)  # fairseq-preprocess refuses to overwrite
    tokens = write_corpus(work / "raw", limit=s.lm_paragraphs)
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


def _train_args(s: Settings, data: Path, model: str, seed: int) -> List[str]:
    args = [str(data), "--tokens-per-sample", str(TOKENS_PER_SAMPLE), "--batch-size", str(BATCH_SIZE),
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.003", "--lr-scheduler",
            "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "0.5", "--seed", str(seed),
            "--log-format", "json", "--log-interval", str(s.lm_validate_every),
            "--validate-interval-updates", str(s.lm_validate_every), "--validate-interval", "100000",
            "--no-save", "--num-workers", "0"]
    if s.device == "cpu":
        args.append("--cpu")
    if s.lm_seconds > 0:
        args += ["--stop-time-hours", f"{s.lm_seconds / 3600:.6f}"]
    if s.lm_max_update > 0:
        args += ["--max-update", str(s.lm_max_update)]
    if model == "transformer":
        with warnings.catch_warnings():  # hydra's deprecation notices from fairseq's config conversion
            warnings.simplefilter("ignore")
            return args + ["--task", "language_modeling", *baseline_flags("tiny")]
    args += ["--user-dir", USER_DIR, "--task", "deq_language_modeling", "--arch", "deq_transformer_lm_tiny",
             "--criterion", "cross_entropy_jr", "--pretrain-steps", str(s.lm_pretrain_steps)]
    return args + (["--jac-weight", "0"] if model == "deq_nojr" else list(VARIANTS.get(model, ())))


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
                updates=max(wall) if wall else 0)


def train_one(s: Settings, work: Path, model: str, seed: int) -> Dict[str, Any]:
    name = f"{model}_seed{seed}"
    output = _call(fairseq_tool("fairseq-train") + _train_args(s, work / "data-bin", model, seed),
                   work / name / "train.log")
    result = dict(name=name, model=model, seed=seed, **parse_log(output))
    (work / name / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_language(s: Settings, work: Path, models: Sequence[str] = tuple(MODELS)) -> Dict[str, Any]:
    """Every model (of :data:`MODELS` and :data:`VARIANTS`) for every seed, ``s.jobs`` at a time
    (single-threaded processes on CPU)."""
    work.mkdir(parents=True, exist_ok=True)
    tokens = _prepare(work, s)
    jobs = [(s, work, model, seed) for seed in range(s.seeds) for model in models]
    runs = run_jobs(train_one, jobs, s.jobs if s.device == "cpu" else 1, "language runs", processes=False)
    return dict(tokens=tokens, tokens_per_sample=TOKENS_PER_SAMPLE, batch_size=BATCH_SIZE, runs=runs)
