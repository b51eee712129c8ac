"""The fairseq plugin end to end on a CPU in a few minutes: ``python -m fairseq_deq.demo``.

Builds a small English corpus from the docstrings of Python's standard library (nothing is
downloaded), then runs ``fairseq-preprocess``, ``fairseq-train`` (``deq_transformer_lm_tiny`` with
segment memory, pretraining and Jacobian regularization), ``fairseq-eval-lm`` (at the trained
forward limit and at a reduced one) and ``fairseq-validate`` (for the solver steps on the test set),
and prints perplexities and solver steps.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

USER_DIR = str(Path(__file__).resolve().parent)

# Standard-library modules whose docstrings make the corpus (fixed, so the corpus is reproducible
# for a given Python version); modules that fail to import are skipped.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email", "enum", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "pydoc", "queue", "random",
    "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def stdlib_paragraphs() -> List[str]:
    """Tokenized docstring paragraphs (lower case, punctuation split off) of STDLIB_MODULES."""
    with warnings.catch_warnings():  # reading some modules' attributes warns (typing.io, typing.re)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _stdlib_paragraphs()


def _stdlib_paragraphs() -> List[str]:
    docs = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module]
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                objects.append(value)
            elif inspect.isclass(value):
                objects.append(value)
                objects += [v for k, v in sorted(vars(value).items())
                            if not k.startswith("_") and inspect.isfunction(v)]
        docs += [doc for doc in map(inspect.getdoc, objects) if doc]
    return prose_paragraphs(docs)


def prose_paragraphs(texts: Sequence[str]) -> List[str]:
    """The paragraphs (blank-line separated) of ``texts`` with at least 5 words and no
    interactive example (``>>>``), tokenized: lower case, punctuation split off."""
    paragraphs = (p for text in texts for p in re.split(r"\n\s*\n", text) if ">>>" not in p)
    return [" ".join(_TOKEN.findall(p.lower())) for p in paragraphs if len(p.split()) >= 5]


def write_corpus(directory: Path, limit: int = 0, paragraphs: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """train/valid/test text files (every 20th paragraph to valid, the next to test) from the first
    ``limit`` (0: all) of ``paragraphs`` (default: :func:`stdlib_paragraphs`); token counts."""
    splits: Dict[str, List[str]] = {"train": [], "valid": [], "test": []}
    paragraphs = stdlib_paragraphs() if paragraphs is None else paragraphs
    for i, paragraph in enumerate(paragraphs[:limit] if limit else paragraphs):
        splits["valid" if i % 20 == 0 else "test" if i % 20 == 1 else "train"].append(paragraph)
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in splits.items():
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return {split: sum(len(line.split()) + 1 for line in lines) for split, lines in splits.items()}


def fairseq_tool(name: str) -> List[str]:
    """The console script (e.g. ``fairseq-train``) of this interpreter's environment."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fairseq_cli." + name.split("-", 1)[1].replace("-", "_")]


def _run(args: Sequence[str], log: Path) -> str:
    print("$ " + shlex.join([Path(args[0]).name, *args[1:]]), flush=True)
    proc = subprocess.run(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); last lines of {log}:\n" + "\n".join(proc.stdout.splitlines()[-30:]))
    return proc.stdout


def log_records(output: str, tag: str) -> List[dict]:
    """The JSON records of fairseq's ``--log-format json`` lines tagged ``| tag |``."""
    return [json.loads(line.split(f"| {tag} | ", 1)[1]) for line in output.splitlines()
            if f"| {tag} | " in line and line.rstrip().endswith("}")]


def _perplexity(output: str) -> float:
    match = re.search(r"Perplexity: ([\d.]+)", output)
    return float(match.group(1)) if match else float("nan")


def main(argv: Sequence[str] = ()) -> None:
    """Run the demo from the command line (``argv``: the arguments without the program name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to put data and checkpoints "
                        "(default: a new temporary directory)")
    parser.add_argument("--max-update", type=int, default=1200, help="training updates (about 1-3 CPU minutes)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (the tiny model "
                        "gains little from more, and loses a lot on a busy machine)")
    args = parser.parse_args(list(argv))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="deq_demo_"))
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    tokens = write_corpus(work / "raw")
    print(f"corpus: {tokens['train']:,} / {tokens['valid']:,} / {tokens['test']:,} train/valid/test tokens "
          f"from Python {sys.version.split()[0]} standard-library docstrings, in {work}")
    data, ckpt = work / "data-bin", work / "checkpoints"
    shutil.rmtree(data, ignore_errors=True)
    _run(fairseq_tool("fairseq-preprocess") + [
        "--only-source", "--trainpref", str(work / "raw/train.txt"), "--validpref", str(work / "raw/valid.txt"),
        "--testpref", str(work / "raw/test.txt"), "--destdir", str(data), "--nwordssrc", "5000",
        "--workers", "1"], work / "preprocess.log")
    stream = ["--user-dir", USER_DIR, "--task", "deq_language_modeling", "--tokens-per-sample", "32", "--cpu"]
    train = _run(fairseq_tool("fairseq-train") + [
        str(data), *stream, "--arch", "deq_transformer_lm_tiny", "--criterion", "cross_entropy_jr",
        "--batch-size", "16", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.003",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--clip-norm", "0.5",
        "--pretrain-steps", "100", "--max-update", str(args.max_update), "--log-format", "json",
        "--log-interval", "100", "--save-dir", str(ckpt), "--no-epoch-checkpoints", "--num-workers", "0",
        "--seed", "1"], work / "train.log")
    evaluate = fairseq_tool("fairseq-eval-lm") + [str(data), *stream, "--path", str(ckpt / "checkpoint_last.pt"),
                                           "--batch-size", "16", "--gen-subset", "test"]
    ppl = _perplexity(_run(evaluate, work / "eval.log"))
    ppl_4 = _perplexity(_run(evaluate + ["--model-overrides", "{'eval_max_iter': 4}"], work / "eval_4.log"))
    validate = _run(fairseq_tool("fairseq-validate") + [
        str(data), *stream, "--path", str(ckpt / "checkpoint_last.pt"), "--batch-size", "16",
        "--valid-subset", "test"], work / "validate.log")
    steps = re.search(r"\| f_steps ([\d.]+)", validate)

    last_train, last_valid = log_records(train, "train")[-1], log_records(train, "valid")[-1]
    print(f"\nDEQ-Transformer demo: deq_transformer_lm_tiny, {args.max_update} updates "
          f"(100 pretraining updates of a 2-layer unrolled stack, then Anderson <= 8 forward / "
          f"Broyden <= 8 backward iterations, JR weight 1.0 at frequency 0.35)")
    print(f"  last epoch, train: ppl {last_train['train_ppl']}, forward solver steps {last_train['train_f_steps']}, "
          f"backward steps {last_train.get('train_b_steps', '-')}, JR estimate {last_train.get('train_jr', '-')}")
    print(f"  valid: ppl {last_valid['valid_ppl']}, forward solver steps {last_valid['valid_f_steps']}")
    print(f"  test (fairseq-eval-lm, with segment memory): ppl {ppl:.2f} at the trained forward limit (8), "
          f"{ppl_4:.2f} with --model-overrides \"{{'eval_max_iter': 4}}\"; forward solver steps "
          f"{steps.group(1) if steps else '-'} (fairseq-validate)")
    print(f"  checkpoints: {ckpt}; logs: {work}/*.log")


if __name__ == "__main__":
    main(sys.argv[1:])
