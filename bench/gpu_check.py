"""One-shot validation on one CUDA GPU, printed as one markdown table.

    python -m bench.gpu_check                      # one CUDA GPU; about 5 minutes on an H100
    python -m bench.gpu_check --device cpu --tiny  # every section on small models (a smoke run)

Sections: the core tests (``tests/test_layer_gradients.py``, ``tests/test_solvers.py``) on the
device; training-step throughput, peak memory and solver steps of ``mdeq_small`` against timm's
``resnet50`` and ``resnet101`` (bfloat16 autocast, batch 64 at 224x224, through
``bench.timm_mdeq``); of ``deq_transformer_lm_wt103`` against fairseq's ``transformer_lm_wiki103``
(whole model in float16 as ``--fp16`` runs it, the same 14 x 150 tokens per update, through
``bench.fairseq_lm``); the JR overhead of a training step (``bench.core``); the wall time.

A row's status is ``pass`` or ``FAIL``. A check fails when tests fail, a section raises, a loss is
not finite, a solver used more steps than its limit, or the whole run took longer than
``--time-limit``. Performance targets (JR overhead) are reported as met or missed in the result
and do not fail the run. Exit status: 0 when every check passes, 1 when one fails, 2 when the
device cannot be used. Nothing is installed or downloaded.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = ("tests/test_layer_gradients.py", "tests/test_solvers.py")
SECTIONS = ("core", "timm", "fairseq", "jr")
PASS, FAIL = "pass", "FAIL"


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str
    status: str


@dataclass
class Settings:
    """What each section runs: the full GPU validation, or small models for a smoke run."""

    device: torch.device
    timm_models: Tuple[str, ...]
    batch: int
    img_size: int
    timm_steps: int
    lm_size: str
    lm_baseline: Optional[str]
    lm_dtype: torch.dtype
    lm_steps: int
    jr_repeats: int

    @classmethod
    def for_run(cls, device: torch.device, tiny: bool) -> "Settings":
        if tiny:
            return cls(device, ("mdeq_tiny_cifar", "resnet18"), 2, 32, 1, "tiny", None, torch.float32, 1, 1)
        return cls(device, ("mdeq_small", "resnet50", "resnet101"), 64, 224, 5, "wt103", "transformer_lm_wiki103",
                   torch.float16, 10, 5)


def run_checks(sections: Sequence[Tuple[str, Callable[[], List[Row]]]]) -> List[Row]:
    """Run every section; a section that raises becomes one failed row and the others still run."""
    rows: List[Row] = []
    for name, section in sections:
        try:
            rows.extend(section())
        except Exception as err:  # noqa: BLE001 - any crash of a section is a failed check
            rows.append(Row(name, f"{type(err).__name__}: {err}", FAIL))
    return rows


def render(rows: Sequence[Row]) -> List[str]:
    """The markdown table (cells on one line each, ``|`` escaped)."""
    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    return ["| check | result | status |", "|---|---|---|"] + [
        f"| {cell(r.check)} | {cell(r.result)} | {cell(r.status)} |" for r in rows]


def exit_code(rows: Sequence[Row]) -> int:
    return 1 if any(r.status == FAIL for r in rows) else 0


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# -- sections ----------------------------------------------------------------------------------
def core_tests(s: Settings) -> List[Row]:
    """pytest of the solver and layer-gradient tests with ``--device``, in a fresh interpreter."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS, "--device", str(s.device)]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                   lines[-1] if lines else "no output")
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    result = summary + ("; " + "; ".join(failed[:5]) if failed else "")
    return [Row(f"core tests on {s.device} ({', '.join(Path(t).name for t in CORE_TESTS)})", result,
                _status(proc.returncode == 0))]


def timm_models(s: Settings) -> List[Row]:
    from bench import timm_mdeq

    costs = timm_mdeq.measure(s.timm_models, s.device, s.batch, s.img_size, s.timm_steps, amp=True)
    memory = "peak CUDA memory" if s.device.type == "cuda" else "saved for backward"
    rows = []
    for name, c in costs.items():
        ok = math.isfinite(c.loss) and c.step_time > 0
        result = (f"{s.batch / c.step_time:.1f} img/s ({c.step_time:.3f} s/step), {memory} {_size(c.memory)}, "
                  f"{c.params / 1e6:.1f}M params")
        if c.nfe is not None:
            (f_steps, b_steps), (f_limit, b_limit) = c.nfe, c.limits
            ok = ok and f_steps <= f_limit and b_steps <= b_limit
            result += f", solver steps fwd {f_steps:.1f} / bwd {b_steps:.1f} (limits {f_limit} / {b_limit})"
        rows.append(Row(f"train step {name}, bf16 autocast, batch {s.batch} at {s.img_size}px", result, _status(ok)))
    deq, *others = costs
    ratios = ", ".join(f"{o}: time {costs[deq].step_time / costs[o].step_time:.2f}x, memory "
                       f"{costs[deq].memory / costs[o].memory:.2f}x" for o in others)
    rows.append(Row(f"{deq} relative to {', '.join(others)}", ratios, PASS))
    return rows


def fairseq_models(s: Settings) -> List[Row]:
    from bench import fairseq_lm

    c = fairseq_lm.train_pair(s.lm_size, s.device, s.lm_dtype, s.lm_steps, baseline=s.lm_baseline)
    arch = fairseq_lm.SIZES[s.lm_size][0]
    kind, used = ("peak CUDA memory", c.peak) if c.peak["deq"] else ("saved for backward", c.saved)
    memory = f"{kind} DEQ {_size(used['deq'])}, {c.label} {_size(used['base'])}"
    f_limit, b_limit = c.limits
    ok = c.finite and c.f_steps <= f_limit and c.b_steps <= b_limit
    dtype = str(s.lm_dtype).replace("torch.", "")
    return [Row(f"train step {arch} vs {c.label}, {dtype}, {c.batch}x{c.seg} tokens",
                f"tokens/s DEQ {c.tokens_per_s['deq']:.0f}, {c.label} {c.tokens_per_s['base']:.0f} "
                f"(DEQ time per token {c.tokens_per_s['base'] / c.tokens_per_s['deq']:.2f}x); {memory}; "
                f"params DEQ {c.params['deq'][0] / 1e6:.1f}M, {c.label} {c.params['base'][0] / 1e6:.1f}M; "
                f"solver steps fwd {c.f_steps:.1f} / bwd {c.b_steps:.1f} (limits {f_limit} / {b_limit}), "
                f"JR in {c.jr_updates}/{c.updates} updates", _status(ok))]


def jr_overhead(s: Settings) -> List[Row]:
    from bench import core

    rows = []
    for case, ratio in core.jr_overhead_ratios(s.device, s.jr_repeats).items():
        met = "met" if ratio <= core.JR_OVERHEAD_TARGET else "missed"
        rows.append(Row(f"JR step / plain step, {case}, 12 fwd + 12 bwd solver steps",
                        f"{ratio:.2f}x (target <= {core.JR_OVERHEAD_TARGET:.2f}x {met})",
                        _status(math.isfinite(ratio) and ratio > 0)))
    return rows


_SECTION_FUNCTIONS = {"core": core_tests, "timm": timm_models, "fairseq": fairseq_models, "jr": jr_overhead}


def _header(device: torch.device) -> str:
    versions = [f"torch {torch.__version__}"]
    for package in ("timm", "fairseq"):
        try:
            versions.append(f"{package} {importlib.import_module(package).__version__}")
        except ImportError:
            versions.append(f"{package} not installed")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"gpu_check {datetime.date.today().isoformat()} on {where}: {', '.join(versions)}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="small models and few steps: a smoke run of every section")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds the whole run may take")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}, {torch.cuda.device_count()} devices visible); this script validates on a "
              "CUDA GPU. For a smoke run of its sections on this machine: python -m bench.gpu_check --device cpu "
              "--tiny", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not args.tiny):
        parser.error(f"--device {args.device} needs a CUDA device, or cpu together with --tiny")
    settings = Settings.for_run(device, args.tiny)
    start = time.perf_counter()
    rows = run_checks([(name, lambda f=_SECTION_FUNCTIONS[name]: f(settings)) for name in args.sections])
    elapsed = time.perf_counter() - start
    rows.append(Row("wall time", f"{elapsed:.0f} s (limit {args.time_limit:.0f} s)",
                    _status(elapsed <= args.time_limit)))
    print(_header(device))
    print("\n".join(render(rows)), flush=True)
    return exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
