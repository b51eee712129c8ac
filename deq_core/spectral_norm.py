"""DEQ spectral normalization: each weight divided by a power-iteration estimate of its largest
singular value, the estimate advanced once per equilibrium pass rather than per solver step."""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .norm import _describe, _fold_parametrizations

__all__ = ["apply_spectral_norm", "remove_spectral_norm", "SpectralNorm", "CONV_MODES",
           "DEFAULT_SPECTRAL_NORM_TYPES", "CONFIG_FIELDS"]

#: The DEQConfig fields a layer passes to :func:`apply_spectral_norm` (read only with spectral_norm=True).
CONFIG_FIELDS = ("spectral_norm_scale", "spectral_norm_learn_scale", "spectral_norm_clip")

DEFAULT_SPECTRAL_NORM_TYPES: Tuple[Type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: How a convolution's weight becomes a matrix: ``"kernel"``, the kernel reshaped to ``(C_out, C_in*k...)``.
CONV_MODES = ("kernel",)
# Power iterations run once when the parametrization is registered, so that the first pass
# already divides by a close estimate (u and v start as random unit vectors).
_WARMUP_ITERATIONS = 15
_INIT_SEED = 0


def _no_autocast(device_type: str):
    """Autocast switched off for ``device_type`` (the power iteration and sigma run in the
    weight's own precision, at least float32); a plain block where autocast is not on."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (RuntimeError, ValueError, TypeError):  # a device type autocast does not know (meta)
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


class SpectralNorm(nn.Module):
    """The parametrization ``W -> s * W / sigma``: ``sigma = u^T M v`` is the power-iteration
    estimate of the largest singular value of ``M``, the weight as a ``(rows, -1)`` matrix, and
    ``s`` the effective scale (see :func:`apply_spectral_norm`).

    ``u`` and ``v`` are buffers (in the state dict). Each call in training mode first advances
    them by ``n_power_iterations`` steps (``v <- M^T u / ||M^T u||``, ``u <- M v / ||M v||``,
    without gradient); in evaluation mode they stay as they are. Gradients flow through ``sigma``
    with ``u`` and ``v`` held constant (``d sigma / dM = u v^T``), as in Miyato et al. (2018).
    Register it through :func:`apply_spectral_norm`, which checks its arguments.

    Args:
        weight: the weight to be normalized (its shape, dtype and device set those of ``u``, ``v``).
        n_power_iterations: power-iteration steps per training call.
        scale: the target scale (``None``: 1).
        learn_scale: make the scale a learned parameter ``scale`` initialised to ``scale``.
        clip: bound on the scale's magnitude (``None``: none).
        eps: floor of the norms divided by (the vectors' and ``sigma``).
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, scale: Optional[float] = None,
                 learn_scale: bool = False, clip: Optional[float] = None, eps: float = 1e-12) -> None:
        super().__init__()
        self.n_power_iterations = n_power_iterations
        self.clip = clip
        self.eps = eps
        init = 1.0 if scale is None else float(scale)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(init, dtype=weight.dtype, device=weight.device))
        else:
            self.scale = init
        rows = weight.shape[0]
        cols = weight.numel() // rows
        dtype = self._compute_dtype(weight)
        # A generator of its own: applying spectral norm leaves the global random stream (and so
        # the initialization of whatever a model builds next) as it was.
        gen = torch.Generator().manual_seed(_INIT_SEED)
        with torch.no_grad():
            u = F.normalize(torch.randn(rows, dtype=dtype, generator=gen), dim=0, eps=eps).to(weight.device)
            v = F.normalize(torch.randn(cols, dtype=dtype, generator=gen), dim=0, eps=eps).to(weight.device)
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("v", v.to(weight.dtype))
        with torch.no_grad():
            self._power_iteration(self._matrix(weight.detach()), _WARMUP_ITERATIONS)

    @staticmethod
    def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
        return torch.promote_types(weight.dtype, torch.float32)

    @staticmethod
    def _matrix(weight: torch.Tensor) -> torch.Tensor:
        """The weight as a ``(rows, -1)`` matrix in the computation dtype (for a convolution's
        kernel ``(C_out, C_in, k...)``: ``(C_out, C_in * prod(k))``)."""
        return weight.reshape(weight.shape[0], -1).to(SpectralNorm._compute_dtype(weight))

    def _power_iteration(self, mat: torch.Tensor, steps: int) -> None:
        u, v = self.u.to(mat.dtype), self.v.to(mat.dtype)
        with _no_autocast(mat.device.type):
            for _ in range(steps):
                v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps)
                u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

    def effective_scale(self) -> torch.Tensor:
        """The scale the normalized weight has as its spectral norm, in magnitude: ``scale``
        clamped to ``[-clip, clip]`` when ``clip`` is set."""
        s = self.scale if isinstance(self.scale, torch.Tensor) else torch.tensor(self.scale)
        return s if self.clip is None else s.clamp(-self.clip, self.clip)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """The current estimate ``u^T M v`` of the largest singular value of ``weight``'s matrix
        (differentiable in ``weight``; ``u`` and ``v`` are not advanced)."""
        mat = self._matrix(weight)
        # Copies: a later training call updates the buffers in place, which must not change the
        # tensors this call's graph saved for its backward pass.
        u, v = self.u.to(mat.dtype).clone(), self.v.to(mat.dtype).clone()
        with _no_autocast(mat.device.type):
            return torch.dot(u, torch.mv(mat, v))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The normalized weight ``s * weight / sigma`` (advancing ``u``, ``v`` first in training mode)."""
        if self.training:
            with torch.no_grad():
                self._power_iteration(self._matrix(weight.detach()), self.n_power_iterations)
        sigma = self.sigma(weight).clamp_min(self.eps)
        if isinstance(self.scale, torch.Tensor):
            factor = self.effective_scale().to(sigma.dtype) / sigma
        else:
            s = self.scale if self.clip is None else max(-self.clip, min(self.clip, self.scale))
            factor = s / sigma
        return weight * factor.to(weight.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """Assigning to the parametrized weight sets the unnormalized weight to ``value``."""
        return value

    def extra_repr(self) -> str:
        """The settings, for ``repr``."""
        learned = isinstance(self.scale, torch.Tensor)
        scale = f"learned ({float(self.scale.detach()):g})" if learned else f"{self.scale:g}"
        return (f"n_power_iterations={self.n_power_iterations}, scale={scale}, clip={self.clip}, "
                f"eps={self.eps:g}")


def _check_positive(name: str, value, optional: bool) -> Optional[float]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        allowed = "a number > 0" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")
    return value


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    if cls.__module__ == parametrize.__name__:  # the class parametrize substitutes for a parametrized module's
        cls = cls.__mro__[1]
    return cls.__name__


def _label(module: nn.Module, qualified: str, name: str) -> str:
    """``"blocks.0.conv1.weight (Conv2d)"``, or ``"Conv2d.weight"`` for the root module."""
    return f"{qualified}.{name} ({_class_name(module)})" if qualified else f"{_class_name(module)}.{name}"


@contextlib.contextmanager
def _frozen(parametrizations: Iterable[nn.Module]) -> Iterator[None]:
    """The parametrizations in evaluation mode for the block (no power-iteration step), without
    gradient tracking."""
    modes = [(p, p.training) for p in parametrizations]
    for p, _ in modes:
        p.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for p, mode in modes:
            p.train(mode)


def apply_spectral_norm(module: nn.Module, types: Iterable[Type[nn.Module]] = DEFAULT_SPECTRAL_NORM_TYPES,
                        name: str = "weight", n_power_iterations: int = 1, scale: Optional[float] = None,
                        learn_scale: bool = False, clip: Optional[float] = None, eps: float = 1e-12,
                        conv_mode: str = "kernel") -> nn.Module:
    """Reparametrize ``name`` of ``module`` and of every submodule of one of ``types`` as
    ``s * W / sigma(W)``, ``sigma`` a power-iteration estimate of the largest singular value of W.

    The weight's matrix is W itself for a linear map and, for a convolution (``conv_mode``
    ``"kernel"``, the only one), the kernel reshaped to ``(C_out, C_in * k_1 * ... * k_d)``: its
    spectral norm is not the convolution operator's. With ``K = k_1 * ... * k_d`` kernel positions
    and zero (or circular) padding, ``||conv||_2 <= sqrt(K) * ||M||_2`` (the conv is M applied to
    the stacked input windows, and every input pixel enters at most K windows), whatever the
    stride, dilation or groups; for a stride-1, ungrouped conv also ``||conv||_2 >= ||M||_2 / sqrt(K)``
    (each kernel tap's ``(C_out, C_in)`` matrix has norm at most ``||conv||_2``, and ``||M||_2^2`` is at
    most the sum of their squares). So after normalization a 3x3 conv has operator norm at most
    ``3 * s``, a 1x1 conv exactly ``s``.

    ``u`` and ``v`` (buffers of the parametrization ``module.parametrizations.<name>[0]``, so in
    the state dict) start as random unit vectors (from a fixed seed: the global random stream is
    not used) advanced by a few power iterations at
    registration, then advance by ``n_power_iterations`` steps per computation of the weight in
    training mode and never in evaluation mode. Inside a :class:`~deq_core.DEQLayer` the weights
    are computed once per forward pass and shared by all solver iterations (through
    ``torch.nn.utils.parametrize.cached``), so the estimate advances once per forward pass.
    Gradients flow through sigma with u and v held constant.

    Args:
        module: the module whose submodules (and itself) are searched.
        types: the module classes whose parameter ``name`` is normalized.
        name: the parameter's name.
        n_power_iterations: power-iteration steps per training computation of the weight (>= 1).
        scale: the target spectral norm s of each normalized weight (> 0; ``None``: 1).
        learn_scale: make s a learned scalar parameter per weight (``parametrizations.<name>[0].scale``),
            initialised to ``scale``.
        clip: the normalized weight uses ``clamp(s, -clip, clip)`` instead of s, so its spectral
            norm is ``min(|s|, clip)``: a bound a learned scale cannot pass (its gradient is zero
            while it lies outside the bound). With a fixed scale it is ``min(scale, clip)``.
        eps: floor of the norms divided by (the power-iteration vectors' and sigma), > 0.
        conv_mode: how a convolution's weight becomes a matrix: ``"kernel"``.

    Returns:
        ``module``.

    Raises:
        ValueError: a weight already parametrized (weight norm, or spectral norm applied twice),
            no submodule of ``types``, or an out-of-range argument.
        TypeError: an argument of the wrong type.
    """
    types = tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"types must be nn.Module subclasses, got {types!r}")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
        raise TypeError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    if n_power_iterations < 1:
        raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
    scale = _check_positive("scale", scale, optional=True)
    clip = _check_positive("clip", clip, optional=True)
    eps = _check_positive("eps", eps, optional=False)
    if not isinstance(learn_scale, bool):
        raise TypeError(f"learn_scale must be bool, got {learn_scale!r}")
    if conv_mode not in CONV_MODES:
        raise ValueError(f"conv_mode must be one of {list(CONV_MODES)}, got {conv_mode!r}")
    targets = [(q, m) for q, m in module.named_modules() if isinstance(m, types)]
    if not targets:
        raise ValueError(f"no submodule of {type(module).__name__} is one of {[t.__name__ for t in types]}")
    # Every target is checked before any is changed: an error leaves the module as it was.
    for qualified, m in targets:
        where = _label(m, qualified, name)
        if parametrize.is_parametrized(m, name):
            existing = m.parametrizations[name]
            if any(isinstance(p, SpectralNorm) for p in existing):
                raise ValueError(f"{where} is already spectral-normalized (apply_spectral_norm was called on it "
                                 "before, or a DEQLayer built with spectral_norm=True applied it); call "
                                 "remove_spectral_norm first to apply it again")
            raise ValueError(
                f"{where} is already parametrized ({_describe(existing)}): spectral normalization replaces "
                "weight normalization, it does not stack on it. Build f without weight norm (timm_deq's MDEQ "
                "models: weight_norm=False, on the command line --model-kwargs weight_norm=False; fairseq_deq: "
                "--no-weight-norm) or call deq_core.remove_weight_norm(f) first")
        weight = getattr(m, name, None)
        if not isinstance(weight, nn.Parameter):
            owner = f"{qualified} ({_class_name(m)})" if qualified else _class_name(m)
            raise ValueError(f"{owner} has no parameter named {name!r}")
        if weight.dim() < 1 or weight.numel() == 0:
            raise ValueError(f"{where} has shape {tuple(weight.shape)}: spectral normalization needs a "
                             "non-empty weight of at least one dimension")
    for _, m in targets:
        sn = SpectralNorm(getattr(m, name), n_power_iterations, scale, learn_scale, clip, eps)
        sn.train(m.training)
        parametrize.register_parametrization(m, name, sn, unsafe=True)
    return module


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Fold every spectral-norm parametrization back into a plain weight (the inverse of
    :func:`apply_spectral_norm`, keeping the current normalized values: u and v do not advance).

    Other parametrizations (weight norm) are left alone; a weight holding spectral norm together
    with another parametrization raises ``ValueError``.

    Args:
        module: the module whose submodules are searched.
        name: the parametrized parameter's name.

    Returns:
        ``module``.
    """
    return _fold_parametrizations(module, name, SpectralNorm, "spectral norm", _frozen)
