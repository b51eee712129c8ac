"""Training-step time of compiled DEQ models: eager, f compiled inside the layer, the whole model
compiled, and both.

    python -m bench.compile [--device cuda] [--backend inductor] [--steps 10] [--models mdeq lm]

For ``mdeq_tiny_cifar`` (batch 16, 32x32) and ``deq_transformer_lm_tiny`` (16 x 64 tokens on CPU,
56 x 64 on CUDA, with segment memory): one training step (forward, loss with JR when the step draws it, backward, SGD
step) of four copies of the same initial model, timed step by step alternately after two untimed
warm-up steps (which compile). Every copy makes the same per-step draws (JR on/off, forward-limit
jitter) because they share the seed and step count. Ratios are to the eager model.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from bench._run import add_device_args, describe, device_from, sync

VARIANTS = ("eager", "f compiled (compile_f)", "whole model compiled", "whole model + f compiled")


def _variants(model: torch.nn.Module, backend: str) -> Dict[str, Tuple[torch.nn.Module, Callable, Dict]]:
    """Four copies of ``model``: (module that owns the parameters, callable to train, the layer
    config changes its steps run under)."""
    out = {}
    for name in VARIANTS:
        copy_ = copy.deepcopy(model)
        changes = dict(compile_f=True, compile_backend=backend) if "f compiled" in name else {}
        call = torch.compile(copy_, backend=backend) if name.startswith("whole") else copy_
        out[name] = (copy_, call, changes)
    return out


def _mdeq_step(device: torch.device):
    import timm

    from bench.timm_mdeq import classification_task

    torch.manual_seed(0)
    model = timm.create_model("mdeq_tiny_cifar", num_classes=10).to(device).train()
    x = torch.randn(16, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (16,), device=device)

    def step(module, call, n):
        module.set_num_updates(n)
        classification_task(call)(x, y)["loss"].backward()

    return model, (lambda m: m.deq), step


def _lm_step(device: torch.device):
    from bench.fairseq_lm import SIZES, build_deq, lm_sample

    torch.manual_seed(0)
    _, vocab, seg, batches, _, _ = SIZES["tiny"]
    batch = batches[device.type == "cuda"]
    task, cfg, model = build_deq("tiny", ["--task", "language_modeling", "--tokens-per-sample", str(seg), "--cpu"])
    model = model.to(device).train()
    criterion = task.build_criterion(cfg.criterion)

    def step(module, call, n):
        module.set_num_updates(n)
        loss, _, _ = criterion(call, lm_sample(batch, seg, vocab, n, device))
        loss.backward()

    return model, (lambda m: m.decoder.deq), step


_MODELS = {"mdeq": ("mdeq_tiny_cifar, batch 16 x 32x32", _mdeq_step),
           "lm": ("deq_transformer_lm_tiny, batch x 64 tokens", _lm_step)}


def measure(key: str, device: torch.device, backend: str, steps: int) -> Dict[str, float]:
    """Median seconds per training step of each variant of model ``key``."""
    model, layer_of, step = _MODELS[key][1](device)
    variants = _variants(model, backend)
    optims = {name: torch.optim.SGD(module.parameters(), lr=1e-3) for name, (module, _, _) in variants.items()}
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for n in range(steps + 2):
        for name, (module, call, changes) in variants.items():
            with layer_of(module).overridden(**changes):
                sync(device)
                t0 = time.perf_counter()
                step(module, call, n)
                optims[name].step()
                optims[name].zero_grad()
                sync(device)
            if n >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> None:
    parser = add_device_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", choices=sorted(_MODELS), default=sorted(_MODELS))
    args = parser.parse_args(argv)
    device = device_from(args)
    print(f"{describe(device)}, backend {args.backend}")
    print("| model | " + " | ".join(VARIANTS) + " |")
    print("|---" * (len(VARIANTS) + 1) + "|")
    for key in args.models:
        t = measure(key, device, args.backend, args.steps)
        base = t["eager"]
        print(f"| {_MODELS[key][0]} | " + " | ".join(f"{t[v] / base:.2f}x ({t[v] * 1e3:.0f} ms)" for v in VARIANTS)
              + " |", flush=True)


if __name__ == "__main__":
    main()
