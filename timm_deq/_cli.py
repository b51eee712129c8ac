"""Command-line plumbing shared by ``timm_deq.train`` and ``timm_deq.validate``.

timm's conventions: a ``-c/--config`` YAML of flag defaults read before the command line, help
that shows every default, ``--amp-dtype``/``--model-dtype``/``--channels-last``/``--no-prefetcher``
with timm's meaning. Errors found in the values (a DEQ option out of range, a clash with
``--model-kwargs``, a missing data folder or checkpoint, weights that cannot be loaded) are raised
as :class:`UsageError` naming the flag; the entry points report them as argparse errors (usage
line, exit status 2).

Importing this module checks that the installed timm has what the entry points use.
"""
import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

import timm
import timm.task
from timm.data import create_dataset
from timm.models import create_model, load_checkpoint

from deq_core import DEQConfig, UsageError

from .models.mdeq import MDEQ, checkpoint_filter_fn
from .task import deq_layers

_logger = logging.getLogger(__name__)

# The first timm release with everything the entry points use (setup.cfg pins it).
TIMM_FOR_ENTRY_POINTS = '1.0.31'

# The epilog of both entry points' --help.
DEQ_FLAGS_EPILOG = ('DEQ flags left unset keep the --model variant\'s own values (e.g. --f-max-iter is 30 in\n'
                    'DEQConfig, 14 in mdeq_small); "--model NAME --help" shows NAME\'s values.')
AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}
MODEL_DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'float16': torch.float16,
                'bfloat16': torch.bfloat16}

__all__ = ['TIMM_FOR_ENTRY_POINTS', 'UsageError', 'Parser', 'HelpFormatter', 'add_precision_args', 'args_yaml',
           'resolve_dtypes', 'check_data_dir', 'create_model_from_flags', 'create_dataset_from_flags',
           'load_weights', 'prepare_model', 'InputFormat', 'wrap_loader', 'deq_flag_names', 'note_deq_defaults']


def _check_timm() -> None:
    """Raise an ImportError naming the timm release the entry points need when a feature is missing."""
    missing = [f'timm.task.{name}' for name in ('evaluation_sample_limit', 'ClassificationEvaluator',
                                                'resume_task_checkpoint', 'load_task_ema_checkpoint')
               if not hasattr(timm.task, name)]
    task_cls = getattr(timm.task, 'ClassificationTask', None)
    if task_cls is None or 'criterion_kwargs' not in inspect.signature(task_cls.__init__).parameters:
        missing.append('ClassificationTask(criterion_kwargs=...)')
    if missing:
        raise ImportError(
            f'timm_deq.train and timm_deq.validate need timm >= {TIMM_FOR_ENTRY_POINTS} (for '
            f'{", ".join(missing)}); timm {getattr(timm, "__version__", "?")} is installed. '
            f'Upgrade with: pip install "timm>={TIMM_FOR_ENTRY_POINTS},<1.1"')


_check_timm()


def setup_or_usage_error(setup: Any, build_parser: Any, argv: Optional[List[str]]) -> Any:
    """``setup(argv)``, with a :class:`UsageError` reported as argparse reports errors (usage line,
    exit status 2), for the entry points' ``main``.

    Args:
        setup: the entry point's set-up function.
        build_parser: its parser factory (for the usage line).
        argv: the command line without the program name.

    Returns:
        what ``setup`` returns.
    """
    try:
        return setup(argv)
    except UsageError as err:
        build_parser().error(str(err))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows each flag's default and keeps the description's line breaks."""


def _escape(text: str) -> str:
    return str(text).replace('%', '%%')


def _flags(action: argparse.Action) -> str:
    return '/'.join(action.option_strings) or action.metavar or action.dest


def deq_flag_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """``DEQConfig`` field → the flag that sets it in ``parser`` (fields without a flag are left out).

    Args:
        parser: a parser holding the flags of ``deq_core.add_deq_args`` (and perhaps ``--seed``).

    Returns:
        the mapping, e.g. ``{'f_max_iter': '--f-max-iter', 'seed': '--seed', ...}``.
    """
    fields = set(DEQConfig.field_names())
    return {a.dest: a.option_strings[0] for a in parser._actions if a.dest in fields and a.option_strings}


def _variant_deq_values(model_name: str) -> Optional[Dict[str, Any]]:
    """The DEQ options a model variant builds its first equilibrium layer with (None if unknown)."""
    try:
        with torch.device('meta'):
            model = create_model(model_name)
    except Exception as err:  # any failure only means the help cannot show the variant's values
        _logger.debug(f'could not build {model_name} on the meta device for --help: {err}')
        return None
    layers = deq_layers(model)
    return layers[0].config.to_dict() if layers else None


def note_deq_defaults(parser: argparse.ArgumentParser, model_name: Optional[str] = None) -> None:
    """Append to each DEQ flag's help what leaving it unset means: the model variant's own value.

    Args:
        parser: a parser with the flags of ``deq_core.add_deq_args(..., suppress_defaults=True)``.
        model_name: the variant whose values to state (built on the meta device: no memory, no
            weights); None states only ``DEQConfig``'s defaults.
    """
    base = DEQConfig().to_dict()
    values = _variant_deq_values(model_name) if model_name else None
    for action in parser._actions:
        if action.dest not in base or action.default is not argparse.SUPPRESS:
            continue
        original = getattr(action, '_deq_help', None)
        if original is None:
            original = action._deq_help = action.help or ''
        if values is not None:
            note = f"unset: {model_name}'s value {values[action.dest]!r}; DEQConfig default {base[action.dest]!r}"
        else:
            note = f"unset: the --model variant's own value; DEQConfig default {base[action.dest]!r}"
        action.help = f'{original} ({_escape(note)})'


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` with timm's ``-c/--config`` convention and help stating DEQ defaults.

    ``-c FILE`` names a YAML mapping of flag destinations (``batch_size: 64``, ``f_max_iter: 8``, as
    a run's ``args.yaml`` holds them) that become the defaults before the command line is parsed,
    so flags given on the command line override it. A key naming no flag, or a value outside a
    flag's choices, is an error. ``--help`` lists the DEQ values of the chosen ``--model`` (from
    the command line, the config file or the default).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                          help='YAML file of flag defaults (keys as in a run\'s args.yaml: the flags\' names '
                               'with underscores); flags on the command line override it')

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        """argparse's ``parse_known_args``, after reading ``-c FILE`` into the defaults.

        Args:
            args: the command line without the program name (None: ``sys.argv[1:]``).
            namespace: the namespace to fill (None: a new one).

        Returns:
            the namespace and the arguments left unparsed.
        """
        argv = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument('-c', '--config', default='')
        model_flags = [s for a in self._actions if a.dest == 'model' for s in a.option_strings]
        if model_flags:
            pre.add_argument(*model_flags, dest='model', default=None)
        known, _ = pre.parse_known_args(argv)
        config = self._read_config(known.config) if known.config else {}
        if config:
            self.set_defaults(**config)
        if '-h' in argv or '--help' in argv:
            note_deq_defaults(self, getattr(known, 'model', None) or self.get_default('model'))
        result, extras = super().parse_known_args(argv, namespace)
        self._check_config_choices(result, config, known.config)
        return result, extras

    def _read_config(self, path: str) -> Dict[str, Any]:
        try:
            with open(path) as fh:
                config = yaml.safe_load(fh)
        except OSError as err:
            self.error(f'argument -c/--config: cannot read {path}: {err.strerror or err}')
        except yaml.YAMLError as err:
            self.error(f'argument -c/--config: {path} is not valid YAML: {err}')
        if config is None:
            return {}
        if not isinstance(config, dict):
            self.error(f'argument -c/--config: {path} must hold a mapping of flag names to values, '
                       f'not a {type(config).__name__}')
        config = {str(k).replace('-', '_'): v for k, v in config.items()}
        config.pop('config', None)
        dests = sorted({a.dest for a in self._actions if a.dest not in ('help', argparse.SUPPRESS)})
        unknown = [k for k in config if k not in dests]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, dests, n=1)
                hints.append(key + (f' (did you mean {close[0]}?)' if close else ''))
            self.error(f'argument -c/--config: {path} sets {", ".join(hints)}, which no flag of this command '
                       f'accepts; keys are flag names with underscores, e.g. batch_size for --batch-size')
        return config

    def _check_config_choices(self, args: argparse.Namespace, config: Mapping[str, Any], path: str) -> None:
        # argparse checks choices of command-line values only, not of defaults from the file.
        for action in self._actions:
            if action.dest not in config or action.choices is None or not hasattr(args, action.dest):
                continue
            value = getattr(args, action.dest)
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if v is not None and v not in action.choices]
            if bad:
                choices = ', '.join(repr(c) for c in action.choices)
                self.error(f'argument {_flags(action)}: invalid choice: {bad[0]!r} (from {path}; choose from '
                           f'{choices})')


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def args_yaml(args: argparse.Namespace) -> str:
    """The parsed arguments as timm's train.py writes them to ``args.yaml`` (``-c`` reads it back).

    Args:
        args: the namespace straight from parsing (before the run changes any value).

    Returns:
        the YAML text; DEQ flags appear only when they were set, so a rerun keeps the variant's
        own values for the others.
    """
    return yaml.safe_dump({k: _plain(v) for k, v in vars(args).items() if k != 'config'}, default_flow_style=False)


def add_precision_args(group: argparse._ArgumentGroup) -> None:
    """The device, precision, memory-layout and loader flags, identical in train and validate.

    Args:
        group: the parser (or argument group) to add ``--device``, ``--device-modules``, ``--amp``,
            ``--amp-dtype``, ``--model-dtype``, ``--channels-last``, ``--no-prefetcher`` and
            ``--pin-mem`` to.
    """
    group.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=str,
                       help='device to run on')
    group.add_argument('--device-modules', default=None, type=str, nargs='+', metavar='MODULE',
                       help='Python modules to import for a device backend (e.g. torch_npu), as timm\'s scripts')
    group.add_argument('--amp', action='store_true', default=False,
                       help='mixed precision with torch.autocast (float16 also gets a GradScaler when training)')
    group.add_argument('--amp-dtype', default='float16', type=str, metavar='DTYPE',
                       help='autocast dtype with --amp: float16 or bfloat16')
    group.add_argument('--model-dtype', default=None, choices=tuple(MODEL_DTYPES), metavar='DTYPE',
                       help='model weights and inputs in this dtype, without autocast: float32, float64 (the '
                            'solvers then run in double precision), float16 or bfloat16 (None: float32)')
    group.add_argument('--channels-last', action='store_true', default=False,
                       help='use the channels_last memory layout for the model and its input batches')
    group.add_argument('--no-prefetcher', action='store_true', default=False,
                       help='disable timm\'s prefetcher (which moves uint8 batches to the device and normalizes '
                            'them there); the data loader then normalizes on its workers')
    group.add_argument('--pin-mem', action='store_true', default=False,
                       help='pin CPU memory in the data loader (faster transfers to a GPU)')


def import_device_modules(args: argparse.Namespace) -> None:
    """Import the ``--device-modules`` (a device backend registers itself with torch on import).

    Args:
        args: parsed arguments with ``device_modules``.

    Raises:
        UsageError: a module that cannot be imported.
    """
    for name in args.device_modules or ():
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UsageError(f'argument --device-modules: cannot import {name}: {err}') from err


def resolve_dtypes(args: argparse.Namespace) -> Tuple[Optional[torch.dtype], Optional[torch.dtype]]:
    """Check ``--amp-dtype`` and ``--model-dtype`` (as timm does: AMP needs float32 weights).

    Args:
        args: parsed arguments with ``amp``, ``amp_dtype`` and ``model_dtype``.

    Returns:
        (autocast dtype, or None without ``--amp``; model dtype, or None for the default).

    Raises:
        UsageError: an unknown ``--amp-dtype`` (checked with or without ``--amp``), or a model dtype
            other than float32 together with ``--amp``.
    """
    if args.amp_dtype not in AMP_DTYPES:
        raise UsageError(f"argument --amp-dtype: invalid choice {args.amp_dtype!r}: --amp-dtype must be "
                         f"'float16' or 'bfloat16'")
    model_dtype = MODEL_DTYPES[args.model_dtype] if args.model_dtype else None
    if args.amp and model_dtype not in (None, torch.float32):
        raise UsageError(f'argument --model-dtype: --amp needs float32 weights (autocast picks the precision of '
                         f'each op), got --model-dtype {args.model_dtype}; drop --amp or use --model-dtype float32')
    return (AMP_DTYPES[args.amp_dtype] if args.amp else None), model_dtype


def check_model_input(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop with a parser error when ``--input-size``, ``--img-size`` or ``--in-chans`` is not positive.

    Args:
        parser: the parser whose ``error`` reports the problem.
        args: parsed arguments with the flags of :func:`add_model_input_args`.
    """
    if args.input_size is not None and min(args.input_size) < 1:
        parser.error(f'argument --input-size: C H W must all be >= 1, got {" ".join(map(str, args.input_size))}')
    for flag, value in (('--img-size', args.img_size), ('--in-chans', args.in_chans)):
        if value is not None and value < 1:
            parser.error(f'argument {flag}: must be >= 1, got {value}')


def check_data_dir(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Set ``args.data_dir`` from ``DIR``/``--data-dir`` and stop with a parser error when it is
    missing (for timm's folder and tar datasets, the ones read from a local path).

    Args:
        parser: the parser whose ``error`` reports the problem.
        args: parsed arguments with ``data``, ``data_dir`` and ``dataset``.
    """
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        parser.error('a dataset directory is required (positional DIR or --data-dir)')
    if '/' not in (args.dataset or '') and not os.path.exists(args.data_dir):
        parser.error(f'argument DIR/--data-dir: {args.data_dir} does not exist (expected an image folder, with '
                     f'one subfolder per split, or a tar file)')


def create_dataset_from_flags(args: argparse.Namespace, split: str, split_flag: str, **kwargs: Any):
    """timm's ``create_dataset`` for ``args.dataset`` at ``args.data_dir``, reporting failures as
    usage errors.

    Args:
        args: parsed arguments with ``dataset`` and ``data_dir``.
        split: the split to read.
        split_flag: the flag that chose ``split`` (named in the error).
        **kwargs: passed to ``create_dataset``.

    Returns:
        the dataset.

    Raises:
        UsageError: timm could not read that split.
    """
    try:
        return create_dataset(args.dataset, root=args.data_dir, split=split, **kwargs)
    except (RuntimeError, ValueError, OSError, AssertionError) as err:
        raise UsageError(f'argument DIR/--data-dir: cannot read split {split!r} ({split_flag}) of '
                         f'{args.data_dir} as dataset {args.dataset or "ImageFolder/ImageTar"!r} '
                         f'(--dataset): {err}') from err


def _explain_model_error(err: BaseException, model_name: str, sources: Mapping[str, str],
                         flag_of: Mapping[str, str]) -> str:
    """``argument FLAG: message`` for an error raised while building the model, FLAG being the one
    that set the first option the error names (an ``OptionError`` names its options; ``--model``
    when it names none set by a flag), with the flags of the other options it names."""
    text = str(err) or type(err).__name__
    named = list(getattr(err, 'options', ()))
    culprit = next((name for name in named if name in sources), None)
    flag = sources[culprit] if culprit else f'--model {model_name}'
    others = []
    for name in named:
        if name == culprit:
            continue
        if name in sources:
            others.append(f'{name} is set by {sources[name]}')
        elif name in flag_of:
            others.append(f"{name} is {model_name}'s own value (set it with {flag_of[name]})")
    return f'argument {flag}: {text}' + (f' [{"; ".join(others)}]' if others else '')


def add_model_input_args(group: Any) -> None:
    """The flags train and validate share for the model's head and its input: ``--num-classes``,
    ``--gp``, ``--img-size``, ``--in-chans``, ``--input-size``, ``--crop-pct``, ``--mean``, ``--std``
    and ``--interpolation`` (each unset: the model's own value, as timm's scripts).

    Args:
        group: an argparse parser or argument group.
    """
    group.add_argument('--num-classes', type=int, default=None, metavar='N',
                       help='number of label classes (None: the model\'s)')
    group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (None: the model\'s)')
    group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (None: the model\'s)')
    group.add_argument('--in-chans', type=int, default=None, metavar='N',
                       help='image input channels (None: the model\'s)')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                       help='input dimensions C H W, e.g. 3 224 224 (None: the model\'s)')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                       help='center crop fraction of the evaluation images (None: the model\'s)')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help='pixel mean of the dataset (None: the model\'s)')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help='pixel standard deviation of the dataset (None: the model\'s)')
    group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                       help='image resize interpolation (empty: the model\'s)')


def create_model_from_flags(args: argparse.Namespace, flagged: Mapping[str, Tuple[str, Any]],
                            flag_of: Mapping[str, str]) -> nn.Module:
    """``timm.create_model(args.model, ...)`` with each option's flag known, so errors name flags.

    Args:
        args: parsed arguments with ``model``, ``pretrained`` and ``model_kwargs``.
        flagged: model keyword argument → (the flag that set it, its value), e.g.
            ``{'f_max_iter': ('--f-max-iter', 4), 'num_classes': ('--num-classes', None)}``.
        flag_of: every DEQ option's flag (:func:`deq_flag_names`), named when an error involves
            an option the model set itself.

    Returns:
        the model.

    Raises:
        UsageError: an option given both as a flag and in ``--model-kwargs``, or a failure to build
            the model (``--pretrained`` is named when the model builds without it).
    """
    extra = dict(args.model_kwargs or {})
    clash = [k for k in extra if k in flagged]
    if clash:
        given = ', '.join(f'{k} (the flag {flagged[k][0]})' for k in clash)
        raise UsageError(f'argument --model-kwargs: {given} given in --model-kwargs as well; each option has one '
                         f'place: use the flag')
    kwargs = {k: v for k, (_, v) in flagged.items()}
    sources = {k: flag for k, (flag, _) in flagged.items()}
    sources.update({k: '--model-kwargs' for k in extra})
    pretrained = bool(getattr(args, 'pretrained', False))
    pretrained_path = getattr(args, 'pretrained_path', None)
    weights_flag = '--pretrained-path' if pretrained_path else '--pretrained'
    if pretrained_path:
        if not os.path.isfile(pretrained_path):
            raise UsageError(f'argument --pretrained-path: no such file: {pretrained_path}')
        # timm's train.py: the file as the weight source, the classifier adapted to --num-classes.
        pretrained = True
        kwargs['pretrained_cfg_overlay'] = dict(file=pretrained_path, num_classes=-1)
    try:
        return create_model(args.model, pretrained=pretrained, **kwargs, **extra)
    except Exception as err:  # turned into a usage error below; anything else building it is re-raised
        if not pretrained and not isinstance(err, (ValueError, TypeError, RuntimeError, KeyError)):
            raise
        failure = err
    _logger.debug('building the model failed', exc_info=failure)
    if pretrained:
        try:
            create_model(args.model, pretrained=False, **kwargs, **extra)
        except (ValueError, TypeError, RuntimeError, KeyError) as err:
            failure = err
        else:
            raise UsageError(f'argument {weights_flag}: {first_line(failure)}') from failure
    if isinstance(failure, TypeError) and _builds_without_deq_layer(args.model, kwargs, extra, flag_of):
        raise UsageError(f'argument --model: {args.model} has no deep equilibrium layer (it does not take the DEQ '
                         'options); these entry points train and evaluate models that hold one (the mdeq_* '
                         "family); train it with timm's own train.py") from failure
    raise UsageError(_explain_model_error(failure, args.model, sources, flag_of)) from failure


def _builds_without_deq_layer(model_name: str, kwargs: Mapping[str, Any], extra: Mapping[str, Any],
                              flag_of: Mapping[str, str]) -> bool:
    """Whether ``model_name`` builds once the DEQ options are left out, holding no equilibrium layer."""
    plain = {k: v for k, v in kwargs.items() if k not in flag_of}
    try:
        with torch.device('meta'):
            model = create_model(model_name, **plain, **extra)
    except Exception:  # it fails for another reason: the original error explains it
        return False
    return not deq_layers(model)


def first_line(err: BaseException) -> str:
    """An exception's message in one line (its type when it has none): torch's state-dict
    mismatch errors, which run to hundreds of lines, as counts and the first mismatch.

    Args:
        err: the exception.

    Returns:
        the line.
    """
    text = str(err).strip() or type(err).__name__
    if not text.startswith('Error(s) in loading state_dict'):
        return text.splitlines()[0]
    sizes = re.findall(r'size mismatch for (\S+): copying a param with shape (\S+ ?\S*) from checkpoint, '
                       r'the shape in current model is (\S+ ?\S*)\.', text)
    missing = re.search(r'Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)', text, re.S)
    unexpected = re.search(r'Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)', text, re.S)
    parts = []
    if sizes:
        name, ckpt, own = sizes[0]
        parts.append(f'{len(sizes)} tensors of other shapes (first: {name}, {ckpt} in the file, {own} in the model)')
    for label, match in (('missing', missing), ('unexpected', unexpected)):
        if match:
            keys = match.group(1).split(', ')
            parts.append(f'{len(keys)} {label} keys (first: {keys[0]})')
    return ('the weights do not fit the model: ' + '; '.join(parts) +
            ' (a checkpoint of another variant or configuration?)')


def load_weights(model: nn.Module, path: str, flag: str, use_ema: bool = True) -> None:
    """timm's ``load_checkpoint`` (EMA weights first when ``use_ema`` and present) through the
    model's checkpoint filter, as timm's pretrained loading applies it (so an MDEQ in the
    ``'original'`` layout reads the authors' MDEQ-Vision files), reporting a missing or
    unloadable file as a usage error.

    Args:
        model: the model to load into.
        path: the checkpoint file.
        flag: the flag that named it.
        use_ema: prefer the checkpoint's EMA weights.

    Raises:
        UsageError: no such file, or its weights do not fit the model.
    """
    if not os.path.isfile(path):
        raise UsageError(f'argument {flag}: no such file: {path}')
    filter_fn = checkpoint_filter_fn if isinstance(model, MDEQ) else None
    try:
        load_checkpoint(model, path, use_ema=use_ema, filter_fn=filter_fn)
    except Exception as err:  # unpickling, key or shape mismatches: all mean this file does not fit
        raise UsageError(f'argument {flag}: cannot load {path} into the model: {first_line(err)}') from err


def prepare_model(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype],
                  channels_last: bool) -> nn.Module:
    """Move the model to its device, dtype and memory format, as timm's scripts do.

    Args:
        model: the model (moved in place).
        device: its device.
        dtype: its dtype (``--model-dtype``), or None to keep float32.
        channels_last: convert its 4-d parameters and buffers to the channels_last format.

    Returns:
        the model.
    """
    model.to(device=device, dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class InputFormat:
    """A loader whose input batches arrive in the model's dtype and memory format.

    timm's training loop converts each batch itself; the engine here uses batches as the loader
    gives them, so the conversion happens here. Everything else is the wrapped loader's.

    Args:
        loader: the loader (timm's ``create_loader`` result).
        dtype: the input dtype, or None to keep it.
        channels_last: make 4-d inputs channels_last.
    """

    def __init__(self, loader: Iterable, dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> None:
        self.loader = loader
        self.dtype = dtype
        self.channels_last = channels_last

    def __iter__(self):
        for input, target in self.loader:
            if self.dtype is not None:
                input = input.to(self.dtype)
            if self.channels_last and input.dim() == 4:
                input = input.contiguous(memory_format=torch.channels_last)
            yield input, target

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == 'loader':  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)


def wrap_loader(loader, dtype: Optional[torch.dtype], channels_last: bool, prefetcher: bool):
    """``loader`` itself when its batches already fit, else an :class:`InputFormat` around it.

    Args:
        loader: timm's loader.
        dtype: the model dtype (None: float32); timm's prefetcher already converts to it.
        channels_last: the model is channels_last.
        prefetcher: ``loader`` is timm's prefetcher, created with ``img_dtype=dtype``.

    Returns:
        the loader to iterate.
    """
    cast = dtype if (dtype is not None and not prefetcher) else None
    if cast is None and not channels_last:
        return loader
    return InputFormat(loader, dtype=cast, channels_last=channels_last)
