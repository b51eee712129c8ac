"""Training-step cost of MDEQ against timm's ResNets at the same batch and resolution.

    python -m bench.timm_mdeq [--device cuda] [--batch-size 64] [--img-size 224] [--amp]
    python -m bench.timm_mdeq --flops [--forced-steps 6]   # FLOPs per step, time per FLOP (batch 1)
    python -m bench.timm_mdeq --profile                    # where one MDEQ step's time goes

For each model: median time of a full training step (forward, loss with JR when the step draws it,
backward, SGD step), memory, and the forward/backward solver steps of the MDEQ. Steps of all
models are interleaved so that machine noise hits them alike; ratios are to ``resnet50``.
Memory is the CUDA peak allocation on a GPU; on CPU (no allocator statistics) it is the
activation bytes autograd saves for backward in one step (parameters left out), which is where an
implicit model saves.

``--flops``: the FLOPs of one training step as ``torch.utils.flop_counter`` counts them (see
:mod:`bench._flops` for what counts), with JR off, the MDEQ held at exactly its training limits
(14/14 solver steps for ``mdeq_small``) and at every ``--forced-steps`` k/k; its FLOP, time and
time-per-FLOP ratios to every ResNet, all rows timed interleaved. ``--profile``: one training step
of the first model under torch.profiler, its time attributed to f, the solvers' bookkeeping, and
the stem, head and optimizer (:func:`profile_step`).
"""
import argparse
import functools
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.autograd import DeviceType

import timm
import timm_deq  # noqa: F401  (registers the MDEQ models)
from bench._flops import FORCED_STEPS, FlopRow, FlopRun, compare_flops, deq_runs, flop_table
from bench._memory import saved_activation_bytes
from bench._run import sync
from deq_core import DEQLayer
from deq_core.solvers import get_solver, register_solver, solver_options, unregister_solver
from timm_deq.task import DEQClassificationTask, deq_layers, set_deq_step


@dataclass
class StepCost:
    """What one model's training steps cost: parameters, median step time, memory (CUDA peak or
    saved-for-backward bytes), mean forward/backward solver steps and their limits (DEQ models,
    else None) and the last loss."""

    params: int
    step_time: float
    memory: int
    nfe: Optional[Tuple[float, float]]
    limits: Optional[Tuple[int, int]]
    loss: float


def train_step(task: DEQClassificationTask, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast: Callable[[], ContextManager], step_no: int) -> Tuple[float, List[Tuple[float, float]]]:
    """One training step through the shipped task (timm's cross-entropy plus the DEQ layers' JR
    terms), backward and optimizer step. Returns the loss and, per DEQ layer, the (forward,
    backward) solver steps of the pass."""
    set_deq_step(task.trainable_module, step_no)
    with autocast():
        loss = task(x, y)['loss']
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    solver_steps = []
    for layer in deq_layers(task.trainable_module):
        d = layer.stats.to_dict()
        solver_steps.append((d['f_steps'], d.get('b_steps', float('nan'))))
    return float(loss.detach()), solver_steps


def classification_task(model: torch.nn.Module) -> DEQClassificationTask:
    """The task ``timm_deq.train`` trains with, around ``model`` (timm's cross-entropy)."""
    return DEQClassificationTask(model, verbose=False)


def _build(names: Sequence[str], device: torch.device, batch: int, img_size: int,
           jac_freq: Optional[float] = None):
    """The training tasks of the models of ``names`` (in training mode) with an SGD optimizer
    each, a random batch and its labels; MDEQ models in their solver phase (no unrolled pretraining)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    tasks, optims = {}, {}
    for name in names:
        # The solver phase (pretrain_steps=0): the paper variants' schedule starts with an unrolled stack.
        kwargs = {'pretrain_steps': 0} if name.startswith('mdeq') else {}
        if jac_freq is not None and name.startswith('mdeq'):
            kwargs['jac_freq'] = jac_freq
        model = timm.create_model(name, **kwargs).to(device).train()
        tasks[name] = classification_task(model)
        optims[name] = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    y = torch.randint(0, min(t.trainable_module.num_classes for t in tasks.values()), (batch,), device=device)
    return tasks, optims, x, y


def measure(names: Sequence[str], device: torch.device, batch: int, img_size: int = 224, steps: int = 3,
            amp: bool = False, jac_freq: Optional[float] = None) -> Dict[str, StepCost]:
    """Train every model of ``names`` for one untimed step (memory) and ``steps`` timed ones,
    interleaved, on one random batch; bfloat16 autocast when ``amp``."""
    autocast = _autocast(device, amp)
    tasks, optims, x, y = _build(names, device, batch, img_size, jac_freq)
    nfe: Dict[str, List[Tuple[float, float]]] = {name: [] for name in tasks}
    losses: Dict[str, float] = {}
    step_no = {name: 0 for name in tasks}

    def step(name):
        losses[name], solver_steps = train_step(tasks[name], optims[name], x, y, autocast, step_no[name])
        step_no[name] += 1
        nfe[name].extend(solver_steps)

    memory = {}
    for name in tasks:
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            step(name)
            sync(device)
            memory[name] = torch.cuda.max_memory_allocated(device)
        else:
            memory[name] = saved_activation_bytes(lambda: step(name), tasks[name].trainable_module.parameters())[1]
    times: Dict[str, List[float]] = {name: [] for name in tasks}
    for _ in range(steps):
        for name in tasks:
            sync(device)
            t0 = time.perf_counter()
            step(name)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, task in tasks.items():
        model = task.trainable_module
        steps_done = nfe[name]
        configs = [layer.config for layer in deq_layers(model)]
        out[name] = StepCost(
            params=sum(p.numel() for p in model.parameters()), step_time=statistics.median(times[name]),
            memory=memory[name], loss=losses[name],
            limits=None if not configs else (configs[0].f_max_iter, configs[0].b_max_iter),
            nfe=None if not steps_done else (statistics.mean(s[0] for s in steps_done),
                                             statistics.mean(s[1] for s in steps_done)))
    return out


def table(costs: Dict[str, StepCost], base: str, memory_kind: str) -> List[str]:
    """Markdown rows: parameters, step time and memory of each model, and their ratios to ``base``."""
    t_base, m_base = costs[base].step_time, costs[base].memory
    rows = [f'| model | params | step time | vs {base} | {memory_kind} | vs {base} | NFE fwd / bwd |',
            '|---|---|---|---|---|---|---|']
    for name, c in costs.items():
        nfe_txt = '-' if c.nfe is None else f'{c.nfe[0]:.1f} / {c.nfe[1]:.1f}'
        rows.append(f'| {name} | {c.params / 1e6:.1f}M | {c.step_time:.3f}s | {c.step_time / t_base:.2f}x | '
                    f'{c.memory / 2**20:.0f} MiB | {c.memory / m_base:.2f}x | {nfe_txt} |')
    return rows


def _autocast(device: torch.device, amp: bool) -> Callable[[], ContextManager]:
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext


# -- FLOPs per training step ------------------------------------------------------------------------
def flop_comparison(names: Sequence[str], device: torch.device, batch: int = 1, img_size: int = 224,
                    steps: int = 3, forced: Sequence[int] = FORCED_STEPS, amp: bool = False) -> List[FlopRow]:
    """FLOPs and time of a training step of every model of ``names``, a DEQ model both at its
    training limits (its ``f_max_iter`` / ``b_max_iter``) and at k/k solver steps for every k of
    ``forced``, held there by :func:`bench._flops.forced_steps` (JR off), measured by
    :func:`bench._flops.compare_flops` (one whole step per row: forward solve, the differentiable
    call of f, backward solve, parameter gradients, optimizer step).

    Args:
        names: timm model names (DEQ models are the ones with equilibrium layers).
        device: where to train.
        batch: images per step.
        img_size: image height and width.
        steps: timed steps per row.
        forced: solver steps (forward and backward) to hold the DEQ models at, beside their limits.
        amp: bfloat16 autocast.

    Returns:
        one :class:`~bench._flops.FlopRow` per model and setting, DEQ models first in the order of ``names``.
    """
    autocast = _autocast(device, amp)
    tasks, optims, x, y = _build(names, device, batch, img_size)
    step_no = {name: 0 for name in names}

    def step(name: str) -> None:
        train_step(tasks[name], optims[name], x, y, autocast, step_no[name])
        step_no[name] += 1

    runs: Dict[str, FlopRun] = {}
    for name in names:
        layers = deq_layers(tasks[name].trainable_module)
        if layers:
            runs.update(deq_runs(name, functools.partial(step, name), layers, forced))
    runs.update({name: FlopRun(functools.partial(step, name)) for name in names
                 if not deq_layers(tasks[name].trainable_module)})
    return compare_flops(runs, steps, device)


def flop_baselines(rows: Sequence[FlopRow]) -> List[str]:
    """The rows the ratios are taken to: every model without solver steps (the ResNets), else the first row."""
    return [r.label for r in rows if r.forced is None] or [rows[0].label]


# -- where the time of a training step goes -------------------------------------------------------
_RANGE = 'bench::'
PROFILE_PARTS = {
    'f_solve': 'f: forward-solve evaluations',
    'f_star': 'f: the differentiable call at z*',
    'f_vjp': 'f: vector-Jacobian products of the backward solve',
    'f_backward': 'f: backward to its parameters and injection',
    'fwd_book': 'forward solver bookkeeping (solve minus f)',
    'bwd_book': 'backward solver bookkeeping (solve minus the VJPs)',
    'layer': 'equilibrium layer outside solves and f (state packing, statistics)',
    'stem': 'stem forward and backward',
    'head': 'head and loss, forward and backward',
    'optimizer': 'optimizer step',
    'wait': 'waiting for the device at the end of the step',
}
PROFILE_GROUPS = {
    'f (the equilibrium function)': ('f_solve', 'f_star', 'f_vjp', 'f_backward'),
    'solver bookkeeping (solves minus f, layer overhead)': ('fwd_book', 'bwd_book', 'layer'),
    'stem, head, loss and optimizer': ('stem', 'head', 'optimizer'),
    'waiting for the device': ('wait',),
}


@dataclass
class StepProfile:
    """Where the time of one profiled training step went, per part of :data:`PROFILE_PARTS`, in
    microseconds: the host (wall) time spent in the part (every instant of the step belongs to
    one part) and the device (CUDA kernel) time of the operations it launched; the step's wall
    time (up to the device's end of the step), whether device times were recorded, and the
    step's (forward, backward) solver steps."""

    host_us: Dict[str, float]
    device_us: Dict[str, float]
    wall_us: float
    on_device: bool
    steps: Tuple[float, float]


@contextmanager
def _range(name: str) -> Iterator[None]:
    with torch.profiler.record_function(_RANGE + name):
        yield


def _module_range(module: torch.nn.Module, name: str) -> List[Any]:
    """Hooks opening a profiler range when ``module`` starts its forward and closing it at the end."""
    open_ranges: List[Any] = []

    def enter(*_):
        r = torch.profiler.record_function(_RANGE + name)
        r.__enter__()
        open_ranges.append(r)

    def leave(*_):
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]


def _ranged_solver(base: str, solve_range: str, map_range: Optional[str]) -> Callable[..., Any]:
    """The solver ``base`` inside a profiler range, its map too when ``map_range`` is given."""
    solver = get_solver(base)

    @functools.wraps(solver)
    def solve(f, z0, **kwargs):
        def ranged(z):
            with _range(map_range):
                return f(z)

        with _range(solve_range):
            return solver(ranged if map_range else f, z0, **kwargs)

    return solve


@contextmanager
def _profiled_solvers(layer: DEQLayer) -> Iterator[None]:
    """Run ``layer`` with its forward and backward solvers inside profiler ranges: each registered
    under a private name for the block, the backward one with every vector-Jacobian product of
    its map in a range of its own."""
    cfg = layer.config
    names = {}
    for side, solve_range, map_range in (('f', 'fsolve', None), ('b', 'bsolve', 'vjp')):
        base = getattr(cfg, f'{side}_solver')
        names[side] = f'bench_profiled_{side}_{base}'
        register_solver(names[side], solver_options(base), overwrite=True)(_ranged_solver(base, solve_range, map_range))
    try:
        with layer.overridden(f_solver=names['f'], f_solver_options=cfg.f_solver_options,
                              b_solver=names['b'], b_solver_options=cfg.b_solver_options):
            yield
    finally:
        for name in names.values():
            unregister_solver(name)


Spans = Dict[str, List[Tuple[float, float]]]


def _spans(prof: Any) -> Spans:
    """This module's profiler ranges by name (without the prefix), as (start, end) microseconds
    from the start of the trace (the clock of ``prof.events()``). Read from the raw profiler
    results, which is much faster than building ``prof.events()``."""
    results = getattr(prof.profiler, 'kineto_results', None)
    out: Spans = {}
    if results is None:
        for e in prof.events():
            if e.name.startswith(_RANGE) and e.device_type == DeviceType.CPU:
                out.setdefault(e.name[len(_RANGE):], []).append((e.time_range.start, e.time_range.end))
        return out
    base = results.trace_start_ns()
    for e in results.events():
        name = e.name()
        if name.startswith(_RANGE) and e.device_type() == DeviceType.CPU:
            out.setdefault(name[len(_RANGE):], []).append(((e.start_ns() - base) / 1e3, (e.end_ns() - base) / 1e3))
    return out


class _Parts:
    """Which part of :data:`PROFILE_PARTS` an instant of the profiled step belongs to, given the
    ranges open then (in any thread: the backward pass may run in autograd's device thread while
    the main thread waits). The backward outside the backward solve is split at the solve's start
    (head before it) and at the moment the stem's output receives its gradient (f before it, the
    stem after it)."""

    _INNER = (('vjp', 'f_vjp'), ('bsolve', 'bwd_book'))
    _OUTER = (('f', 'f_star'), ('deq', 'layer'), ('stem', 'stem'), ('optimizer', 'optimizer'), ('wait', 'wait'))

    def __init__(self, spans: Spans) -> None:
        self.spans = spans
        self.bsolve_start = min((t for t, _ in spans.get('bsolve', ())), default=None)
        self.stem_grad = min((t for t, _ in spans.get('stem_grad', ())), default=None)

    def within(self, kind: str, t: float) -> bool:
        return any(start <= t < end for start, end in self.spans.get(kind, ()))

    def __call__(self, t: float) -> str:
        for kind, key in self._INNER:
            if self.within(kind, t):
                return key
        if self.within('fsolve', t):
            return 'f_solve' if self.within('f', t) else 'fwd_book'
        for kind, key in self._OUTER:
            if self.within(kind, t):
                return key
        if self.within('backward', t):
            if self.bsolve_start is not None and t < self.bsolve_start:
                return 'head'
            return 'f_backward' if self.stem_grad is None or t < self.stem_grad else 'stem'
        return 'head'


def _host_split(spans: Spans) -> Tuple[Dict[str, float], float]:
    """Microseconds of the step per part (every instant in one part, so Python time counts where
    it is spent and the parts add up to the step), and the step's wall time."""
    part = _Parts(spans)
    (start, end), = spans['step']
    bounds = sorted({t for ranges in spans.values() for r in ranges for t in r if start <= t <= end})
    host = {key: 0.0 for key in PROFILE_PARTS}
    for t0, t1 in zip(bounds, bounds[1:]):
        host[part((t0 + t1) / 2)] += t1 - t0
    return host, end - start


def _op_split(events: Sequence[Any], spans: Spans, cost: Callable[[Any], float]) -> Dict[str, float]:
    """``cost`` (e.g. an event's device time) summed per part over the operations of ``events``
    (``prof.events()``): the largest host subtrees without any of this module's ranges inside,
    each in the part of its start."""
    part = _Parts(spans)
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    ranged: Dict[int, bool] = {}

    def has_range(e) -> bool:
        if id(e) not in ranged:
            ranged[id(e)] = e.name.startswith(_RANGE) or any(has_range(c) for c in e.cpu_children)
        return ranged[id(e)]

    out = {key: 0.0 for key in PROFILE_PARTS}
    todo = [e for e in cpu if e.cpu_parent is None]
    while todo:
        e = todo.pop()
        if has_range(e):
            todo.extend(e.cpu_children)
        else:
            out[part(e.time_range.start)] += cost(e)
    return out


def _profile(name: str, device: torch.device, batch: int, img_size: int,
             amp: bool) -> Tuple[Any, Tuple[float, float]]:
    """The torch.profiler profile of one training step of ``name`` with this module's ranges (see
    :func:`profile_step`), and the step's (forward, backward) solver steps."""
    from torch.profiler import ProfilerActivity, profile

    autocast = _autocast(device, amp)
    tasks, optims, x, y = _build([name], device, batch, img_size, jac_freq=0.0)
    task, opt = tasks[name], optims[name]
    model = task.trainable_module
    layers = deq_layers(model)
    if len(layers) != 1:
        raise ValueError(f'{name} has {len(layers)} equilibrium layers; the profile attributes one')
    layer = layers[0]

    def mark_stem_grad(module, args, out):
        def mark(grad):
            with _range('stem_grad'):
                pass

        if out.requires_grad:
            out.register_hook(mark)

    def step(no: int) -> Tuple[float, float]:
        with _range('step'):
            set_deq_step(model, no)
            with autocast():
                loss = task(x, y)['loss']
            with _range('backward'):
                loss.backward()
            with _range('optimizer'):
                opt.step()
                opt.zero_grad(set_to_none=True)
            with _range('wait'):
                sync(device)
        d = layer.stats.to_dict()
        return d['f_steps'], d.get('b_steps', float('nan'))

    step(0)
    hooks = _module_range(model.stem, 'stem') + _module_range(layer, 'deq') + _module_range(layer.f, 'f')
    hooks.append(model.stem.register_forward_hook(mark_stem_grad))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    try:
        with _profiled_solvers(layer), profile(activities=activities) as prof:
            solver_steps = step(1)
    finally:
        for h in hooks:
            h.remove()
    return prof, solver_steps


def profile_step(name: str, device: torch.device, batch: int, img_size: int, amp: bool = False) -> StepProfile:
    """Profile one training step of the DEQ model ``name`` (JR off, its training limits and
    tolerances) with torch.profiler, CUDA activities on a GPU, after one unprofiled warm-up step,
    and attribute its time to the parts of :data:`PROFILE_PARTS` through profiler ranges around
    the stem, the layer, every call of f and both solves (the solvers wrapped under private
    registry names for the step; nothing in the model or the library changes). Host time is
    split by the ranges open at each instant; on a GPU each kernel's time goes to the part of
    the operation that launched it.

    Args:
        name: a timm DEQ model (e.g. ``mdeq_small``).
        device: where to train.
        batch: images per step.
        img_size: image height and width.
        amp: bfloat16 autocast.

    Returns:
        the :class:`StepProfile`.
    """
    prof, solver_steps = _profile(name, device, batch, img_size, amp)
    spans = _spans(prof)
    host, wall = _host_split(spans)
    on_device = device.type == 'cuda'
    dev = _op_split(prof.events(), spans, lambda e: e.device_time_total) if on_device else \
        {key: 0.0 for key in PROFILE_PARTS}
    return StepProfile(host, dev, wall, on_device, solver_steps)


def profile_shares(p: StepProfile) -> List[Tuple[str, str]]:
    """``(part, result)`` lines of a :class:`StepProfile`: the groups of :data:`PROFILE_GROUPS`,
    then every part, each with its share of the step's host time (on a GPU, first its share of
    the kernel time), then the device's idle time (on a GPU) and the step's wall time and solver steps."""
    dev_total = sum(p.device_us.values())

    def result(keys: Sequence[str]) -> str:
        host = sum(p.host_us[k] for k in keys)
        text = f'{host / p.wall_us:.1%} of host time ({host / 1e3:.1f} ms)'
        if p.on_device:
            dev = sum(p.device_us[k] for k in keys)
            text = f'{dev / dev_total:.1%} of GPU kernel time ({dev / 1e3:.1f} ms), ' + text
        return text

    shown = [key for key in PROFILE_PARTS if p.on_device or key != 'wait']  # a CPU step waits for nothing
    lines = [(group, result(keys)) for group, keys in PROFILE_GROUPS.items() if set(keys) & set(shown)]
    lines += [(PROFILE_PARTS[key], result([key])) for key in shown]
    if p.on_device:
        idle = p.wall_us - dev_total
        lines.append(('GPU idle (launch gaps, host work)',
                      f'{idle / p.wall_us:.1%} of the wall time ({idle / 1e3:.1f} ms)'))
    lines.append(('whole step', f'wall {p.wall_us / 1e3:.1f} ms (under the profiler), solver steps fwd '
                                f'{p.steps[0]:.1f} / bwd {p.steps[1]:.1f}'))
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--models', nargs='+', default=['mdeq_small', 'resnet50', 'resnet101'])
    parser.add_argument('--batch-size', type=int, default=None,
                        help='default: 2 on CPU (1 with --flops or --profile), 64 on CUDA')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per model (and per solver setting)')
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--jac-freq', type=float, default=None,
                        help='JR frequency of the MDEQ (default: the model\'s, 0.08 for mdeq_small); '
                             'JR is off with --flops and --profile')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--flops', action='store_true',
                      help='instead: FLOPs per training step (FlopCounterMode) and the FLOP, time and '
                           'time-per-FLOP ratios to the ResNets, MDEQ at its training limits and at --forced-steps')
    mode.add_argument('--profile', action='store_true',
                      help='instead: where one training step of the first model spends its time (torch.profiler)')
    parser.add_argument('--forced-steps', type=int, nargs='+', default=list(FORCED_STEPS), metavar='K',
                        help='with --flops: also hold the MDEQ at exactly K forward and K backward solver steps')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    single = args.flops or args.profile
    batch = args.batch_size or (64 if device.type == 'cuda' else 1 if single else 2)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, timm {timm.__version__}, {where}; batch {batch} at {args.img_size}px'
          f'{", bf16 autocast" if args.amp else ""}')
    if args.flops:
        rows = flop_comparison(args.models, device, batch, args.img_size, args.steps, args.forced_steps, args.amp)
        print('\n'.join(flop_table(rows, flop_baselines(rows))))
        return
    if args.profile:
        prof = profile_step(args.models[0], device, batch, args.img_size, args.amp)
        print(f'| {args.models[0]} training step, JR off | share |')
        print('|---|---|')
        for part, result in profile_shares(prof):
            print(f'| {part} | {result} |')
        return
    costs = measure(args.models, device, batch, args.img_size, args.steps, args.amp, args.jac_freq)
    base = 'resnet50' if 'resnet50' in costs else args.models[0]
    for row in table(costs, base, 'peak CUDA memory' if device.type == 'cuda' else 'saved-for-backward'):
        print(row)


if __name__ == '__main__':
    main()
