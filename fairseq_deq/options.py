"""fairseq config fields for the equilibrium layer, generated from :class:`deq_core.DEQConfig`.

Every DEQConfig field becomes a fairseq dataclass field (and so a ``--flag``) of the same name,
help and default, so ``--f-max-iter``, ``--jac-weight`` or ``--pretrain-steps`` mean the same as
in :func:`deq_core.add_deq_args`. Two adaptations to fairseq's config system: the solver-option
dicts are strings ``"m=5,beta=1.0"``, and a switch that is on by default is exposed as
``--no-<name>`` (the flag deq_core's command line uses to turn it off), because fairseq turns
``--<name>`` of a default-True boolean into "set to False". The ``seed`` of the layer's per-step
random decisions is fairseq's own ``--seed`` (fairseq defines that flag first).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from deq_core import DEQConfig
from deq_core import parse_solver_options as core_parse_solver_options

__all__ = ["DEQOptions", "DEQ_FIELD_NAMES", "deq_options", "deq_config_from", "parse_solver_options"]

_NEGATED_PREFIX = "no_"


def _fairseq_name(f: dataclasses.Field) -> str:
    if f.metadata["kind"] is bool and f.default is True:
        return _NEGATED_PREFIX + f.name
    return f.name


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _fairseq_field(f: dataclasses.Field, default: Any) -> Tuple[str, Any, dataclasses.Field]:
    """(name, type, field) of the fairseq field that carries DEQConfig field ``f`` with ``default``."""
    meta = f.metadata
    kind, help_text = meta["kind"], meta["help"]
    name = _fairseq_name(f)
    if f.name == "seed":  # fairseq's own --seed, also in hydra configs
        return name, int, dataclasses.field(default=II("common.seed"), metadata={"help": help_text})
    if kind is bool:
        if name != f.name:  # a no_<name> switch holds the negation
            help_text, default = f"turn off: {help_text}", not default
        return name, bool, dataclasses.field(default=default, metadata={"help": help_text})
    if kind is dict:
        return name, str, dataclasses.field(
            default=default or "", metadata={"help": f"{help_text}, written key=value[,key=value...]"})
    choices = meta["choices"]
    if isinstance(choices, tuple):
        return name, ChoiceEnum(list(choices)), dataclasses.field(
            default=default, metadata={"help": help_text})
    kind_type = Optional[kind] if meta["optional"] else kind
    return name, kind_type, dataclasses.field(default=default, metadata={"help": help_text})


def deq_options(name: str = "DEQOptions", **defaults: Any) -> type:
    """A fairseq dataclass with one field per DEQConfig field (and so one ``--flag``).

    Args:
        name: the dataclass's name.
        **defaults: DEQConfig field names and the defaults the fields take instead of
            DEQConfig's (a model's own defaults, e.g. ``f_stop_mode="rel"``); solver options as
            ``"key=value,..."`` strings.

    Returns:
        the dataclass, a subclass of ``FairseqDataclass``.
    """
    names = DEQConfig.field_names()
    unknown = sorted(set(defaults) - set(names))
    if unknown:
        raise ValueError(f"unknown DEQ option(s) {unknown}; accepted: {', '.join(names)}")
    fields = [_fairseq_field(f, defaults.get(f.name, _default(f))) for f in dataclasses.fields(DEQConfig)]
    options = dataclasses.make_dataclass(name, fields, bases=(FairseqDataclass,))
    options.__doc__ = "The equilibrium layer's options (one per DEQConfig field) as fairseq config fields."
    return options


DEQOptions = deq_options()

_MISSING = object()

#: fairseq field name -> DEQConfig field name.
DEQ_FIELD_NAMES: Dict[str, str] = {_fairseq_name(f): f.name for f in dataclasses.fields(DEQConfig)}


def parse_solver_options(text: str, field: str) -> Dict[str, Any]:
    """``"m=5,beta=1.0"`` -> ``{"m": 5, "beta": 1.0}``; a malformed item raises naming ``field``."""
    if not isinstance(text, str):
        raise TypeError(f"{field} must be a string key=value[,key=value...], got {text!r}")
    try:
        return core_parse_solver_options(text)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{field}: {err} (e.g. 'm=5,beta=1.0')") from None


def deq_config_from(cfg: Any) -> DEQConfig:
    """Build and validate the layer's :class:`DEQConfig` from a fairseq model config.

    ``cfg`` is an omegaconf DictConfig or an argparse Namespace; fields it lacks keep DEQConfig's
    default. Invalid values raise deq_core's error naming the field.
    """
    values: Dict[str, Any] = {}
    for fs_name, core_name in DEQ_FIELD_NAMES.items():
        value = getattr(cfg, fs_name, _MISSING)
        if value is _MISSING:
            continue
        if isinstance(value, Enum):
            value = value.value
        if fs_name != core_name:  # a no_<name> switch
            value = not value
        elif core_name.endswith("_solver_options"):
            value = parse_solver_options(value, fs_name)
        values[core_name] = value
    try:
        return DEQConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        flags = [_flag(fs) for fs, core in DEQ_FIELD_NAMES.items() if re.search(rf"\b{core}\b", str(err))]
        hint = f" (command-line flag {', '.join(flags)})" if flags else ""
        raise type(err)(f"{err}{hint}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


