"""The vision experiments: an MDEQ trained by every method of :mod:`.arms` with the same budget, its
solver stability over training, its accuracy when the forward solver is hard-stopped and the
memory its training step saves for backward."""
from __future__ import annotations

import json
import shutil
import warnings
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from timm_deq import train as timm_train
from timm_deq import validate as timm_validate
from timm_deq.task import deq_layers

from bench._memory import saved_activation_bytes

from ._jobs import log_to, run_jobs
from .arms import ARMS, METHOD_ARMS, VISION_ARMS, slug
from .datasets import package_version, write_images
from .settings import Settings

__all__ = ["probe", "saved_bytes", "run_vision", "run_methods"]

MODEL = "mdeq_tiny_cifar"


def _train_args(s: Settings, data: Path, out: Path, jr: bool, seed: int, epochs: int,
                extra: Sequence[str] = ()) -> List[str]:
    return [
        str(data), "--model", MODEL, "--img-size", str(s.img_size), "--epochs", str(epochs),
        "-b", str(s.batch_size), "-j", "0", "--device", s.device, "--seed", str(seed),
        "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.01", "--sched", "cosine",
        "--warmup-epochs", "1", "--warmup-lr", "2e-4",
        # digits: no flips (a mirrored 2 is not a 2), mild scale/aspect jitter only
        "--hflip", "0", "--scale", "0.8", "1", "--ratio", "0.9", "1.1", "--color-jitter", "0", "--smoothing", "0",
        "--f-max-iter", str(s.f_max_iter), "--b-max-iter", str(s.b_max_iter),
        "--jac-weight", str(s.jac_weight if jr else 0.0), "--jac-freq", str(s.jac_freq),
        "--output", str(out), "--experiment", "train", "--checkpoint-hist", "1", "--log-interval", "1000",
        *extra,
    ]


def probe(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, max_iter: int) -> Dict[str, float]:
    """Solver stability of ``model``'s equilibrium layer on a fixed batch, in eval mode: forward
    and backward steps the standard solves (the implicit backward from a zero start, whatever
    the model trains with) need to reach the layer's tolerances (at most ``max_iter``), the residuals
    reached, ``||J_f(z*)||_F^2 / d`` and the spectral radius of ``J_f(z*)``."""
    (layer,) = deq_layers(model)
    was_training = model.training
    captured: Dict[str, Any] = {}

    def keep_inputs(module, args, kwargs, output):
        captured.update(args=tuple(a.detach() if torch.is_tensor(a) else a for a in args), kwargs=kwargs)

    handle = layer.register_forward_hook(keep_inputs, with_kwargs=True)
    model.eval()
    try:
        # The steps the standard solves need, whatever backward the model trains with (the
        # override leaves the trained mode's options unused: their warning says nothing here).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"backward='implicit' does not use")
            with layer.overridden(backward="implicit", eval_max_iter=max_iter, eval_tol=None, b_max_iter=max_iter,
                                  b_init="zero", b_refine_steps=None), torch.enable_grad():
                loss = F.cross_entropy(model(images), targets)
                params = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(loss, params, allow_unused=True)  # runs the implicit backward solve
                stats = layer.stats.to_dict()
                jac = layer.jacobian_frobenius(*captured["args"], **captured["kwargs"])
                rho = layer.spectral_radius(*captured["args"], **captured["kwargs"], n_iter=20)
    finally:
        handle.remove()
        model.train(was_training)
    return dict(f_steps=stats["f_steps"], f_rel_res=stats["f_rel_res"], f_converged=stats["f_converged"],
                b_steps=stats["b_steps"], b_rel_res=stats["b_rel_res"], b_converged=stats["b_converged"],
                jac_fro=float(jac.mean()), spectral_radius=float(rho.mean()))


def saved_bytes(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes the training step of ``model`` on ``images`` saves for backward (distinct storages,
    parameters left out), in training mode with the JR term computed when the model uses it."""
    (layer,) = deq_layers(model)
    was_training = model.training
    model.train()
    jr = {"jac_freq": 1.0} if layer.config.jac_weight > 0 else {}
    try:
        with layer.overridden(**jr), torch.enable_grad():
            _, nbytes = saved_activation_bytes(lambda: F.cross_entropy(model(images), targets),
                                               exclude=list(model.parameters()))
    finally:
        model.train(was_training)
    return nbytes


def _probe_batch(loader, n: int, device: torch.device):
    images, targets = [], []
    for x, y in loader:
        images.append(x)
        targets.append(y)
        if sum(len(t) for t in targets) >= n:
            break
    return torch.cat(images)[:n].to(device), torch.cat(targets)[:n].to(device)


def train_one(s: Settings, data: Path, work: Path, arm: str, seed: int, epochs: Optional[int] = None,
              stability: bool = True) -> Dict[str, Any]:
    """Train one model with the method ``arm`` (of :data:`.arms.ARMS`) for ``epochs`` (default: the
    settings') through ``timm_deq.train`` (the CLI's code path), then measure its training step's
    saved bytes. With ``stability`` the model is probed at initialization and after every epoch
    and its last checkpoint evaluated at the hard-stop limits through ``timm_deq.validate``;
    without, it is probed once, after the last epoch. Returns the run's record (also written to
    ``result.json`` in its folder)."""
    method = ARMS[arm]
    epochs = s.epochs if epochs is None else epochs
    name = f"{slug(arm)}_seed{seed}"
    out = work / name
    with log_to(out / "log.txt"):
        run = timm_train.setup(_train_args(s, data, out, method.jr, seed, epochs,
                                           [*method.train_flags, *method.model_flags]))
        images, targets = _probe_batch(run.loader_eval, s.probe_images, run.device)
        model = run.task.get_trainable_module()
        records = [dict(epoch=0, **probe(model, images, targets, s.probe_max_iter))] if stability else []
        clock = [time.perf_counter(), 0.0]

        def on_epoch_end(run, epoch, train_metrics, eval_metrics):
            clock[1] += time.perf_counter() - clock[0]  # training + evaluation time, probes left out
            record = dict(epoch=epoch + 1, seconds=clock[1], top1=eval_metrics["top1"],
                          eval_f_steps=eval_metrics.get("f_steps"), eval_f_rel_res=eval_metrics.get("f_rel_res"),
                          **{f"train_{k}": v for k, v in train_metrics.items()})
            if stability or epoch + 1 == epochs:
                record.update(probe(model, images, targets, s.probe_max_iter))
            records.append(record)
            clock[0] = time.perf_counter()

        timm_train.train(run, on_epoch_end)
        memory = saved_bytes(model, images[:s.batch_size], targets[:s.batch_size])
        hard_stop = []
        if stability:
            hard_stop = timm_validate.main([
                str(data), "--model", MODEL, "--img-size", str(s.img_size),
                "--checkpoint", str(Path(run.output_dir) / "last.pth.tar"), "-b", "256", "-j", "0",
                "--device", s.device, *method.model_flags, "--eval-max-iter", *map(str, s.hard_stop_limits)])
    result = dict(name=name, arm=arm, jr=method.jr, seed=seed, config=deq_layers(model)[0].config.to_dict(),
                  epochs=records, saved_bytes=memory,
                  hard_stop=[{k: r[k] for k in ("f_limit", "top1", "f_steps", "f_rel_res")} for r in hard_stop])
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _run_arms(s: Settings, work: Path, arms: Sequence[str], what: str, epochs: int, stability: bool) -> Dict[str, Any]:
    data = work / f"{s.dataset}_{s.img_size}px"
    shutil.rmtree(data, ignore_errors=True)  # always written for these settings (it takes seconds)
    counts = write_images(s.dataset, data, s.img_size, limit=s.digits_limit)
    # the arms of a seed next to each other, so that the runs compared side by side share the machine alike
    jobs = [(s, data, work, arm, seed, epochs, stability) for seed in range(s.seeds) for arm in arms]
    runs = run_jobs(train_one, jobs, s.jobs if s.device == "cpu" else 1, what)
    return dict(model=MODEL, dataset=s.dataset, package=package_version(s.dataset), images=counts, epochs=epochs,
                arms=list(arms), runs=runs)


def run_vision(s: Settings, work: Path, arms: Sequence[str] = VISION_ARMS) -> Dict[str, Any]:
    """The stability experiment: the implicit model without and with JR and the reversible mode,
    every seed, for the settings' ``epochs``, probed after every epoch, with the hard-stop table."""
    return _run_arms(s, work, arms, "vision runs", s.epochs, stability=True)


def run_methods(s: Settings, work: Path, arms: Sequence[str] = METHOD_ARMS) -> Dict[str, Any]:
    """The methods experiment: every other training method beside the implicit reference, every
    seed, for the settings' ``methods_epochs``, probed once after training (no hard-stop table)."""
    return _run_arms(s, work, arms, "method runs", s.methods_epochs, stability=False)
