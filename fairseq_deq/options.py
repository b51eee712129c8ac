"""fairseq config fields for the equilibrium layer, generated from :class:`deq_core.DEQConfig`.

Every DEQConfig field becomes a fairseq dataclass field (and so a ``--flag``) of the same name,
help and default, so ``--f-max-iter``, ``--jac-weight`` or ``--pretrain-steps`` mean the same as
in :func:`deq_core.cli.add_deq_args`. Two adaptations to fairseq's config system: the solver-option
dicts are strings ``"m=5,beta=1.0"``, and a switch that is on by default is exposed as
``--no-<name>`` (the flag deq_core's command line uses to turn it off), because fairseq turns
``--<name>`` of a default-True boolean into "set to False". The ``seed`` of the layer's per-step
random decisions is fairseq's own ``--seed`` (fairseq defines that flag first).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from deq_core import DEQConfig, DEQFlag, OptionError, config_from_args, deq_flags

__all__ = ["DEQOptions", "DEQ_FIELD_NAMES", "DEQ_FLAGS", "deq_options", "deq_config_from"]

#: The DEQConfig fields as fairseq config fields (a default-True switch as ``no_<name>``).
DEQ_FLAGS: Tuple[DEQFlag, ...] = deq_flags(negate_true_switches=True)

#: fairseq field name -> DEQConfig field name.
DEQ_FIELD_NAMES: Dict[str, str] = {spec.dest: spec.field for spec in DEQ_FLAGS}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _fairseq_field(spec: DEQFlag, default: Any, by_architecture: bool = False) -> Tuple[str, Any, dataclasses.Field]:
    """(name, type, field) of the fairseq field that carries DEQConfig field ``spec.field`` with
    ``default``; ``by_architecture``: the field is None unless given (the architecture sets it)."""
    meta = spec.meta
    kind, help_text = meta["kind"], meta["help"]
    if by_architecture:
        if kind in (bool, dict) or spec.field == "seed":
            raise ValueError(f"{spec.field} cannot be set by an architecture (a switch, solver options or the seed)")
        choices = meta["choices"]
        kind = ChoiceEnum(list(choices)) if isinstance(choices, tuple) else kind
        return spec.dest, Optional[kind], dataclasses.field(
            default=None, metadata={"help": f"{help_text} (default: the architecture's)"})
    if spec.field == "seed":  # fairseq's own --seed, also in hydra configs
        return spec.dest, int, dataclasses.field(default=II("common.seed"), metadata={"help": help_text})
    if kind is bool:
        if spec.negated:
            help_text, default = f"turn off: {help_text}", not default
        return spec.dest, bool, dataclasses.field(default=default, metadata={"help": help_text})
    if kind is dict:
        text = ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        return spec.dest, str, dataclasses.field(
            default=text or "", metadata={"help": f"{help_text}, written key=value[,key=value...]"})
    choices = meta["choices"]
    if isinstance(choices, tuple):
        return spec.dest, ChoiceEnum(list(choices)), dataclasses.field(default=default, metadata={"help": help_text})
    kind_type = Optional[kind] if meta["optional"] else kind
    return spec.dest, kind_type, dataclasses.field(default=default, metadata={"help": help_text})


def deq_options(name: str = "DEQOptions", by_architecture: Iterable[str] = (), **defaults: Any) -> type:
    """A fairseq dataclass with one field per DEQConfig field (and so one ``--flag``).

    Args:
        name: the dataclass's name.
        by_architecture: DEQConfig fields whose defaults a model's architecture functions state:
            these fields are None unless given, so that an architecture named in a hydra config
            (``model._name``), where fairseq fills in the dataclass defaults before the
            architecture function runs, still sets them.
        **defaults: DEQConfig field names and the defaults the fields take instead of
            DEQConfig's (a model's own defaults, e.g. ``f_stop_mode="rel"``); solver options as
            ``"key=value,..."`` strings.

    Returns:
        the dataclass, a subclass of ``FairseqDataclass``.
    """
    names = DEQConfig.field_names()
    by_architecture = set(by_architecture)
    unknown = sorted((set(defaults) | by_architecture) - set(names))
    if unknown:
        raise ValueError(f"unknown DEQ option(s) {unknown}; accepted: {', '.join(names)}")
    by_name = {f.name: f for f in dataclasses.fields(DEQConfig)}
    fields = [_fairseq_field(spec, defaults.get(spec.field, _default(by_name[spec.field])),
                             spec.field in by_architecture) for spec in DEQ_FLAGS]
    options = dataclasses.make_dataclass(name, fields, bases=(FairseqDataclass,))
    options.__doc__ = "The equilibrium layer's options (one per DEQConfig field) as fairseq config fields."
    return options


DEQOptions = deq_options()


def deq_config_from(cfg: Any) -> DEQConfig:
    """Build and validate the layer's :class:`~deq_core.DEQConfig` from a fairseq model config.

    ``cfg`` is an omegaconf DictConfig or an argparse Namespace; fields it lacks keep DEQConfig's
    default. Invalid values raise deq_core's error naming the field and its flag.
    """
    try:
        return config_from_args(cfg, DEQ_FLAGS)
    except OptionError as err:
        hint = f" (command-line flag {', '.join(err.flags)})" if getattr(err, "flags", None) else ""
        raise type(err)(f"{err}{hint}", *err.options) from None
