"""The embedded default run: generate the shapes dataset, train ``mdeq_tiny_cifar`` with JR for a
few CPU minutes, then evaluate the best checkpoint at several forward-solver limits.

    python -m timm_deq.demo [--output output/demo] [--epochs 5]

Everything goes through the public entry points (``timm_deq.train``, ``timm_deq.validate``), so
the printed figures are what those commands produce.
"""
import argparse
import logging
import os
from typing import List, Optional

from timm import utils

from . import shapes, train, validate

_logger = logging.getLogger('demo')


def main(argv: Optional[List[str]] = None) -> None:
    """Run the demo from the command line (``argv``: the arguments without the program name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--output', default='output/demo', help='folder for data, checkpoints and logs')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--train-per-class', type=int, default=200)
    parser.add_argument('--workers', type=int, default=2)
    args = parser.parse_args(argv)
    utils.setup_default_logging()

    data = os.path.join(args.output, 'shapes')
    if not os.path.isdir(os.path.join(data, 'train')):
        _logger.info(f'Generating the shapes dataset in {data}')
        shapes.make_shapes(data, train_per_class=args.train_per_class, val_per_class=30)
    result = train.main([
        data, '--model', 'mdeq_tiny_cifar', '--epochs', str(args.epochs), '-b', '64', '-j', str(args.workers),
        '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.01', '--warmup-epochs', '1', '--warmup-lr', '2e-4',
        '--scale', '0.5', '1', '--color-jitter', '0', '--smoothing', '0', '--log-interval', '10',
        '--jac-weight', '0.4', '--jac-freq', '0.3', '--f-max-iter-jitter', '2',
        '--output', os.path.join(args.output, 'train'), '--experiment', 'mdeq_tiny_cifar', '--checkpoint-hist', '2',
    ])
    checkpoint = os.path.join(result['output_dir'], 'model_best.pth.tar')
    results = validate.main([
        data, '--model', 'mdeq_tiny_cifar', '--checkpoint', checkpoint, '-j', str(args.workers),
        '--eval-max-iter', '1', '2', '4', '6', '8', '12', '--results-file',
        os.path.join(args.output, 'hard_stop.csv'),
    ])
    best = max(results, key=lambda r: r['top1'])
    print(f"\nmdeq_tiny_cifar after {args.epochs} epochs: top-1 {result['top1']:.1f}% at the training limit; "
          f"best {best['top1']:.1f}% at {int(best['f_limit'])} solver steps "
          f"(mean forward steps {best['f_steps']:.1f}, relative residual {best['f_rel_res']:.3g}).")
    print(f'Checkpoint: {checkpoint}\nSummary per epoch: {os.path.join(result["output_dir"], "summary.csv")}')


if __name__ == '__main__':
    main()
