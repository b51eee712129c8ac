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

As timm's script: ``-c/--config FILE`` reads flag defaults from YAML (the command line overrides
them) and each run writes its arguments to ``args.yaml`` in its output folder, which ``-c`` reads
back; ``--lr`` unset means ``--lr-base`` scaled by the global batch size; ``--initial-checkpoint``,
``--channels-last``, ``--model-dtype``, ``--no-prefetcher``, ``--grad-checkpointing`` and
``--log-wandb`` mean what they mean there. ``--help`` shows every default, and the DEQ values of
the chosen ``--model``. Arguments the run cannot use stop it with an argparse error naming the flag.
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

from timm.data import Mixup, create_loader, resolve_data_config
from timm.layers import convert_sync_batchnorm
from timm.models import safe_model_name
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm import utils

from deq_core import DEQConfig, add_deq_args

from . import _cli
from .engine import evaluate, train_one_epoch
from .models import MDEQ
from .task import DEQClassificationTask, deq_layers, set_deq_step

_logger = logging.getLogger('train')

__all__ = ['build_parser', 'setup', 'train', 'main', 'Training', 'check_compilable', 'check_sync_bn']


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`setup`: timm's ``train.py`` flags that apply to these models, the
    ``DEQConfig`` flags, ``-c/--config`` (YAML defaults) and help that shows every default.

    Returns:
        the parser (it reads ``-c FILE`` defaults before the command line, as timm's ``train.py``).
    """
    parser = _cli.Parser(
        description='Train a deep equilibrium model with timm and Jacobian regularization',
        epilog=_cli.DEQ_FLAGS_EPILOG)
    group = parser.add_argument_group('Dataset parameters')
    group.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional)')
    group.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='dataset type + name ("<type>/<name>"); empty: ImageFolder/ImageTar')
    group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split')
    group.add_argument('--val-split', metavar='NAME', default='validation', help='dataset validation split')
    group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                       help='path to a class to index mapping file')
    group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode')
    group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                       help='manually specify the number of training samples (iterable datasets)')
    group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                       help='manually specify the number of validation samples (iterable datasets)')

    group = parser.add_argument_group('Model parameters')
    group.add_argument('--model', default='mdeq_tiny_cifar', type=str, metavar='MODEL', help='name of the model')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help='start from the pretrained weights of the model (if published)')
    group.add_argument('--pretrained-path', default=None, type=str, metavar='PATH',
                       help='start from these pretrained weights (a timm_deq.train checkpoint or a state dict, '
                            "the original MDEQ-Vision layout with a '.locuslab_in1k' model), adapting the "
                            'classifier to --num-classes, as timm\'s train.py')
    group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                       help='load these weights into the model before training (EMA weights if the file has '
                            'them); optimizer and schedule start afresh, unlike --resume')
    group.add_argument('--resume', default='', type=str, metavar='PATH', help='resume full training state')
    group.add_argument('--restart-deq-schedule', action='store_true', default=False,
                       help="start the equilibrium layers' step count at 0 (pretraining and the JR schedule "
                            'again from their start) instead of continuing from the count of the loaded weights')
    group.add_argument('--no-resume-opt', action='store_true', default=False,
                       help='with --resume, do not restore the optimizer and loss-scaler state')
    _cli.add_model_input_args(group)
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='training batch size per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                       help='validation batch size (None: --batch-size)')
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='batches whose gradients are accumulated per optimizer step')
    group.add_argument('--grad-checkpointing', action='store_true', default=False,
                       help='timm\'s gradient checkpointing; the equilibrium layers are never checkpointed (their '
                            'implicit backward stores no per-iteration activations), so MDEQ models warn and train '
                            'as without it')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs, metavar='KEY=VALUE',
                       help='extra keyword arguments of the model (not options that have a flag)')
    group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                       help='compile f of the equilibrium layers with this torch.compile backend (inductor when '
                            'given without one) for the solver\'s no-grad evaluations; the differentiable call of '
                            'f (JR needs double backward) stays eager')
    group.add_argument('--torchcompile-scope', default='f', choices=('f', 'model'),
                       help='with --torchcompile: f only, or the whole model too, as timm\'s own flag does (each '
                            'equilibrium layer is one graph break)')
    group.add_argument('--torchcompile-mode', type=str, default=None,
                       help='torch.compile mode of the whole model (--torchcompile-scope model)')

    group = parser.add_argument_group('Device and precision parameters')
    _cli.add_precision_args(group)

    group = parser.add_argument_group('Optimizer parameters')
    group.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER', help='timm optimizer name')
    group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON',
                       help='optimizer epsilon (None: the optimizer\'s)')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA',
                       help='optimizer betas (None: the optimizer\'s)')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum')
    group.add_argument('--weight-decay', type=float, default=2e-5, help='weight decay')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                       help='clip gradients at this norm or value (None: no clipping)')
    group.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'),
                       help='gradient clipping mode')
    group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay')
    group.add_argument('--opt-kwargs', dest='opt_args', nargs='*', default=None, action=utils.ParseKwargs,
                       metavar='KEY=VALUE', help='extra keyword arguments of the optimizer')

    group = parser.add_argument_group('Learning rate schedule parameters')
    group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='timm LR scheduler name')
    group.add_argument('--sched-on-updates', action='store_true', default=False,
                       help='step the LR scheduler on each optimizer update instead of each epoch')
    group.add_argument('--lr', type=float, default=None, metavar='LR',
                       help='learning rate; unset (or 0): computed from --lr-base and the global batch size')
    group.add_argument('--lr-base', type=float, default=0.1, metavar='LR',
                       help='base learning rate: lr = lr_base * (global batch / lr_base_size), or its square root '
                            'of the ratio with sqrt scaling; the global batch is --batch-size x processes x '
                            '--grad-accum-steps')
    group.add_argument('--lr-base-size', type=int, default=256, metavar='DIV',
                       help='batch size of --lr-base (the divisor)')
    group.add_argument('--lr-base-scale', type=str, default='', choices=('', 'linear', 'sqrt'), metavar='SCALE',
                       help='scaling of --lr-base with the batch size: linear, sqrt, or empty: sqrt for ada* and '
                            'lamb optimizers, linear for the others')
    group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate')
    group.add_argument('--min-lr', type=float, default=0, metavar='LR',
                       help='lower learning rate bound of cyclic schedulers')
    group.add_argument('--epochs', type=int, default=100, metavar='N', help='number of epochs to train')
    group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                       help='epoch to start at (None: 0, or the epoch after the --resume checkpoint)')
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                       help='epochs of the multistep LR decays')
    group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval of LR decay')
    group.add_argument('--warmup-epochs', type=int, default=0, metavar='N', help='epochs of LR warmup')
    group.add_argument('--warmup-prefix', action='store_true', default=False,
                       help='exclude the warmup epochs from the decay schedule')
    group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                       help='epochs at --min-lr after the cyclic schedule ends')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                       help='epochs without improvement before the plateau scheduler lowers the LR')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                       help='learning rate noise on/off epoch percentages')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT',
                       help='learning rate noise limit percent')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV',
                       help='learning rate noise standard deviation')
    group.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT',
                       help='learning rate cycle length multiplier')
    group.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT',
                       help='amount to decay each learning rate cycle')
    group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N', help='learning rate cycle limit')
    group.add_argument('--lr-k-decay', type=float, default=1.0, help='learning rate k-decay for cosine/poly')

    group = parser.add_argument_group('Augmentation and regularization parameters')
    group.add_argument('--no-aug', action='store_true', default=False,
                       help='disable all training augmentation (overrides the augmentation flags)')
    group.add_argument('--train-crop-mode', type=str, default=None, help='crop mode of the training images')
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                       help='random resized crop scale range')
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                       help='random resized crop aspect ratio range')
    group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    group.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor')
    group.add_argument('--aa', type=str, default=None, metavar='NAME',
                       help='AutoAugment / RandAugment policy, e.g. "rand-m9-mstd0.5"')
    group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel', help='random erase mode')
    group.add_argument('--recount', type=int, default=1, help='random erase count')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (enabled if > 0)')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (enabled if > 0)')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                       help='cutmix min/max ratio; overrides --cutmix and enables cutmix when set')
    group.add_argument('--mixup-prob', type=float, default=1.0,
                       help='probability of applying mixup or cutmix when either is enabled')
    group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                       help='probability of cutmix instead of mixup when both are enabled')
    group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                       help='how mixup/cutmix parameters are drawn')
    group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                       help='turn mixup off from this epoch on (0: never)')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--bce-loss', action='store_true', default=False,
                       help='binary cross-entropy instead of cross-entropy (the JR term is added all the same)')
    group.add_argument('--bce-sum', action='store_true', default=False,
                       help='with --bce-loss: sum over classes instead of the mean')
    group.add_argument('--bce-target-thresh', type=float, default=None,
                       help='with --bce-loss: binarize the (soft) targets at this threshold')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='with --bce-loss: positive class weight')
    group.add_argument('--aug-repeats', type=float, default=0,
                       help='number of augmentation repetitions (distributed training only; 0: off)')
    group.add_argument('--train-interpolation', type=str, default='random',
                       help='interpolation of the training images')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='classifier dropout rate')
    group.add_argument('--drop-path', type=float, default=None, metavar='PCT',
                       help="stochastic depth rate (refused by MDEQ with the reason: f must be one map at every "
                            "solver step; its variational --dropout is the DEQ's)")
    group.add_argument('--drop-block', type=float, default=None, metavar='PCT',
                       help='DropBlock rate (refused by MDEQ, as --drop-path)')
    group.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum (unset: the model\'s)')
    group.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon (unset: the model\'s)')
    group.add_argument('--sync-bn', action='store_true', default=False,
                       help='synchronized BatchNorm across processes (needs CUDA)')
    group.add_argument('--dist-bn', type=str, default='reduce', choices=('broadcast', 'reduce', ''),
                       help='distribute BatchNorm statistics after each epoch: broadcast, reduce or not ("")')

    group = parser.add_argument_group('Model exponential moving average parameters')
    group.add_argument('--model-ema', action='store_true', default=False,
                       help='keep an exponential moving average of the weights')
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False, help='keep the EMA on the CPU')
    group.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay factor')
    group.add_argument('--model-ema-warmup', action='store_true', default=False, help='warm up the EMA decay')

    group = parser.add_argument_group('Miscellaneous parameters')
    group.add_argument('--seed', type=int, default=42, metavar='S',
                       help='random seed (also the equilibrium layers\' per-step draws)')
    group.add_argument('--log-interval', type=int, default=50, metavar='N', help='optimizer steps between log lines')
    group.add_argument('--checkpoint-hist', type=int, default=10, metavar='N', help='checkpoints to keep')
    group.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='data loader worker processes')
    group.add_argument('--output', default='', type=str, metavar='PATH',
                       help='output folder (empty: ./output/train)')
    group.add_argument('--experiment', default='', type=str, metavar='NAME',
                       help='name of the run\'s subfolder (empty: date, model and image size)')
    group.add_argument('--eval-metric', default='top1', type=str, choices=('top1', 'top5', 'loss'),
                       metavar='EVAL_METRIC', help='metric that chooses the best checkpoint (top1, top5 or loss)')
    group.add_argument('--log-wandb', action='store_true', default=False,
                       help='log the epoch metrics to Weights & Biases (warns and trains without it when wandb '
                            'is not installed, as timm does)')
    group.add_argument('--wandb-project', default=None, type=str, help='wandb project name')
    group.add_argument('--wandb-tags', default=[], type=str, nargs='+', help='wandb tags')

    # Only explicit DEQ flags override the model's defaults; the layer's seed (its per-step random
    # decisions, identical on every process) is the training --seed, and compilation is timm's
    # --torchcompile flag.
    add_deq_args(parser, suppress_defaults=True, exclude=('seed', 'compile_f', 'compile_backend'))
    _cli.note_deq_defaults(parser)
    return parser


def _deq_overrides(args: argparse.Namespace) -> dict:
    return {name: value for name, (_, value) in _deq_flagged(args).items()}


def _deq_flagged(args: argparse.Namespace) -> Dict[str, Tuple[str, object]]:
    """The DEQ options the command line sets, each with the flag that set it."""
    fields = DEQConfig.field_names()
    flagged = {name: ('--' + name.replace('_', '-'), getattr(args, name)) for name in fields if hasattr(args, name)}
    flagged['seed'] = ('--seed', args.seed)
    if args.torchcompile:
        try:
            DEQConfig(compile_f=True, compile_backend=args.torchcompile)
        except ValueError as err:
            raise _cli.UsageError(f'argument --torchcompile: {err}') from None
        flagged.update(compile_f=('--torchcompile', True), compile_backend=('--torchcompile', args.torchcompile))
    return flagged


def _compile_problem(model: torch.nn.Module, backend: Optional[str]) -> Optional[str]:
    if backend and not deq_layers(model):
        return (f'--torchcompile {backend} compiles the function f of the equilibrium layers, and '
                f'{type(model).__name__} has no DEQLayer; train it without --torchcompile (or with timm\'s own '
                'train.py)')
    return None


def _sync_bn_problem(args: argparse.Namespace, device: torch.device) -> Optional[str]:
    if args.sync_bn and args.distributed and device.type != 'cuda':
        return (f'--sync-bn needs CUDA devices (torch\'s SyncBatchNorm has no {device.type} implementation); train '
                'without it on this device')
    return None


def check_compilable(model: torch.nn.Module, backend: Optional[str]) -> None:
    """``--torchcompile`` compiles the f of the model's equilibrium layers; refuse a model with none.

    Args:
        model: the model to train.
        backend: the ``--torchcompile`` backend, or None.

    Raises:
        SystemExit: ``backend`` is given and the model has no equilibrium layer.
    """
    problem = _compile_problem(model, backend)
    if problem:
        raise SystemExit(f'error: {problem}')


def check_sync_bn(args: argparse.Namespace, device: torch.device) -> None:
    """``--sync-bn`` in a distributed run needs CUDA: torch's SyncBatchNorm has no CPU kernel.

    Args:
        args: parsed arguments with ``sync_bn`` and ``distributed``.
        device: the training device.

    Raises:
        SystemExit: ``--sync-bn`` in a distributed run off CUDA.
    """
    problem = _sync_bn_problem(args, device)
    if problem:
        raise SystemExit(f'error: {problem}')


def _amp(amp_dtype: Optional[torch.dtype], device: torch.device) -> Tuple[object, Optional[utils.NativeScaler]]:
    if amp_dtype is None:
        return nullcontext, None
    scaler = utils.NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    return partial(torch.autocast, device_type=device.type, dtype=amp_dtype), scaler


def _scaled_lr(args: argparse.Namespace) -> None:
    """timm's learning rate from ``--lr-base`` when ``--lr`` is unset (or 0): linear or square-root
    scaling of the ratio of the global batch size to ``--lr-base-size``."""
    if args.lr:
        return
    if args.lr_base_size < 1:
        raise _cli.UsageError(f'argument --lr-base-size: must be >= 1, got {args.lr_base_size}')
    global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
    batch_ratio = global_batch_size / args.lr_base_size
    if not args.lr_base_scale:
        name = args.opt.lower()
        args.lr_base_scale = 'sqrt' if any(o in name for o in ('ada', 'lamb')) else 'linear'
    if args.lr_base_scale == 'sqrt':
        batch_ratio = batch_ratio ** 0.5
    args.lr = args.lr_base * batch_ratio
    if utils.is_primary(args):
        _logger.info(f'Learning rate ({args.lr}) calculated from base learning rate ({args.lr_base}) and effective '
                     f'global batch size ({global_batch_size}) with {args.lr_base_scale} scaling.')


def _grad_checkpointing(model: torch.nn.Module, model_name: str, primary: bool) -> None:
    """timm's ``--grad-checkpointing``, with a warning for the parts it cannot reach."""
    if not hasattr(model, 'set_grad_checkpointing'):
        raise _cli.UsageError(f'argument --grad-checkpointing: {model_name} does not support gradient checkpointing '
                              '(no set_grad_checkpointing)')
    model.set_grad_checkpointing(enable=True)
    if not primary or not deq_layers(model):
        return
    if isinstance(model, MDEQ):
        _logger.warning(f'--grad-checkpointing has no effect on {model_name}: MDEQ checkpoints nothing (its '
                        'equilibrium layer\'s implicit backward stores no per-iteration activations, only one '
                        'application of f; pretraining and backward=unrolled keep those of the unrolled steps); '
                        'training proceeds without it')
    else:
        _logger.warning(f'--grad-checkpointing does not reach the equilibrium layers of {model_name} (their implicit '
                        'backward already stores no per-iteration activations); only blocks outside them that '
                        'implement checkpointing are checkpointed')


def _import_wandb():
    try:
        import wandb
    except ImportError:
        return None
    return wandb


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
    deq_step_offset: int = 0
    output_dir: Optional[str] = None
    saver: Optional[utils.CheckpointSaver] = None
    log_wandb: bool = False


def setup(argv: Optional[List[str]] = None) -> Training:
    """Parse arguments and build model, task, optimizer, scheduler, EMA, loaders and checkpoint
    saver, restoring a checkpoint when ``--resume`` is given.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        the run, ready for :func:`train`. On the primary process the parsed arguments are written
        to ``args.yaml`` in the output folder (``-c`` reads it back).

    Raises:
        SystemExit: argparse's errors (exit status 2), including a missing data folder.
        ValueError: a value the run cannot use, naming the flag (the entry point turns it into argparse's usage error);
            :func:`main` reports it as an argparse error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args_text = _cli.args_yaml(args)
    _cli.check_data_dir(parser, args)
    _cli.check_model_input(parser, args)
    _cli.import_device_modules(args)
    if args.grad_accum_steps < 1:
        parser.error(f'argument --grad-accum-steps: must be >= 1, got {args.grad_accum_steps}')
    amp_dtype, model_dtype = _cli.resolve_dtypes(args)
    device = utils.init_distributed_device(args)
    problem = _sync_bn_problem(args, device)
    if problem:
        raise _cli.UsageError(problem)
    primary = utils.is_primary(args)
    if args.aug_repeats and not args.distributed:
        raise _cli.UsageError('argument --aug-repeats: repeated augmentation shares each sample among the processes '
                              'of a distributed run (torchrun), as in timm; this run has one process')
    if model_dtype == torch.float16 and primary:
        _logger.warning('--model-dtype float16 is not recommended for training; bfloat16 is')
    utils.random_seed(args.seed, args.rank)
    amp_autocast, loss_scaler = _amp(amp_dtype, device)

    flagged = {'num_classes': ('--num-classes', args.num_classes), 'drop_rate': ('--drop', args.drop),
               'global_pool': ('--gp', args.gp), **_deq_flagged(args)}
    for kwarg, dest in (('drop_path_rate', 'drop_path'), ('drop_block_rate', 'drop_block'),
                        ('bn_momentum', 'bn_momentum'), ('bn_eps', 'bn_eps')):
        if getattr(args, dest) is not None:  # unset: the model's own value, as timm's train.py
            flagged[kwarg] = ('--' + dest.replace('_', '-'), getattr(args, dest))
    if args.in_chans is not None:
        flagged['in_chans'] = ('--in-chans', args.in_chans)
    model = _cli.create_model_from_flags(args, flagged, _cli.deq_flag_names(parser))
    if args.initial_checkpoint:
        _cli.load_weights(model, args.initial_checkpoint, '--initial-checkpoint')
    problem = _compile_problem(model, args.torchcompile) or _float16_jr_problem(model, model_dtype)
    if problem:
        raise _cli.UsageError(problem)
    if args.num_classes is None:
        args.num_classes = model.num_classes
    if args.grad_checkpointing:
        _grad_checkpointing(model, args.model, primary)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    _cli.prepare_model(model, device, model_dtype, args.channels_last)
    if args.distributed and args.sync_bn:
        model = convert_sync_batchnorm(model)
    if primary:
        _logger.info(f'Model {safe_model_name(args.model)} created, '
                     f'param count: {sum(p.numel() for p in model.parameters())}')

    _scaled_lr(args)
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    task = DEQClassificationTask(model, criterion_kwargs=_criterion_kwargs(args, mixup_active), device=device,
                                 dtype=model_dtype, verbose=primary)
    try:
        optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        raise _cli.UsageError(f'argument --opt: cannot create optimizer {args.opt!r}'
                              f'{" with --opt-kwargs " + str(args.opt_args) if args.opt_args else ""}: {err}') from err
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                       device=torch.device('cpu') if args.model_ema_force_cpu else None)

    resume_epoch = None
    if args.resume:
        if not os.path.isfile(args.resume):
            raise _cli.UsageError(f'argument --resume: no such file: {args.resume}')
        try:
            resume_epoch = resume_task_checkpoint(task, args.resume,
                                                  optimizer=None if args.no_resume_opt else optimizer,
                                                  loss_scaler=None if args.no_resume_opt else loss_scaler,
                                                  log_info=primary)
        except (RuntimeError, KeyError, ValueError) as err:  # another model's weights, or not a checkpoint
            raise _cli.UsageError(f'argument --resume: cannot resume {args.model} from {args.resume}: '
                                  f'{_cli.first_line(err)}') from err
        if args.model_ema:
            load_task_ema_checkpoint(task, args.resume)
    if args.torchcompile and args.torchcompile_scope == 'model':
        task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
        if args.model_ema:
            task.compile_ema(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None)

    dataset_train = _cli.create_dataset_from_flags(
        args, args.train_split, '--train-split', is_training=True, class_map=args.class_map,
        batch_size=args.batch_size, seed=args.seed, input_img_mode=args.input_img_mode,
        num_samples=args.train_num_samples)
    dataset_eval = _cli.create_dataset_from_flags(
        args, args.val_split, '--val-split', is_training=False, class_map=args.class_map,
        batch_size=args.validation_batch_size or args.batch_size, input_img_mode=args.input_img_mode,
        num_samples=args.val_num_samples)
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
    prefetch = not args.no_prefetcher
    img_dtype = model_dtype or torch.float32
    loader_train = create_loader(
        dataset_train, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        train_crop_mode=args.train_crop_mode, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=prefetch, img_dtype=img_dtype, num_aug_repeats=args.aug_repeats)
    loader_eval = create_loader(
        dataset_eval, input_size=data_config['input_size'], batch_size=args.validation_batch_size or args.batch_size,
        is_training=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=args.distributed,
        crop_pct=data_config['crop_pct'], pin_memory=args.pin_mem, device=device, use_prefetcher=prefetch,
        img_dtype=img_dtype)
    loader_train = _cli.wrap_loader(loader_train, model_dtype, args.channels_last, prefetch)
    loader_eval = _cli.wrap_loader(loader_eval, model_dtype, args.channels_last, prefetch)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                       updates_per_epoch=updates_per_epoch)
    except (ValueError, KeyError, AssertionError) as err:
        raise _cli.UsageError(f'argument --sched: cannot create scheduler {args.sched!r}: {err}') from err
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    num_updates = start_epoch * updates_per_epoch
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(num_updates)
        else:
            lr_scheduler.step(start_epoch)
    offset = _deq_step_offset(model, num_updates, args.restart_deq_schedule)
    set_deq_step(task.get_trainable_module(), offset + num_updates, start_epoch)
    ema = task.get_trainable_module(ema=True)
    set_deq_step(getattr(ema, 'module', None), offset + num_updates, start_epoch)
    if primary:
        _logger.info(_schedule_line(model, offset, args.restart_deq_schedule))

    run = Training(args=args, device=device, task=task, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   loader_train=loader_train, loader_eval=loader_eval, mixup_fn=mixup_fn,
                   amp_autocast=amp_autocast, loss_scaler=loss_scaler, start_epoch=start_epoch,
                   num_epochs=num_epochs, num_updates=num_updates, deq_step_offset=offset)
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
        with open(os.path.join(run.output_dir, 'args.yaml'), 'w') as fh:
            fh.write(args_text)
        if args.log_wandb:
            wandb = _import_wandb()
            if wandb is None:
                _logger.warning('--log-wandb: wandb is not installed, so metrics are not logged to wandb '
                                '(pip install wandb); training proceeds')
            else:
                wandb.init(project=args.wandb_project, name=exp_name, config=args, tags=args.wandb_tags)
                run.log_wandb = True
        _logger.info(f'Scheduled epochs: {num_epochs}; {updates_per_epoch} updates per epoch; '
                     f'output in {run.output_dir}')
    return run


def _float16_jr_problem(model: torch.nn.Module, model_dtype: Optional[torch.dtype]) -> Optional[str]:
    """A float16 model with JR: its JR term is NaN (the vector-Jacobian product through f's GroupNorm
    overflows in float16 backward: 8 of 12 random initializations of mdeq_tiny_cifar, and under
    autocast the norms run in float32 instead)."""
    if model_dtype != torch.float16:
        return None
    jr = [layer for layer in deq_layers(model) if layer.config.jac_weight > 0 or layer.config.pretrain_jac_weight > 0
          or (layer.config.jac_weight_increment > 0 and layer.config.jac_increment_every > 0)]
    if not jr:
        return None
    return ('argument --model-dtype: a float16 model cannot train with Jacobian regularization: the JR term\'s '
            'vector-Jacobian product through the GroupNorms of f overflows in float16 and is NaN (8 of 12 random '
            f'initializations of mdeq_tiny_cifar). Use --model-dtype bfloat16, or float32 weights with --amp '
            f'--amp-dtype float16 (autocast runs the norms in float32), or --jac-weight 0 --pretrain-jac-weight 0 '
            f'(this model\'s JR weight is {jr[0].config.jac_weight:g})')


def _criterion_kwargs(args: argparse.Namespace, mixup_active: bool) -> Dict[str, object]:
    """timm's classification loss as timm's train.py chooses it: binary cross-entropy with
    ``--bce-loss`` (its threshold, sum and positive weight), else cross-entropy; label smoothing,
    or soft targets under mixup/cutmix."""
    kwargs: Dict[str, object] = dict(smoothing=0. if mixup_active else args.smoothing, soft_targets=mixup_active)
    if args.bce_loss:
        kwargs.update(loss_type='bce', bce_target_thresh=args.bce_target_thresh, bce_sum=args.bce_sum,
                      pos_weight=args.bce_pos_weight)
    elif args.bce_sum or args.bce_target_thresh is not None or args.bce_pos_weight is not None:
        raise _cli.UsageError('argument --bce-sum/--bce-target-thresh/--bce-pos-weight: only read with --bce-loss')
    return kwargs


def _deq_step_offset(model: torch.nn.Module, num_updates: int, restart: bool) -> int:
    """The equilibrium layers' step count ahead of this run's update count: what the loaded weights
    carry (a released or fine-tuned model past its pretraining; a resumed run of one), 0 with
    ``--restart-deq-schedule`` or for a fresh model."""
    if restart:
        return 0
    loaded = max((layer.num_updates for layer in deq_layers(model)), default=0)
    return max(loaded - num_updates, 0)


def _schedule_line(model: torch.nn.Module, offset: int, restart: bool) -> str:
    """The log line saying where the equilibrium layers' schedule starts."""
    layers = deq_layers(model)
    if not layers:
        return 'no equilibrium layer in the model'
    layer = layers[0]
    step, pretrain = layer.num_updates, layer.config.pretrain_steps
    source = ('restarted at 0 (--restart-deq-schedule)' if restart else
              f'continuing the loaded weights\' count ({offset})' if offset else 'a fresh schedule')
    phase = (f'unrolled pretraining until step {pretrain} ({layer.config.unrolled_layers} layers)'
             if layer.pretraining else f'solving, JR weight {layer.jac_weight:g}')
    return f'Equilibrium layers at step {step}, {source}: {phase}'


EpochCallback = Callable[[Training, int, Dict[str, float], Dict[str, float]], None]


def train(run: Training, on_epoch_end: Optional[EpochCallback] = None) -> Dict[str, float]:
    """Train from ``run.start_epoch`` to ``run.num_epochs``.

    Args:
        run: from :func:`setup`.
        on_epoch_end: when given, ``on_epoch_end(run, epoch, train_metrics, eval_metrics)`` is
            called on every process after each epoch's evaluation and checkpoint (for extra
            diagnostics or logging).

    Returns:
        the last eval metrics. Each epoch's row goes to ``summary.csv`` (and to wandb with
        ``--log-wandb``) on the primary process.
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
            mixup_fn=run.mixup_fn, deq_step_offset=run.deq_step_offset)
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
                                 lr=run.optimizer.param_groups[0]['lr'], log_wandb=run.log_wandb)
            run.saver.save_checkpoint(epoch, metric=eval_metrics[args.eval_metric])
        if on_epoch_end is not None:
            on_epoch_end(run, epoch, train_metrics, eval_metrics)
        run.lr_scheduler.step(epoch + 1, eval_metrics[args.eval_metric])
    return eval_metrics


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    """The command line: set up and train, reporting unusable values as argparse errors.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        the last eval metrics and the run's ``output_dir``.

    Raises:
        SystemExit: status 2 with a usage line and a message naming the flag, for any argument
            the run cannot use; status 0 after ``--help``.
    """
    run = _cli.setup_or_usage_error(setup, build_parser, argv)
    return dict(train(run), output_dir=run.output_dir)


def cli(argv: Optional[List[str]] = None) -> None:
    """Console entry point: timm's logging set-up, then :func:`main`.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).
    """
    utils.setup_default_logging()
    main(argv)


if __name__ == '__main__':
    cli()
