"""Training-step cost of MDEQ against timm's ResNets at the same batch and resolution.

    python -m bench.timm_mdeq [--device cuda] [--batch-size 64] [--img-size 224] [--amp]

For each model: median time of a full training step (forward, loss with JR when the step draws it,
backward, SGD step), memory, and the forward/backward solver steps of the MDEQ. Steps of all
models are interleaved so that machine noise hits them alike; ratios are to ``resnet50``.
Memory is the CUDA peak allocation on a GPU; on CPU (no allocator statistics) it is the
activation bytes autograd saves for backward in one step (parameters left out), which is where an
implicit model saves.
"""
import argparse
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import timm
import timm_deq  # noqa: F401  (registers the MDEQ models)
from bench._memory import saved_activation_bytes
from timm_deq.task import deq_layers, set_deq_step


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


def measure(names: Sequence[str], device: torch.device, batch: int, img_size: int = 224, steps: int = 3,
            amp: bool = False, jac_freq: Optional[float] = None) -> Dict[str, StepCost]:
    """Train every model of ``names`` for one untimed step (memory) and ``steps`` timed ones,
    interleaved, on one random batch; bfloat16 autocast when ``amp``."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else nullcontext
    torch.manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    models, optims = {}, {}
    for name in names:
        # The solver phase (pretrain_steps=0): the paper variants' schedule starts with an unrolled stack.
        kwargs = {'pretrain_steps': 0} if name.startswith('mdeq') else {}
        if jac_freq is not None and name.startswith('mdeq'):
            kwargs['jac_freq'] = jac_freq
        models[name] = timm.create_model(name, **kwargs).to(device).train()
        optims[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9)
    y = torch.randint(0, min(m.num_classes for m in models.values()), (batch,), device=device)
    nfe: Dict[str, List[Tuple[float, float]]] = {name: [] for name in models}
    losses: Dict[str, float] = {}
    step_no = {name: 0 for name in models}

    def step(name):
        model, opt = models[name], optims[name]
        set_deq_step(model, step_no[name])
        step_no[name] += 1
        with autocast():
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
            for layer in deq_layers(model):
                loss = loss + layer.stats.jr_term
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[name] = float(loss.detach())
        for layer in deq_layers(model):
            d = layer.stats.to_dict()
            nfe[name].append((d['f_steps'], d.get('b_steps', float('nan'))))

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    memory = {}
    for name in models:
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            step(name)
            sync()
            memory[name] = torch.cuda.max_memory_allocated(device)
        else:
            memory[name] = saved_activation_bytes(lambda: step(name), models[name].parameters())[1]
    times: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name in models:
            sync()
            t0 = time.perf_counter()
            step(name)
            sync()
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, model in models.items():
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--models', nargs='+', default=['mdeq_small', 'resnet50', 'resnet101'])
    parser.add_argument('--batch-size', type=int, default=None, help='default: 2 on CPU, 64 on CUDA')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    parser.add_argument('--jac-freq', type=float, default=None,
                        help='JR frequency of the MDEQ (default: the model\'s, 0.08 for mdeq_small)')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == 'cuda' else 2)
    costs = measure(args.models, device, batch, args.img_size, args.steps, args.amp, args.jac_freq)
    base = 'resnet50' if 'resnet50' in costs else args.models[0]
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, timm {timm.__version__}, {where}; batch {batch} at {args.img_size}px'
          f'{", bf16 autocast" if args.amp else ""}')
    for row in table(costs, base, 'peak CUDA memory' if device.type == 'cuda' else 'saved-for-backward'):
        print(row)


if __name__ == '__main__':
    main()
