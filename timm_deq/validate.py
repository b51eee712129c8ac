"""Evaluate a trained deep equilibrium model at several forward-solver limits in one run.

    python -m timm_deq.validate DATA_DIR --model mdeq_small --checkpoint model_best.pth.tar \\
        --eval-max-iter 2 4 6 8 14

For each limit the forward solver is hard-stopped after that many iterations (it may stop earlier
at the tolerance); the table of accuracy against limit is the paper's hard-stop experiment.
Flags follow timm's ``validate.py`` names where timm has them (``--amp-dtype``, ``--model-dtype``,
``--channels-last``, ``--no-prefetcher`` parsed as in ``timm_deq.train``); ``-c/--config`` reads
flag defaults from YAML, and arguments the run cannot use stop it with an argparse error naming
the flag.
"""
import argparse
import csv
import json
import logging
import os
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import torch

from timm.data import create_loader, resolve_data_config
from timm import utils

from deq_core import DEQConfig, add_deq_args

from . import _cli
from .engine import evaluate
from .task import deq_layers

_logger = logging.getLogger('validate')

__all__ = ['build_parser', 'setup', 'evaluate_limits', 'main', 'Validation']


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`setup`: timm's ``validate.py`` flags that apply to these models,
    the ``DEQConfig`` flags, ``--eval-max-iter`` (the limits to evaluate at) and ``-c/--config``.

    Returns:
        the parser (it reads ``-c FILE`` defaults before the command line, as timm's ``validate.py``).
    """
    parser = _cli.Parser(
        description='Evaluate a deep equilibrium model at several solver limits',
        epilog=_cli.DEQ_FLAGS_EPILOG)
    parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional)')
    parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    parser.add_argument('--dataset', metavar='NAME', default='',
                        help='dataset type + name ("<type>/<name>"); empty: ImageFolder/ImageTar')
    parser.add_argument('--split', metavar='NAME', default='validation', help='dataset split to evaluate')
    parser.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                        help='path to a class to index mapping file')
    parser.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode')
    parser.add_argument('--num-samples', default=None, type=int, metavar='N',
                        help='manually specify the number of samples (iterable datasets)')
    parser.add_argument('--crop-mode', default=None, type=str, metavar='MODE',
                        help='crop mode: center, squash or border (None: the model\'s)')
    parser.add_argument('--use-train-size', action='store_true', default=False,
                        help='evaluate at the model\'s training input size, not its test size')
    parser.add_argument('--model', '-m', metavar='NAME', default='mdeq_tiny_cifar', help='name of the model')
    parser.add_argument('--pretrained', action='store_true', default=False,
                        help='use the pretrained weights of the model (if published)')
    parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='weights to evaluate')
    parser.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights if present')
    _cli.add_model_input_args(parser)
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='batch size')
    parser.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='data loader worker processes')
    parser.add_argument('--log-freq', default=10, type=int, metavar='N', help='batches between log lines')
    _cli.add_precision_args(parser)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs, metavar='KEY=VALUE',
                        help='extra keyword arguments of the model (not options that have a flag)')
    parser.add_argument('--eval-max-iter', dest='eval_limits', type=int, nargs='+', default=None, metavar='N',
                        help='forward solver limits to evaluate at (None: the model\'s eval limit)')
    parser.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                        help='write one row per limit here')
    parser.add_argument('--results-format', default='csv', choices=('csv', 'json'),
                        help='format of --results-file')
    parser.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                        help='compile the equilibrium layers\' function f with torch.compile (BACKEND, default '
                             'inductor) for their solver evaluations, as timm_deq.train\'s flag')
    for flag, why in _UNSUPPORTED.items():
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS, action=_Refuse, why=why)
    add_deq_args(parser, suppress_defaults=True, exclude=('eval_max_iter',))
    _cli.note_deq_defaults(parser)
    return parser


# timm's validate.py flags that do not apply here, and why.
_UNSUPPORTED = {
    '--test-pool': "test-time pooling evaluates at a larger input than the model's and pools its classifier's "
                   "output map, and an MDEQ's head ends in global pooling before its linear classifier: there is "
                   "no output map to pool",
    '--real-labels': "this entry point measures accuracy against the solver limit; score the ImageNet ReaL "
                     "labels with timm's own validate.py, which builds these models once timm_deq is imported",
    '--valid-labels': "this entry point measures accuracy against the solver limit; score a class subset "
                      "(ImageNet-A/R) with timm's own validate.py, which builds these models once timm_deq is "
                      "imported",
    '--retry': "retrying with a smaller batch after running out of memory repeats the whole limit sweep; pass a "
               "smaller -b",
}


class _Refuse(argparse.Action):
    """A flag of timm's validate.py that does not apply: argparse's error with the reason."""

    def __init__(self, *args, why: str = '', **kwargs) -> None:
        kwargs['nargs'] = '?'
        super().__init__(*args, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f'argument {option_string}: not supported by timm_deq.validate: {self.why}')


@dataclass
class Validation:
    """What an evaluation needs, built from the arguments."""

    args: argparse.Namespace
    device: torch.device
    model: torch.nn.Module
    loader: object
    amp_autocast: object
    limits: List[int]


def setup(argv: Optional[List[str]] = None) -> Validation:
    """Parse arguments; build the model (with its checkpoint), the loader and the limits.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        the evaluation, ready for :func:`evaluate_limits`.

    Raises:
        SystemExit: argparse's errors (exit status 2), including a missing data folder.
        ValueError: a value the run cannot use, naming the flag (the entry point turns it into argparse's usage error);
            :func:`main` reports it as an argparse error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _cli.check_data_dir(parser, args)
    _cli.check_model_input(parser, args)
    _cli.import_device_modules(args)
    if args.eval_limits and min(args.eval_limits) < 1:
        parser.error(f'argument --eval-max-iter: values must be >= 1, got {args.eval_limits}')
    amp_dtype, model_dtype = _cli.resolve_dtypes(args)
    device = torch.device(args.device)
    amp_autocast = nullcontext
    if amp_dtype is not None:
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)

    flagged = {'num_classes': ('--num-classes', args.num_classes), 'global_pool': ('--gp', args.gp)}
    flagged.update({k: ('--' + k.replace('_', '-'), getattr(args, k)) for k in DEQConfig.field_names()
                    if hasattr(args, k)})
    if args.in_chans is not None:
        flagged['in_chans'] = ('--in-chans', args.in_chans)
    if args.torchcompile:
        flagged.update(compile_f=('--torchcompile', True), compile_backend=('--torchcompile', args.torchcompile))
    model = _cli.create_model_from_flags(args, flagged, _cli.deq_flag_names(parser))
    if args.checkpoint:
        _cli.load_weights(model, args.checkpoint, '--checkpoint', use_ema=args.use_ema)
    layers = deq_layers(model)
    if not layers:
        raise _cli.UsageError(f'argument --model: {args.model} has no deep equilibrium layer to evaluate at '
                              'several limits')
    _cli.prepare_model(model, device, model_dtype, args.channels_last).eval()
    data_config = resolve_data_config(vars(args), model=model, use_test_size=not args.use_train_size, verbose=True)
    dataset = _cli.create_dataset_from_flags(args, args.split, '--split', class_map=args.class_map,
                                             input_img_mode=args.input_img_mode, num_samples=args.num_samples)
    prefetch = not args.no_prefetcher
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], crop_mode=args.crop_mode or data_config.get(
            'crop_mode'), pin_memory=args.pin_mem, device=device, use_prefetcher=prefetch,
        img_dtype=model_dtype or torch.float32)
    loader = _cli.wrap_loader(loader, model_dtype, args.channels_last, prefetch)
    limits = args.eval_limits or [layers[0].config.eval_max_iter or layers[0].config.f_max_iter]
    return Validation(args=args, device=device, model=model, loader=loader, amp_autocast=amp_autocast,
                      limits=limits)


def evaluate_limits(run: Validation) -> List[Dict[str, float]]:
    """Evaluate at each forward limit of ``run.limits``.

    Args:
        run: from :func:`setup`.

    Returns:
        one metrics dict per limit (``f_limit`` names the limit).
    """
    results = []
    for limit in run.limits:
        with ExitStack() as stack:
            for layer in deq_layers(run.model):
                stack.enter_context(layer.overridden(eval_max_iter=limit))
            metrics = evaluate(run.model, run.loader, run.device, run.amp_autocast, log_interval=run.args.log_freq,
                               log_suffix=f' (limit {limit})')
        results.append(dict(f_limit=float(limit), **metrics))
    return results


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """The command line: evaluate at each limit, log the table and write ``--results-file``.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).

    Returns:
        one metrics dict per forward limit (``f_limit`` names the limit).

    Raises:
        SystemExit: status 2 with a usage line and a message naming the flag, for any argument
            the run cannot use; status 0 after ``--help``.
    """
    run = _cli.setup_or_usage_error(setup, build_parser, argv)
    args = run.args
    results = evaluate_limits(run)

    _logger.info('| forward limit | top-1 | top-5 | loss | mean forward steps | mean rel. residual |')
    _logger.info('|---|---|---|---|---|---|')
    for r in results:
        _logger.info(f"| {int(r['f_limit'])} | {r['top1']:.2f} | {r['top5']:.2f} | {r['loss']:.4f} | "
                     f"{r.get('f_steps', float('nan')):.2f} | {r.get('f_rel_res', float('nan')):.3g} |")
    if args.results_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
        with open(args.results_file, 'w', newline='') as fh:
            if args.results_format == 'json':
                json.dump(results, fh, indent=2)
            else:
                writer = csv.DictWriter(fh, fieldnames=list(results[0]))
                writer.writeheader()
                writer.writerows(results)
    return results


def cli(argv: Optional[List[str]] = None) -> None:
    """Console entry point: timm's logging set-up, then :func:`main`.

    Args:
        argv: the command line without the program name (None: ``sys.argv[1:]``).
    """
    utils.setup_default_logging()
    main(argv)


if __name__ == '__main__':
    cli()
