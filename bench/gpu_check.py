"""One-shot validation on one CUDA GPU, printed as one markdown table.

    python -m bench.gpu_check                      # one CUDA GPU; about 5 minutes on an H100
    python -m bench.gpu_check --device cpu --tiny  # every section on small models (a smoke run)

Sections: the core tests (``tests/test_layer_gradients.py``, ``tests/test_solvers.py``) on the
device; training-step throughput, peak memory and solver steps of ``mdeq_small`` against timm's
``resnet50`` and ``resnet101`` (bfloat16 autocast, batch 64 at 224x224, through
``bench.timm_mdeq``); of ``deq_transformer_lm_wt103`` against fairseq's ``transformer_lm_wiki103``
(whole model in float16 as ``--fp16`` runs it, the same 14 x 150 tokens per update, through
``bench.fairseq_lm``); where the time of one ``mdeq_small`` training step goes (torch.profiler: the
shares of f, the solvers' bookkeeping, and the stem, head and optimizer); eager against
CUDA-graph-replayed forward solves and training steps (``bench.graphs``); the JR overhead of a
training step (``bench.core``); mixed precision (float16 and bfloat16 autocast solves against
float32 through ``bench.core``, a GradScaler step with an injected overflow, ``fairseq-train
--fp16`` and ``--amp`` updates on a generated corpus); training steps of the whole
``torch.compile``d ``mdeq_tiny_cifar`` against eager; the wall time.

A row's status is ``pass`` or ``FAIL``. A check fails when tests fail, a section raises, a loss is
not finite, a solver used more steps than its limit, a reduced-precision solve reports divergence
where float32 converges, the loss scaler does not skip an overflowed step, a compiled model's
gradients differ from eager by more than 1e-3 where no solve amplifies them, its solver steps
differ, or it recompiles after its first step, a graph replay's result differs from eager, a
profile's shares do not add up to its step, or the whole run took longer than ``--time-limit``.
Performance targets (JR overhead) are reported as met or missed in the result and do not fail
the run. Exit status: 0 when every check passes, 1 when one fails, 2 when the device cannot be
used. Nothing is installed or downloaded.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import math
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = ("tests/test_layer_gradients.py", "tests/test_solvers.py")
SECTIONS = ("core", "timm", "profile", "graphs", "fairseq", "jr", "precision", "fairseq_precision", "compile")
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


def step_profile(s: Settings) -> List[Row]:
    """Where one training step of the timm section's MDEQ spends its time (torch.profiler, CUDA
    activities on a GPU; bfloat16 autocast, JR off), through ``bench.timm_mdeq.profile_step``: f,
    the solvers' bookkeeping, the stem, head and optimizer, as shares of the step. Fails when the
    host-time shares do not add up to the step or (on a GPU) no kernel time was recorded."""
    from bench import timm_mdeq

    name = s.timm_models[0]
    p = timm_mdeq.profile_step(name, s.device, s.batch, s.img_size, amp=True)
    host_sum = sum(p.host_us.values())
    ok = p.wall_us > 0 and abs(host_sum - p.wall_us) <= 0.01 * p.wall_us and \
        (not p.on_device or sum(p.device_us.values()) > 0)
    rows = [Row(f"step profile {name}: {part}", result, _status(ok)) for part, result in timm_mdeq.profile_shares(p)]
    rows[-1].result += f"; bf16 autocast, batch {s.batch} at {s.img_size}px, JR off"
    return rows


def graph_capture(s: Settings) -> List[Row]:
    """Eager against CUDA-graph-replayed Anderson forward solves and implicit training steps of
    the transformer cell (``bench.graphs``, ``check_every=0``). Fails when a capture raises, a
    replay's result differs from eager by more than 1e-4 relative, or its solver steps differ; on
    CPU only the eager runs are checked (they must repeat exactly)."""
    from bench import graphs

    rows = []
    for c in graphs.compare(s.device, batch=min(s.batch, 8), repeats=s.jr_repeats * 4):
        if c.captured:
            result = (f"replay {c.replay_s * 1e3:.1f} ms vs eager {c.eager_s * 1e3:.1f} ms "
                      f"({c.replay_s / c.eager_s:.2f}x); result difference {c.rel_diff:.1e}; same steps "
                      f"{c.same_steps}")
        else:
            result = (f"not captured: CUDA graphs need CUDA; eager {c.eager_s * 1e3:.1f} ms, repeat difference "
                      f"{c.rel_diff:.1e}, same steps {c.same_steps}")
        ok = c.same_steps and c.rel_diff <= (1e-4 if c.captured else 0.0)
        rows.append(Row(f"CUDA graph {c.name}", result, _status(ok)))
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
    for case, ratio in core.jr_overhead_ratios(s.device, s.jr_repeats, min(s.batch, 8)).items():
        met = "met" if ratio <= core.JR_OVERHEAD_TARGET else "missed"
        rows.append(Row(f"JR step / plain step, {case}, 12 fwd + 12 bwd solver steps",
                        f"{ratio:.2f}x (target <= {core.JR_OVERHEAD_TARGET:.2f}x {met})",
                        _status(math.isfinite(ratio) and ratio > 0)))
    return rows


def precision(s: Settings) -> List[Row]:
    """Autocast solves against float32 (bench.core's cells, default tolerances) and a GradScaler step."""
    from bench import core

    rows = []
    for case, runs in core.mixed_precision_solves(s.device, s.jr_repeats).items():
        ref = runs["float32"]
        for key, r in runs.items():
            if not key.endswith("(now)"):
                continue
            dtype = key.split(",")[0]
            ok = not (r["diverged"] > 0 and ref["diverged"] == 0) and r["steps"] <= ref["steps"] + 30
            rows.append(Row(f"forward solve {case}, {dtype} autocast against float32",
                            f"steps {r['steps']:.1f} / {ref['steps']:.1f}, rel. residual {r['rel_res']:.1e} / "
                            f"{ref['rel_res']:.1e}, stalled at the floor {r['stalled']:.0%}, diverged "
                            f"{r['diverged']:.0%} / {ref['diverged']:.0%}, time {r['seconds'] / ref['seconds']:.2f}x",
                            _status(ok)))
    rows.append(_scaler_step(s.device))
    return rows


def _scaler_step(device: torch.device) -> Row:
    """float16 autocast training steps under torch.amp.GradScaler: an overflow injected into the
    gradient reaching the layer must make the scaler skip the step; the next step must update."""
    from bench.cells import TransformerCell
    from deq_core import DEQLayer

    torch.manual_seed(0)
    f = TransformerCell(d_model=64, heads=4, d_ffn=128).to(device)
    layer = DEQLayer(f, f_max_iter=12, b_max_iter=12, jac_weight=0.5, jac_freq=1.0)
    opt = torch.optim.SGD(f.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device.type)
    x = torch.randn(4, 32, 64, device=device)

    def step(inject: bool) -> Tuple[bool, float, bool]:
        before = [p.detach().clone() for p in f.parameters()]
        with torch.autocast(device.type, dtype=torch.float16):
            z, stats = layer(x)
            if inject:
                z.register_hook(lambda g: g.index_fill(0, torch.tensor([0], device=g.device), float("inf")))
            loss = z.float().pow(2).mean() + stats.jr_term
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        moved = any(not torch.equal(p, q) for p, q in zip(f.parameters(), before))
        return moved, scale, bool(torch.isfinite(loss))

    moved_bad, scale_bad, _ = step(inject=True)
    moved_ok, _, finite = step(inject=False)
    ok = not moved_bad and scaler.get_scale() < scale_bad and moved_ok and finite
    return Row("GradScaler, float16 autocast: step with an injected inf in the layer's incoming gradient, "
               "then a clean step", f"overflowed step skipped: {not moved_bad} (scale {scale_bad:g} -> "
               f"{scaler.get_scale():g}); clean step applied: {moved_ok}, finite loss: {finite}", _status(ok))


def fairseq_precision(s: Settings) -> List[Row]:
    """``fairseq-train`` updates of deq_transformer_lm_tiny with fairseq's precision flags (on CUDA
    ``--fp16`` and ``--amp``; on CPU ``--memory-efficient-fp16``, and ``--amp`` must be refused), on
    a small standard-library docstring corpus written to a temporary directory."""
    import tempfile

    from fairseq_deq import demo

    runs = [["--fp16"], ["--amp"]] if s.device.type == "cuda" else [["--memory-efficient-fp16"], ["--amp"]]
    with tempfile.TemporaryDirectory(prefix="gpu_check_fairseq_") as tmp:
        work = Path(tmp)
        demo.write_corpus(work / "raw", limit=400)
        subprocess.run(demo.fairseq_tool("fairseq-preprocess") + [
            "--only-source", "--trainpref", str(work / "raw/train.txt"), "--validpref", str(work / "raw/valid.txt"),
            "--destdir", str(work / "data-bin"), "--nwordssrc", "2000", "--workers", "1"],
            check=True, capture_output=True)
        return [_fairseq_precision_run(s, work / "data-bin", flags) for flags in runs]


def _fairseq_precision_run(s: Settings, data: Path, flags: List[str]) -> Row:
    from fairseq_deq import demo

    cmd = demo.fairseq_tool("fairseq-train") + [
        str(data), "--user-dir", str(ROOT / "fairseq_deq"), "--task", "deq_language_modeling",
        "--tokens-per-sample", "32", "--arch", "deq_transformer_lm_tiny", "--criterion", "cross_entropy_jr",
        "--batch-size", "8", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "6", "--jac-freq", "1",
        "--log-format", "json", "--log-interval", "1", "--disable-validation", "--no-save", "--num-workers",
        "0", "--seed", "1", *(["--cpu"] if s.device.type == "cpu" else []), *flags]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    if s.device.type == "cpu" and flags == ["--amp"]:
        ok = proc.returncode != 0 and "--amp is fairseq's CUDA autocast" in proc.stdout
        return Row("fairseq-train --amp on CPU", "refused with the flags to use instead" if ok else
                   proc.stdout[-300:], _status(ok))
    records = demo.log_records(proc.stdout, "train_inner") or demo.log_records(proc.stdout, "train")
    last = records[-1] if records else {}
    loss = float(last.get("loss", "nan"))
    ok = proc.returncode == 0 and math.isfinite(loss) and float(last.get("f_diverged", 1)) == 0.0
    result = (f"loss {loss:.3f}, f_steps {last.get('f_steps', '-')}, b_steps {last.get('b_steps', '-')}, "
              f"jr {last.get('jr', '-')}, f_stalled {last.get('f_stalled', '-')}" if proc.returncode == 0
              else proc.stdout[-300:])
    return Row(f"fairseq-train {' '.join(flags)}, deq_transformer_lm_tiny, 6 updates with JR", result, _status(ok))


def compiled_model(s: Settings) -> List[Row]:
    """Training steps of ``torch.compile(mdeq_tiny_cifar)`` (inductor) against eager: a pretraining
    step (unrolled stack, with JR), then implicit steps with JR on and off. The untrained model's
    solves do not converge (spectral radius about 1.4 at z*), so they amplify the compiled stem's
    rounding differences: the gradient (all parameters) must match eager within 1e-3 relative where
    no solve is involved (the CPU tests hold 1e-4 at this size; cuDNN may use TF32 here); the
    implicit steps must take the same solver steps, stay finite and compile nothing new."""
    import timm
    import timm_deq  # noqa: F401  (registers the models)
    from torch._dynamo.testing import CompileCounterWithBackend

    from bench._run import relative_error
    from bench.timm_mdeq import classification_task

    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=10, f_max_iter=20, b_max_iter=20, jac_freq=1.0,
                              pretrain_steps=1, pretrain_jac_weight=0.4, unrolled_layers=4).to(s.device).train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(2, 3, 16, 16, device=s.device)
    y = torch.randint(0, 10, (2,), device=s.device)

    def step(call):
        model.zero_grad()
        torch.manual_seed(5)
        t0 = time.perf_counter()
        loss = classification_task(call)(x, y)["loss"]
        loss.backward()
        if s.device.type == "cuda":
            torch.cuda.synchronize(s.device)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return grads, model.deq_stats.f_steps.tolist(), bool(torch.isfinite(loss)), time.perf_counter() - t0

    errors, graphs, times, same_steps, finite = [], [], [], True, True
    for n, jac_weight in enumerate((0.4, 0.4, 0.0, 0.4)):
        model.set_num_updates(n)
        with model.deq.overridden(jac_weight=jac_weight):
            ref, ref_steps, _, t_eager = step(model)
            got, steps, ok, t_compiled = step(compiled)
        errors.append(relative_error(got, ref))
        graphs.append(counter.frame_count)
        times.append(t_compiled / t_eager)
        same_steps, finite = same_steps and steps == ref_steps, finite and ok
    ok = errors[0] < 1e-3 and same_steps and finite and graphs == [graphs[0]] * len(graphs)
    return [Row("torch.compile(mdeq_tiny_cifar), inductor: a pretraining step, then implicit steps with JR "
                "on / off / on", f"gradient error vs eager: pretraining {errors[0]:.1e}, implicit (unconverged "
                f"solves) {max(errors[1:]):.1e}; same solver steps {same_steps}; graphs after each step "
                f"{graphs}; step time vs eager (after the first) {statistics.median(times[1:]):.2f}x",
                _status(ok))]


_SECTION_FUNCTIONS = {"core": core_tests, "timm": timm_models, "profile": step_profile, "graphs": graph_capture,
                      "fairseq": fairseq_models,
                      "jr": jr_overhead,
                      "precision": precision, "fairseq_precision": fairseq_precision, "compile": compiled_model}


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
