"""Evaluate a trained deep equilibrium model at several forward-solver limits in one run.

    python -m timm_deq.validate DATA_DIR --model mdeq_small --checkpoint model_best.pth.tar \\
        --eval-max-iter 2 4 6 8 14

For each limit the forward solver is hard-stopped after that many iterations (it may stop earlier
at the tolerance); the table of accuracy against limit is the paper's hard-stop experiment.
Flags follow timm's ``validate.py`` names where timm has them.
"""
import argparse
import csv
import logging
import os
from contextlib import ExitStack, nullcontext
from functools import partial
from typing import Dict, List, Optional

import torch

from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, load_checkpoint
from timm import utils

from deq_core import DEQConfig, add_deq_args

from .engine import evaluate
from .task import deq_layers

_logger = logging.getLogger('validate')

__all__ = ['build_parser', 'main']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Evaluate a deep equilibrium model at several solver limits')
    parser.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional)')
    parser.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    parser.add_argument('--dataset', metavar='NAME', default='')
    parser.add_argument('--split', metavar='NAME', default='validation')
    parser.add_argument('--class-map', default='', type=str, metavar='FILENAME')
    parser.add_argument('--input-img-mode', default=None, type=str)
    parser.add_argument('--model', '-m', metavar='NAME', default='mdeq_tiny_cifar')
    parser.add_argument('--checkpoint', default='', type=str, metavar='PATH')
    parser.add_argument('--use-ema', action='store_true', default=False, help='use the EMA weights if present')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--gp', default=None, type=str, metavar='POOL')
    parser.add_argument('--img-size', default=None, type=int, metavar='N')
    parser.add_argument('--in-chans', type=int, default=None, metavar='N')
    parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N N N')
    parser.add_argument('--crop-pct', default=None, type=float, metavar='N')
    parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    parser.add_argument('--interpolation', default='', type=str, metavar='NAME')
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N')
    parser.add_argument('-j', '--workers', default=4, type=int, metavar='N')
    parser.add_argument('--log-freq', default=10, type=int, metavar='N')
    parser.add_argument('--amp', action='store_true', default=False)
    parser.add_argument('--amp-dtype', default='float16', type=str)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    parser.add_argument('--eval-max-iter', dest='eval_limits', type=int, nargs='+', default=None, metavar='N',
                        help='forward solver limits to evaluate at (default: the model\'s eval limit)')
    parser.add_argument('--results-file', default='', type=str, metavar='FILENAME',
                        help='write one CSV row per limit here')
    add_deq_args(parser, suppress_defaults=True, exclude=('eval_max_iter',))
    return parser


def main(argv: Optional[List[str]] = None) -> List[Dict[str, float]]:
    """Evaluate; returns one metrics dict per forward limit (``f_limit`` names the limit)."""
    args = build_parser().parse_args(argv)
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise SystemExit('error: a dataset directory is required (positional DIR or --data-dir)')
    if args.eval_limits and min(args.eval_limits) < 1:
        raise SystemExit(f'error: --eval-max-iter values must be >= 1, got {args.eval_limits}')
    device = torch.device(args.device)
    amp_autocast = nullcontext
    if args.amp:
        dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=dtype)

    deq_overrides = {k: getattr(args, k) for k in DEQConfig.field_names() if hasattr(args, k)}
    factory_kwargs = {} if args.in_chans is None else {'in_chans': args.in_chans}
    model = create_model(args.model, num_classes=args.num_classes, global_pool=args.gp,
                         **factory_kwargs, **deq_overrides, **args.model_kwargs)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, use_ema=args.use_ema)
    model.to(device).eval()
    layers = deq_layers(model)
    if not layers:
        raise SystemExit(f'error: model {args.model} has no deep equilibrium layer')
    data_config = resolve_data_config(vars(args), model=model, use_test_size=True, verbose=True)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, class_map=args.class_map,
                             input_img_mode=args.input_img_mode)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], device=device,
        use_prefetcher=device.type == 'cuda')

    limits = args.eval_limits or [layers[0].config.eval_max_iter or layers[0].config.f_max_iter]
    results = []
    for limit in limits:
        with ExitStack() as stack:
            for layer in layers:
                stack.enter_context(layer.overridden(eval_max_iter=limit))
            metrics = evaluate(model, loader, device, amp_autocast, log_interval=args.log_freq,
                               log_suffix=f' (limit {limit})')
        results.append(dict(f_limit=float(limit), **metrics))

    _logger.info('| forward limit | top-1 | top-5 | loss | mean forward steps | mean rel. residual |')
    _logger.info('|---|---|---|---|---|---|')
    for r in results:
        _logger.info(f"| {int(r['f_limit'])} | {r['top1']:.2f} | {r['top5']:.2f} | {r['loss']:.4f} | "
                     f"{r.get('f_steps', float('nan')):.2f} | {r.get('f_rel_res', float('nan')):.3g} |")
    if args.results_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.results_file)), exist_ok=True)
        with open(args.results_file, 'w', newline='') as fh:
            writer = csv.DictWriter(fh, fieldnames=list(results[0]))
            writer.writeheader()
            writer.writerows(results)
    return results


def cli() -> None:
    """Console entry point: timm's logging set-up, then :func:`main` on ``sys.argv``."""
    utils.setup_default_logging()
    main()


if __name__ == '__main__':
    cli()
