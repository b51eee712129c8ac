"""Shared helpers of the fairseq plugin tests: a generated corpus, CLI runs, in-process models."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import fairseq_deq

USER_DIR = str(Path(fairseq_deq.__file__).resolve().parent)
VOCAB = 32


def write_topic_corpus(directory: Path, docs: Dict[str, int], vocab: int = VOCAB, topic: int = 3,
                       seed: int = 0) -> None:
    """One document per line; each draws its words from its own random ``topic`` of the vocabulary.

    Knowing the earlier words of a document narrows the next word from ``vocab`` to ``topic``
    choices, so context beyond one segment (the memory) lowers the loss.
    """
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in docs.items():
        lines = []
        for _ in range(count):
            words = rng.sample(range(vocab), topic)
            lines.append(" ".join(f"w{rng.choice(words)}" for _ in range(rng.randint(40, 80))))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")


def cli(tool: str) -> List[str]:
    """The console script ``tool`` of this interpreter's environment (e.g. ``fairseq-train``)."""
    local = Path(sys.executable).parent / tool
    found = str(local) if local.exists() else shutil.which(tool)
    assert found, f"{tool} not found next to {sys.executable} or on PATH"
    return [found]


def run(args: Sequence[str], cwd: Path, check: bool = True, warnings: bool = False) -> subprocess.CompletedProcess:
    """Run a command with one CPU thread (tiny models; the test machine is shared), output merged;
    Python warnings are silenced unless ``warnings``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONWARNINGS="default" if warnings else "ignore")
    proc = subprocess.run(list(args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def json_logs(output: str, tag: str) -> List[dict]:
    """The JSON records of fairseq's ``--log-format json`` lines tagged ``| tag |``."""
    out = []
    for line in output.splitlines():
        if f"| {tag} | " in line and line.rstrip().endswith("}"):
            out.append(json.loads(line.split(f"| {tag} | ", 1)[1]))
    return out


def preprocess(corpus: Path, dest: Path) -> None:
    run(cli("fairseq-preprocess") + [
        "--only-source", "--trainpref", str(corpus / "train.txt"), "--validpref", str(corpus / "valid.txt"),
        "--testpref", str(corpus / "test.txt"), "--destdir", str(dest), "--workers", "1"], cwd=dest.parent)


def tiny_train_args(data: Path, save_dir: Path, *extra: str) -> List[str]:
    return cli("fairseq-train") + [
        str(data), "--user-dir", USER_DIR, "--arch", "deq_transformer_lm_tiny", "--cpu",
        "--tokens-per-sample", "16", "--batch-size", "8", "--optimizer", "adam", "--lr", "0.005",
        "--dropout", "0", "--log-format", "json", "--num-workers", "0", "--seed", "1",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", *extra]


def write_dictionary(directory: Path, words: int = VOCAB) -> Path:
    """A ``dict.txt`` of ``w0 ... w{words-1}`` (enough for a task to set up and a model to build)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dict.txt").write_text("".join(f"w{i} {words - i}\n" for i in range(words)))
    return directory


def parse_train_config(data: Path, *flags: str):
    """fairseq's training config for ``flags``, parsed as ``fairseq-train`` does."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(data), "--user-dir", USER_DIR, "--cpu", *flags])
    return convert_namespace_to_omegaconf(args)


def build(data: Path, *flags: str):
    """(cfg, task, model) as ``fairseq-train`` builds them for ``flags``."""
    from fairseq import tasks

    cfg = parse_train_config(data, *flags)
    task = tasks.setup_task(cfg.task)
    return cfg, task, task.build_model(cfg.model)


def make_contractive(model, scale: float = 0.01):
    """Shrink the output LayerNorm of ``model``'s equilibrium layer so that f contracts; returns
    ``model``.

    The paper's post-LN layer is close to non-expansive at initialization: ``LN1(z + Attn(z; u))``
    undoes any scale of ``z``, so only the size of ``z`` against the attention's injected part
    sets the contraction, and solves to 1e-9 do not finish. With the output scaled by ``scale``,
    ``z`` is small against it, as in a JR-trained layer, and tests that compare fixed points can
    reach them.
    """
    import torch

    with torch.no_grad():
        model.decoder.deq.f.ffn_norm.weight.mul_(scale)
    return model
