"""Command-line adapters of :class:`~deq_core.DEQConfig`: one flag per field, for argparse and for
fairseq's dataclass configs, and the way back from parsed values to a validated config whose
errors name the flags.

A field ``f_max_iter`` is the flag ``--f-max-iter``; a solver-options field takes
``key=value[,key=value]`` text; a boolean field is ``--name/--no-name`` in argparse, and with
``negate_true_switches`` (fairseq, which turns ``--name`` of a default-True boolean into "set to
False") a default-True switch is carried as ``no_<name>`` instead.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .config import DEQConfig
from .errors import OptionError, OptionTypeError, OptionValueError

__all__ = ["DEQFlag", "deq_flags", "add_deq_args", "config_from_args", "flags_of", "parse_solver_options"]

_NEGATED_PREFIX = "no_"


@dataclass(frozen=True)
class DEQFlag:
    """How one :class:`~deq_core.DEQConfig` field appears on a command line.

    Attributes:
        field: the config field.
        dest: the attribute its parsed value lands in (``prefix + field``, or ``no_<field>``).
        negated: the value is the field's negation (a default-True switch as ``no_<field>``).
    """

    field: str
    dest: str
    negated: bool = False

    @property
    def flag(self) -> str:
        """The flag, ``--`` and the destination with dashes."""
        return "--" + self.dest.replace("_", "-")

    @property
    def meta(self) -> Mapping[str, Any]:
        """The field's schema (help, kind, choices, range, optional)."""
        return next(f for f in dataclasses.fields(DEQConfig) if f.name == self.field).metadata


def deq_flags(prefix: str = "", negate_true_switches: bool = False, exclude: Iterable[str] = ()) -> Tuple[DEQFlag, ...]:
    """The flags of every config field.

    Args:
        prefix: prepended to each destination.
        negate_true_switches: carry a default-True boolean as ``no_<field>``.
        exclude: fields without a flag.

    Returns:
        one :class:`DEQFlag` per field, in declaration order.
    """
    skip = set(exclude)
    out = []
    for f in dataclasses.fields(DEQConfig):
        if f.name in skip:
            continue
        negated = negate_true_switches and f.metadata["kind"] is bool and f.default is True
        out.append(DEQFlag(f.name, (_NEGATED_PREFIX if negated else prefix) + f.name, negated))
    return tuple(out)


def parse_solver_options(text: str) -> Dict[str, Any]:
    """Parse ``key=value,key=value`` (values as Python literals) for the solver-options flags.

    Args:
        text: the flag's text.

    Returns:
        the options; a malformed item raises ``argparse.ArgumentTypeError``.
    """
    out: Dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"solver option {item!r} must be written key=value")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


class _DefaultOptions(dict):
    """The default of a solver-options flag, which remembers the solver whose options it holds."""

    def __init__(self, options: Mapping[str, Any], solver: str) -> None:
        super().__init__(options)
        self.solver = solver


def add_deq_args(parser: argparse.ArgumentParser, prefix: str = "", defaults: Optional[DEQConfig] = None,
                 exclude: Iterable[str] = (), suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """Add one ``--{prefix}{field}`` flag (dashes for underscores) per config field to ``parser``.

    Values are parsed but validated only by :func:`config_from_args`, so every error message
    comes from one place.

    Args:
        parser: the parser.
        prefix: the flags' prefix.
        defaults: the config whose values are the flags' defaults (default: the field defaults).
        exclude: fields without a flag.
        suppress_defaults: a flag the user did not give leaves no attribute, so the namespace holds
            only explicit choices (to overlay on a model's own defaults).

    Returns:
        ``parser``.
    """
    defaults = defaults or DEQConfig()
    group = parser.add_argument_group("deep equilibrium layer")
    for spec in deq_flags(prefix, exclude=exclude):
        meta = spec.meta
        default = getattr(defaults, spec.field)
        if meta["kind"] is dict:
            default = _DefaultOptions(default, getattr(defaults, spec.field.replace("_options", "")))
        kw: Dict[str, Any] = {"default": argparse.SUPPRESS if suppress_defaults else default,
                              "dest": spec.dest, "help": meta["help"]}
        kind = meta["kind"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kw["type"] = parse_solver_options
            kw["metavar"] = "KEY=VALUE[,...]"
        elif meta["optional"]:
            kw["type"] = _optional(kind)
        else:
            kw["type"] = kind
        if isinstance(meta["choices"], tuple):
            kw["choices"] = meta["choices"]
        group.add_argument(spec.flag, **kw)
    return parser


def config_from_args(args: Any, flags: Optional[Iterable[DEQFlag]] = None, base: Optional[DEQConfig] = None
                     ) -> DEQConfig:
    """Build a config from parsed command-line values.

    Args:
        args: an argparse namespace (as filled by :func:`add_deq_args`) or a fairseq config; only
            the flags' destinations are read, and a missing one keeps the base's value.
        flags: the flags (default: :func:`deq_flags`); a negated switch is inverted, solver
            options given as text are parsed, enum values unwrapped.
        base: the config the given values override (default: the field defaults).

    Returns:
        the validated config. A refused value raises the config's
        :class:`~deq_core.OptionError`, whose ``flags`` attribute lists the flags of the
        options it names (see :func:`flags_of`).
    """
    flags = tuple(deq_flags() if flags is None else flags)
    values: Dict[str, Any] = {}
    for spec in flags:
        if not hasattr(args, spec.dest):
            continue
        value = getattr(args, spec.dest)
        if isinstance(value, Enum):
            value = value.value
        if spec.negated:
            value = not value
        elif spec.meta["kind"] is dict and isinstance(value, str):
            try:
                value = parse_solver_options(value)
            except argparse.ArgumentTypeError as err:
                raise _with_flags(ValueError(f"{spec.field}: {err} (e.g. 'm=5,beta=1.0')"), (spec.field,), flags)
        values[spec.field] = value
    for side in ("f", "b"):
        # The parser's default options belong to its default solver: another one chosen on the
        # command line gets its own defaults (as from_dict gives a new solver without options).
        options = values.get(f"{side}_solver_options")
        if isinstance(options, _DefaultOptions) and values.get(f"{side}_solver", options.solver) != options.solver:
            del values[f"{side}_solver_options"]
    try:
        return DEQConfig.from_dict(values, base=base)
    except OptionError as err:
        raise _with_flags(err, err.options, flags) from None


def flags_of(options: Iterable[str], flags: Iterable[DEQFlag]) -> List[str]:
    """The flags that set ``options`` (config fields), in order; fields without a flag are left out.

    Args:
        options: config field names (an :class:`~deq_core.OptionError`'s ``options``).
        flags: the command line's flags.

    Returns:
        the flags, e.g. ``["--f-max-iter-jitter", "--f-max-iter"]``.
    """
    by_field = {spec.field: spec.flag for spec in flags}
    return [by_field[name] for name in options if name in by_field]


def _with_flags(err: Exception, options: Iterable[str], flags: Iterable[DEQFlag]) -> Exception:
    """``err`` as an :class:`~deq_core.OptionError` of its kind carrying ``flags``."""
    options = tuple(options)
    if not isinstance(err, OptionError):
        err = (OptionTypeError if isinstance(err, TypeError) else OptionValueError)(str(err), *options)
    err.flags = flags_of(options, flags)
    return err


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse
