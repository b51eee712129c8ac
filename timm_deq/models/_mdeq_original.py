"""Checkpoints of the authors' MDEQ-Vision classifier (``MDEQClsNet``) for MDEQ's original layout.

The original code names the stem ``downsample`` (conv, BN, ReLU, conv, BN, ReLU) and ``stage0``
(the 1x1 projection), the equilibrium layer ``fullstage`` (``branches.{i}.blocks.0``,
``fuse_layers.{to}.{from}.net``, ``post_fuse_layers``) and the head ``incre_modules``,
``downsamp_modules``, ``final_layer`` and ``classifier``. Its weight norm stores ``weight_g``
(``[C_out, 1, 1, 1]``) and ``weight_v``, as torch's ``weight_norm`` parametrization stores
``parametrizations.weight.original0`` and ``original1``. The 2020 code (locuslab/mdeq) also
stores two derived copies of the equilibrium layer (``fullstage_copy.*``, the weight-normalized
weights without gradient, and ``deq.func.*``/``deq.func_copy.*``, the same modules again).
"""
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from timm.models import clean_state_dict

__all__ = ['is_original_state_dict', 'convert_original_state_dict']

_STEM = {'0': 'stem.conv1', '1': 'stem.bn1', '3': 'stem.conv2', '4': 'stem.bn2'}


def _stem(m: re.Match) -> Optional[str]:
    return _STEM.get(m[1])


def _fuse_down(m: re.Match) -> Optional[str]:
    to, frm, step, part = int(m[1]), int(m[2]), int(m[3]), m[4]
    if frm >= to:
        return None
    # _Downsample is one flat Sequential: (conv, norm, ReLU) per step, the last without ReLU.
    return f'deq.f.fuse.{to}.{frm}.{3 * step + (1 if part == "gnorm" else 0)}'


def _fuse_up(m: re.Match) -> Optional[str]:
    to, frm, part = int(m[1]), int(m[2]), m[3]
    if frm <= to:
        return None
    return f'deq.f.fuse.{to}.{frm}.{"conv" if part == "conv" else "gn"}'


# (pattern on the module path, our module path); the parameter name after it is kept.
_RULES: List[Tuple[re.Pattern, Callable[[re.Match], Optional[str]]]] = [
    (re.compile(r'downsample\.(\d+)'), _stem),
    (re.compile(r'stage0\.([01])'), lambda m: f'stem.proj.{m[1]}'),
    (re.compile(r'fullstage\.branches\.(\d+)\.blocks\.0\.(conv1|gn1|conv2|gn2|gn3)'),
     lambda m: f'deq.f.blocks.{m[1]}.{m[2]}'),
    (re.compile(r'fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(\d+)\.(conv|gnorm)'), _fuse_down),
    (re.compile(r'fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(conv|gnorm)'), _fuse_up),
    (re.compile(r'fullstage\.post_fuse_layers\.(\d+)\.(conv|gnorm)'),
     lambda m: f'deq.f.post.{m[1]}.{1 if m[2] == "conv" else 2}'),
    (re.compile(r'incre_modules\.(\d+)\.0\.(.+)'), lambda m: f'incre.{m[1]}.{m[2]}'),
    (re.compile(r'downsamp_modules\.(\d+)\.([01])'), lambda m: f'downsamp.{m[1]}.{m[2]}'),
    (re.compile(r'final_layer\.([01])'), lambda m: f'final.{m[1]}'),
    (re.compile(r'classifier'), lambda m: 'fc'),
]
# Copies of the equilibrium layer that the 2020 code keeps beside ``fullstage`` (derived values).
_DERIVED = ('fullstage_copy.', 'deq.func.', 'deq.func_copy.')
_PARAM = re.compile(r'(.+)\.(weight_g|weight_v|weight|bias|running_mean|running_var|num_batches_tracked)')
_WN = 'parametrizations.weight.original'


def is_original_state_dict(state_dict: Dict[str, Any]) -> bool:
    """Whether ``state_dict`` is in the key layout of the authors' MDEQ-Vision code.

    Args:
        state_dict: a checkpoint's state dict (a ``module.`` prefix is ignored).

    Returns:
        ``True`` when some key belongs to the original equilibrium layer (``fullstage.*``) or
        injection (``stage0.*``).
    """
    return any(k.split('.', 1)[0] in ('fullstage', 'stage0') for k in clean_state_dict(state_dict))


def _module_path(key: str) -> Tuple[str, str]:
    """Our module path and parameter name for an original key, or a ``KeyError`` naming it."""
    m = _PARAM.fullmatch(key)
    if m:
        for pattern, rename in _RULES:
            hit = pattern.fullmatch(m[1])
            if hit:
                path = rename(hit)
                if path is not None:
                    return path, m[2]
    raise KeyError(key)


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.flatten(1), dim=1).view(-1, *([1] * (v.dim() - 1)))


def convert_original_state_dict(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """Map a state dict of the original ``MDEQClsNet`` onto ``model`` (an MDEQ built with
    ``layout='original'`` and the checkpoint's widths).

    Weight-normed convs of the checkpoint (``weight_g``/``weight_v``) become the model's
    ``parametrizations.weight.original0/original1``, or are folded into one ``weight`` where
    the model has no weight norm (and a plain checkpoint weight is split where it has). The
    equilibrium layer's step count, which the original code does not store, is the model's; the
    2020 code's derived copies of the equilibrium layer are left out.

    Args:
        state_dict: the original state dict (a ``module.`` prefix is ignored).
        model: the model the result is for.

    Returns:
        the state dict in the model's keys (the classifier as ``fc.*``, which timm drops when the
        model has a different number of classes).

    Raises:
        ValueError: a key the original layout does not have (more blocks per branch, more stem
            convs than two: configs this model cannot express), keys of the model the
            checkpoint lacks or the reverse, or shapes that differ (a config with other widths).
    """
    own = model.state_dict()
    sources: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in clean_state_dict(state_dict).items():
        if key.startswith(_DERIVED):
            continue
        try:
            path, name = _module_path(key)
        except KeyError:
            unknown.append(key)
            continue
        sources.setdefault(path, {})[name] = (key, value)
    if unknown:
        raise ValueError(f'{len(unknown)} key(s) of the original checkpoint have no place in the original layout '
                         f'(e.g. {unknown[:3]}); it supports one block per branch and a two-conv stem')

    out: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    for path, params in sources.items():
        normed = f'{path}.{_WN}0' in own
        if 'weight_g' in params or 'weight_v' in params:
            if 'weight_g' not in params or 'weight_v' not in params:
                raise ValueError(f'the original checkpoint has only one of {path} weight_g/weight_v')
            (kg, g), (kv, v) = params.pop('weight_g'), params.pop('weight_v')
            params.pop('weight', None)  # the original code may also keep the computed weight
            if normed:
                out[f'{path}.{_WN}0'], out[f'{path}.{_WN}1'] = g, v
                origin[f'{path}.{_WN}0'], origin[f'{path}.{_WN}1'] = kg, kv
            else:
                out[f'{path}.weight'], origin[f'{path}.weight'] = g * v / _norm_except_dim0(v), kv
        elif normed and 'weight' in params:
            kw, w = params.pop('weight')
            out[f'{path}.{_WN}0'], out[f'{path}.{_WN}1'] = _norm_except_dim0(w), w
            origin[f'{path}.{_WN}0'] = origin[f'{path}.{_WN}1'] = kw
        for name, (key, value) in params.items():
            out[f'{path}.{name}'], origin[f'{path}.{name}'] = value, key

    for key in own:
        if key.endswith('schedule_state') and key not in out:
            # A released checkpoint is a trained model: past the unrolled pretraining phase
            # (step count, epoch unknown), read from the layer's Python copy, not the buffer.
            layer = model.deq
            out[key] = own[key].new_tensor([max(layer.num_updates, layer.config.pretrain_steps), -1])
    head = ('fc.',)  # timm adapts or drops the classifier after this filter
    extra = [origin[k] for k in out if k not in own and not k.startswith(head)]
    missing = [k for k in own if k not in out and not k.startswith(head)]
    shapes = [f'{origin[k]} {tuple(out[k].shape)} for {k} {tuple(own[k].shape)}'
              for k in out if k in own and not k.startswith(head) and out[k].shape != own[k].shape]
    if extra or missing or shapes:
        problems = []
        if shapes:
            problems.append(f'{len(shapes)} shape(s) differ, e.g. {shapes[:2]}')
        if extra:
            problems.append(f'{len(extra)} checkpoint key(s) have no parameter in the model, e.g. {extra[:3]}')
        if missing:
            problems.append(f'{len(missing)} model key(s) are not in the checkpoint, e.g. {missing[:3]}')
        raise ValueError('the original checkpoint does not fit the model: ' + '; '.join(problems) + '. Build '
                         "the model with the checkpoint config's widths (channels, head_channels, num_features, "
                         "expansion, groups) and post_norm_affine (POST_GN_AFFINE), in layout='original'")
    return out
