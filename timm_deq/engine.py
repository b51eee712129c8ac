"""One training epoch and one evaluation pass, on timm's components, with solver statistics."""
import logging
import time
from collections import OrderedDict
from contextlib import nullcontext
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from timm.task import evaluation_sample_limit
from timm.task.evaluator import ClassificationEvaluator
from timm.utils import AverageMeter, dispatch_clip_grad

from deq_core import DEQStatsMeter

from .task import DEQClassificationTask, deq_layers, set_deq_step

_logger = logging.getLogger('train')

__all__ = ['train_one_epoch', 'evaluate']


def _reduced(meter: DEQStatsMeter, distributed: bool) -> Dict[str, float]:
    state = meter.state()
    if state is not None and distributed:
        state = state.clone()
        dist.all_reduce(state)
    return meter.summary(state)


def _mean_over_ranks(values: Sequence[Union[torch.Tensor, float]], distributed: bool) -> List[float]:
    """The mean of each scalar over all processes (itself when not distributed), one all-reduce."""
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in values])
    if distributed:
        dist.all_reduce(vec)
        vec /= dist.get_world_size()
    return vec.tolist()


def train_one_epoch(
        epoch: int,
        task: DEQClassificationTask,
        loader,
        optimizer: torch.optim.Optimizer,
        args,
        device: torch.device,
        num_updates: int,
        lr_scheduler=None,
        amp_autocast: Callable = nullcontext,
        loss_scaler=None,
        mixup_fn=None,
        deq_step_offset: int = 0,
) -> Tuple[Dict[str, float], int]:
    """Train for one epoch; returns the epoch's metrics and the new update count.

    Before each step every equilibrium layer (and its EMA copy) is told the update count plus
    ``deq_step_offset`` (the count the loaded weights carry), which drives the pretraining
    switch, the JR schedule and the per-step random decisions. In a
    distributed run the logged losses and solver statistics are means over all processes, and
    only the primary process logs.
    """
    distributed = getattr(args, 'distributed', False)
    primary = not distributed or dist.get_rank() == 0
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    task.train()
    model = task.get_trainable_module()
    ema = task.get_trainable_module(ema=True)
    ema_module = getattr(ema, 'module', None)
    accum = args.grad_accum_steps
    losses, task_losses = AverageMeter(), AverageMeter()
    deq_meter = DEQStatsMeter()
    batch_time = AverageMeter()
    last_idx = len(loader) - 1
    updates_per_epoch = (len(loader) + accum - 1) // accum
    end = time.time()
    skipped_in_a_row = 0
    optimizer.zero_grad()
    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == last_idx
        need_update = last_batch or (batch_idx + 1) % accum == 0
        set_deq_step(model, deq_step_offset + num_updates, epoch)
        set_deq_step(ema_module, deq_step_offset + num_updates, epoch)
        input, target = input.to(device), target.to(device)
        if mixup_fn is not None:
            input, target = mixup_fn(input, target)
        sync_ctx = nullcontext() if need_update else task.no_sync()
        with sync_ctx:
            with amp_autocast():
                result = task(input, target)
                loss = result['loss'] / accum
            params = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=params, need_update=need_update)
            else:
                loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
                    if _finite_gradients(optimizer):
                        optimizer.step()
                        _check_weights(optimizer, epoch, batch_idx // accum)
                        skipped_in_a_row = 0
                    else:
                        skipped_in_a_row += 1
                        _skip_update(epoch, batch_idx // accum, skipped_in_a_row, primary)
        for stats in result['deq_stats']:
            deq_meter.update(stats)  # after backward: the backward solve is recorded too
        losses.update(result['loss'].detach(), input.size(0))
        task_losses.update(result['task_loss'].detach(), input.size(0))
        if not need_update:
            continue
        optimizer.zero_grad()
        num_updates += 1
        task.update_ema(step=num_updates)
        batch_time.update(time.time() - end)
        end = time.time()
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses.avg)
        update_idx = batch_idx // accum
        if last_batch or update_idx % args.log_interval == 0:
            lr = optimizer.param_groups[0]['lr']
            deq = _reduced(deq_meter, distributed)
            loss_val, loss_avg = _mean_over_ranks([losses.val, losses.avg], distributed)
            if primary:
                _logger.info(
                    f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                    f'({100. * update_idx / max(updates_per_epoch - 1, 1):>3.0f}%)]  '
                    f'Loss: {loss_val:#.3g} ({loss_avg:#.3g})  '
                    f'NFE fwd/bwd: {deq.get("f_steps", 0):.1f}/{deq.get("b_steps", 0):.1f}  '
                    f'stalled fwd/bwd: {deq.get("f_stalled", 0):.0%}/{deq.get("b_stalled", 0):.0%}  '
                    f'JR: {deq.get("jac_frobenius", float("nan")):#.3g}  '
                    f'Time: {batch_time.val:.3f}s  LR: {lr:.3e}')
    loss_avg, task_loss_avg = _mean_over_ranks([losses.avg, task_losses.avg], distributed)
    metrics = OrderedDict(loss=loss_avg, task_loss=task_loss_avg)
    metrics.update(_reduced(deq_meter, distributed))
    return metrics, num_updates


# Updates in a row with non-finite gradients after which training stops instead of skipping on.
MAX_SKIPPED_UPDATES = 10


def _all_finite(tensors: List[torch.Tensor]) -> bool:
    return not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one host read per update;
    without a loss scaler nothing else checks, and an optimizer step with a NaN gradient
    destroys the weights)."""
    return _all_finite([p.grad for group in optimizer.param_groups for p in group['params'] if p.grad is not None])


def _check_weights(optimizer: torch.optim.Optimizer, epoch: int, update: int) -> None:
    """Stop, naming the update, when a step with finite gradients made a float16 weight
    non-finite (an Adam-family optimizer's eps rounds to 0 there; checked for float16 weights
    only); the last checkpoint on disk is from before it."""
    params = [p for group in optimizer.param_groups for p in group['params']]
    if any(p.dtype == torch.float16 for p in params) and not _all_finite(params):
        raise RuntimeError(
            f'stopping: the update of epoch {epoch}, update {update} made weights non-finite although its gradients '
            'were finite (with float16 weights an Adam-family optimizer\'s eps rounds to 0). The last checkpoint '
            'is from before it. Train in bfloat16 (--model-dtype bfloat16), with float32 weights under --amp, '
            'or with --opt sgd')


def _skip_update(epoch: int, update: int, in_a_row: int, primary: bool) -> None:
    """Report an update skipped for its non-finite gradients; stop after MAX_SKIPPED_UPDATES in a row."""
    if in_a_row >= MAX_SKIPPED_UPDATES:
        raise RuntimeError(
            f'stopping: {in_a_row} updates in a row had non-finite gradients (epoch {epoch}, update {update}), and '
            'none was applied, so the weights and the last checkpoint are intact. A float16 model overflows '
            'in the backward of its norms: train in bfloat16 (--model-dtype bfloat16) or with float32 weights '
            'under --amp, or lower --lr')
    if primary:
        _logger.warning(f'Train: {epoch} update {update}: non-finite gradients, update skipped '
                        f'({in_a_row} in a row; training stops at {MAX_SKIPPED_UPDATES})')


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        amp_autocast: Callable = nullcontext,
        distributed: bool = False,
        log_interval: int = 50,
        log_suffix: str = '',
) -> Dict[str, float]:
    """Loss, top-1/top-5 (timm's evaluator) and mean forward solver statistics (over all
    processes when ``distributed``; only the primary process logs)."""
    primary = not distributed or dist.get_rank() == 0
    model.eval()
    evaluator = ClassificationEvaluator(device=device, max_samples=evaluation_sample_limit(loader))
    deq_meter = DEQStatsMeter()
    last_idx = len(loader) - 1
    for batch_idx, (input, target) in enumerate(loader):
        input, target = input.to(device), target.to(device)
        with amp_autocast():
            output = model(input)
        evaluator.update(output, target)
        for layer in deq_layers(model):
            if layer.stats is not None:
                deq_meter.update(layer.stats)
        if (batch_idx == last_idx or batch_idx % log_interval == 0) and primary:
            running = evaluator.summary()
            _logger.info(f'Test{log_suffix}: [{batch_idx:>4d}/{last_idx}]  Loss: {running["loss"]:#.4g}  '
                         f'Acc@1: {running["top1"]:>7.3f}  Acc@5: {running["top5"]:>7.3f}')
    metrics = evaluator.compute(distributed=distributed)
    metrics.update({k: v for k, v in _reduced(deq_meter, distributed).items() if k.startswith('f_')})
    return metrics
