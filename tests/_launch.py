"""Launching the multi-process tests: one CPU thread per process, output kept for the error."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence


def env() -> dict:
    """This environment with one thread per process (two processes share the test machine)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, args: Sequence[str]) -> List[str]:
    """The command line of ``torchrun --standalone --nproc_per_node nproc script args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def check(procs: Sequence[subprocess.Popen], timeout: float = 300) -> List[str]:
    """Wait for every process; return their outputs, or fail with the output of any that failed."""
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        outputs.append(out)
    failed = [(p, o) for p, o in zip(procs, outputs) if p.returncode != 0]
    assert not failed, "\n\n".join(f"{' '.join(map(str, p.args))} failed ({p.returncode}):\n{o[-6000:]}"
                                   for p, o in failed)
    return outputs


def start(cmd: Sequence[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(list(cmd), cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
