"""Train an MDEQ (or any timm model holding deep equilibrium layers) with timm's pipeline and JR.

    python -m timm_deq.train DATA_DIR --model mdeq_small --epochs 100 --jac-weight 2.5 ...
    torchrun --nproc_per_node 4 -m timm_deq.train DATA_DIR ...

Flags follow timm's ``train.py`` names wherever timm has the flag (data, augmentation, optimizer,
scheduler, EMA, AMP, checkpoints); the equilibrium-layer flags are those of ``deq_core.DEQConfig``
(``--f-max-iter``, ``--jac-weight``, ``--pretrain-steps``, ...) and override the model's defaults.
``--torchcompile [BACKEND]`` compiles f inside the equilibrium layers (``compile_f``); with
``--torchcompile-scope model`` the whole model is compiled as well, as timm's own flag does (the
layer is one explicit graph break in it). On a 2-core CPU both measure within noise of eager and
the f-only scope was the faster (``python -m bench.compile``), hence the default.
"""
import argparse
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch

from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import create_model, safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm import utils

from deq_core import DEQConfig, add_deq_args

from .engine import evaluate, train_one_epoch
from .task import DEQClassificationTask, deq_layers, set_deq_step

_logger = logging.getLogger('train')

__all__ = ['build_parser', 'setup', 'train', 'main', 'Training', 'check_compilable', 'check_sync_bn']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Train a deep equilibrium model with timm and JR')
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>"), default ImageFolder/ImageTar')
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    group.add_argument('--input-img-mode', default=None, type=str)

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='mdeq_tiny_cifar', type=str, metavar='MODEL')
    group.add_argument('--pretrained', action='store_true', default=False)
    group.add_argument('--resume', default='', type=str, metavar='PATH', help='resume full training state')
    group.add_argument('--no-resume-opt', action='store_true', default=False)
    group.add_argument('--num-classes', type=int, default=None, metavar='N')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type')
    group.add_argument('--img-size', type=int, default=None, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                       help='compile f of the equilibrium layers with this torch.compile backend (default: '
                            'inductor) for the solver\'s no-grad evaluations; the differentiable call of f (JR '
                            'needs double backward) stays eager')
    group.add_argument('--torchcompile-scope', default='f', choices=('f', 'model'),
                       help='with --torchcompile: f only (default), or the whole model too, as timm\'s own '
                            'flag does (each equilibrium layer is one graph break)')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode of the whole model (--torchcompile-scope model)')

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    group.add_argument('--clip-mode', type=str, default='norm', help='"norm", "value" or "agc"')
    group.add_argument('--layer-decay', type=float, default=None)
    group.add_argument('--opt-kwargs', dest='opt_args', nargs='*', default=None, action=utils.ParseKwargs)

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action='store_true', default=False)
    group.add_argument('--lr', type=float, default=0.05, metavar='LR')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR')
    group.add_argument('--epochs', type=int, default=100, metavar='N')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=0, metavar='N')
    group.add_argument('--warmup-prefix', action='store_true', default=False)
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False)
    group.add_argument('--train-crop-mode', type=str, default=None)
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=str, default=None, metavar='NAME', help='e.g. "rand-m9-mstd0.5"')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--mixup', type=float, default=0.0)
    group.add_argument('--cutmix', type=float, default=0.0)
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N')
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--train-interpolation', type=str, default='random')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='classifier dropout rate')
    group.add_argument('--sync-bn', action='store_true', default=False)
    group.add_argument('--dist-bn', type=str, default='reduce', help='"broadcast", "reduce" or ""')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S')
    group.add_argument('--log-interval', type=int, default=50, metavar='N')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    group.add_argument('--amp', action='store_true', default=False)
    group.add_argument('--amp-dtype', default='float16', type=str, help='float16 or bfloat16')
    group.add_argument('--pin-mem', action='store_true', default=False)
    group.add_argument('--output', default='', type=str, metavar='PATH')
    group.add_argument('--experiment', default='', type=str, metavar='NAME')
    group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC')
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str)

    # Only explicit DEQ flags override the model's defaults; the layer's seed (its per-step random
    # decisions, identical on every process) is the training --seed, and compilation is timm's
    # --torchcompile flag.
    add_deq_args(parser, suppress_defaults=True, exclude=('seed', 'compile_f', 'compile_backend'))
    return parser


def _deq_overrides(args: argparse.Namespace) -> dict:
    overrides = {name: getattr(args, name) for name in DEQConfig.field_names() if hasattr(args, name)}
    overrides['seed'] = args.seed
    if args.torchcompile:
        try:
            DEQConfig(compile_f=True, compile_backend=args.torchcompile)
        except ValueError as err:
            raise ValueError(f'--torchcompile: {err}') from None
        overrides.update(compile_f=True, compile_backend=args.torchcompile)
    return overrides


def check_compilable(model: torch.nn.Module, backend: Optional[str]) -> None:
    """``--torchcompile`` compiles the f of the model's equilibrium layers; refuse a model with none."""
    if backend and not deq_layers(model):
        raise SystemExit(f'error: --torchcompile {backend} compiles the function f of the equilibrium layers, '
                         f'and {type(model).__name__} has no DEQLayer; train it without --torchcompile '
                         '(or with timm\'s own train.py)')


def check_sync_bn(args: argparse.Namespace, device: torch.device) -> None:
    """``--sync-bn`` in a distributed run needs CUDA: torch's SyncBatchNorm has no CPU kernel."""
    if args.sync_bn and args.distributed and device.type != 'cuda':
        raise SystemExit(f'error: --sync-bn needs CUDA devices (torch\'s SyncBatchNorm has no {device.type} '
                         'implementation); train without it on this device')


def _amp(args, device: torch.device) -> Tuple[object, Optional[utils.NativeScaler]]:
    if not args.amp:
        return nullcontext, None
    if args.amp_dtype not in ('float16', 'bfloat16'):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {args.amp_dtype!r}")
    dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    scaler = utils.NativeScaler(device=device.type) if dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


@dataclass
class Training:
    """Everything a run needs, built from the arguments (and a checkpoint when resuming)."""

    args: argparse.Namespace
    device: torch.device
    task: DEQClassificationTask
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader_train: object
    loader_eval: object
    mixup_fn: Optional[Mixup]
    amp_autocast: object
    loss_scaler: Optional[utils.NativeScaler]
    start_epoch: int
    num_epochs: int
    num_updates: int
    output_dir: Optional[str] = None
    saver: Optional[utils.CheckpointSaver] = None


def setup(argv: Optional[List[str]] = None) -> Training:
    """Parse arguments and build model, task, optimizer, scheduler, EMA, loaders and checkpoint
    saver, restoring a checkpoint when ``--resume`` is given."""
    args = build_parser().parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise SystemExit('error: a dataset directory is required (positional DIR or --data-dir)')
    if args.grad_accum_steps < 1:
        raise SystemExit(f'error: --grad-accum-steps must be >= 1, got {args.grad_accum_steps}')
    device = utils.init_distributed_device(args)
    check_sync_bn(args, device)
    primary = utils.is_primary(args)
    utils.random_seed(args.seed, args.rank)
    amp_autocast, loss_scaler = _amp(args, device)

    factory_kwargs = {}
    if args.in_chans is not None:
        factory_kwargs['in_chans'] = args.in_chans
    model = create_model(
        args.model, pretrained=args.pretrained, num_classes=args.num_classes, drop_rate=args.drop,
        global_pool=args.gp, **factory_kwargs, **_deq_overrides(args), **args.model_kwargs)
    check_compilable(model, args.torchcompile)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    model.to(device)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, '
                     f'param count: {sum(p.numel() for p in model.parameters())}')

    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    task = DEQClassificationTask(model, criterion_kwargs=dict(
        smoothing=0. if mixup_active else args.smoothing, soft_targets=mixup_active), device=device,
        verbose=primary)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else None)

    resume_epoch = None
    if args.resume:
        resume_epoch = resume_task_checkpoint(task, args.resume, optimizer=None if args.no_resume_opt else optimizer,
                                              loss_scaler=None if args.no_resume_opt else loss_scaler,
                                              log_info=primary)
        if args.model_ema:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile and args.torchcompile_scope == 'model':
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None)

    dataset_train = create_dataset(
        args.dataset, root=args.data_dir, split=args.train_split, is_training=True, class_map=args.class_map,
        batch_size=args.batch_size, seed=args.seed, input_img_mode=args.input_img_mode)
    dataset_eval = create_dataset(
        args.dataset, root=args.data_dir, split=args.val_split, is_training=False, class_map=args.class_map,
        batch_size=args.validation_batch_size or args.batch_size, input_img_mode=args.input_img_mode)
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
    prefetch = device.type == 'cuda'
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=prefetch)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=prefetch)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                   updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    num_updates = start_epoch * updates_per_epoch
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates)
        else:
            lr_scheduler.step(start_epoch)
    set_deq_step(task.get_trainable_module(), num_updates, start_epoch)
    ema = task.get_trainable_module(ema=True)
    set_deq_step(getattr(ema, 'module', None), num_updates, start_epoch)

    run = Training(args=args, device=device, task=task, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   loader_train=loader_train, loader_eval=loader_eval, mixup_fn=mixup_fn,
                   amp_autocast=amp_autocast, loss_scaler=loss_scaler, start_epoch=start_epoch,
                   num_epochs=num_epochs, num_updates=num_updates)
    if primary:
        exp_name = args.experiment or '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'),
                                                 safe_model_name(args.model), str(data_config['input_size'][-1])])
        run.output_dir = utils.get_outdir(args.output or './output/train', exp_name, inc=not args.experiment)
        run.saver = utils.CheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=ema, amp_scaler=loss_scaler,
            checkpoint_dir=run.output_dir, recovery_dir=run.output_dir, decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, task=task)
        if args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(run.output_dir):
            run.saver.load_state_dict_from_checkpoint(args.resume)
        _logger.info(f'Scheduled epochs: {num_epochs}; {updates_per_epoch} updates per epoch; '
                     f'output in {run.output_dir}')
    return run


EpochCallback = Callable[[Training, int, Dict[str, float], Dict[str, float]], None]


def train(run: Training, on_epoch_end: Optional[EpochCallback] = None) -> Dict[str, float]:
    """Train from ``run.start_epoch`` to ``run.num_epochs``; returns the last eval metrics.

    ``on_epoch_end(run, epoch, train_metrics, eval_metrics)``, when given, is called on every
    process after each epoch's evaluation and checkpoint (for extra diagnostics or logging).
    """
    args, task = run.args, run.task
    primary = utils.is_primary(args)
    eval_metrics: Dict[str, float] = {}
    for epoch in range(run.start_epoch, run.num_epochs):
        if args.distributed and hasattr(run.loader_train.sampler, 'set_epoch'):
            run.loader_train.sampler.set_epoch(epoch)
        train_metrics, run.num_updates = train_one_epoch(
            epoch, task, run.loader_train, run.optimizer, args, run.device, run.num_updates,
            lr_scheduler=run.lr_scheduler, amp_autocast=run.amp_autocast, loss_scaler=run.loss_scaler,
            mixup_fn=run.mixup_fn)
        if args.distributed and args.dist_bn in ('broadcast', 'reduce'):
            utils.distribute_bn(task.get_trainable_module(), args.world_size, args.dist_bn == 'reduce')
        eval_metrics = evaluate(task.get_eval_model(), run.loader_eval, run.device, run.amp_autocast,
                                distributed=args.distributed, log_interval=args.log_interval)
        if task.has_ema():
            eval_metrics = evaluate(task.get_eval_model(ema=True), run.loader_eval, run.device, run.amp_autocast,
                                    distributed=args.distributed, log_interval=args.log_interval,
                                    log_suffix=' (EMA)')
        if primary:
            _logger.info(f'Epoch {epoch}: ' + ', '.join(f'train_{k} {v:.4g}' for k, v in train_metrics.items())
                         + ' | ' + ', '.join(f'eval_{k} {v:.4g}' for k, v in eval_metrics.items()))
            utils.update_summary(epoch, train_metrics, eval_metrics,
                                 filename=os.path.join(run.output_dir, 'summary.csv'),
                                 lr=run.optimizer.param_groups[0]['lr'])
            run.saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
        if on_epoch_end is not None:
            on_epoch_end(run, epoch, train_metrics, eval_metrics)
        run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    return eval_metrics


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """Set up and train; returns the last eval metrics and the run's ``output_dir``."""
    run = setup(argv)
    return dict(train(run), output_dir=run.output_dir)


def cli() -> None:
    """Console entry point: timm's logging set-up, then :func:`main` on ``sys.argv``."""
    utils.setup_default_logging()
    main()


if __name__ == '__main__':
    cli()
