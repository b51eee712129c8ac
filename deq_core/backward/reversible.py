"""The reversible mode: a coupled fixed-point iteration that the backward pass runs in reverse
(McCallum, Arora and Foster 2025, "Reversible Deep Equilibrium Models"), for exact gradients of
the finite iteration with memory independent of its length."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

import torch

from ..errors import OptionValueError
from ..flat_map import FlatMap, equilibrium_pass, pass_draws
from ..solvers import SolverResult, residuals
from ..solvers.precision import AutocastBoundary
from .base import BackwardMode, ForwardPass, Unread
from .registry import register_backward

if TYPE_CHECKING:
    from ..config import DEQConfig
    from ..stats import DEQStats

__all__ = ["ReversibleBackward", "reversible_iteration"]

# The forward-solve fields the reversible iteration does not read: it runs a fixed number of
# coupled steps of its own, with no solver, no jittered limit and no compiled evaluations.
_SOLVER_FIELDS = ("f_solver", "f_max_iter", "f_solver_options", "f_max_iter_jitter", "eval_max_iter", "check_every",
                  "compile_f")


def reversible_iteration(fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, beta: float,
                         steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The coupled iteration from ``y0 = z0`` (no gradients are recorded):
    ``y <- (1 - beta) y + beta f(z)``, then ``z <- (1 - beta) z + beta f(y)``, ``steps`` times.

    Args:
        fn: the flat map.
        z0: the flat initial state.
        beta: the relaxation, in (0, 2) and not 1.
        steps: the number of coupled steps (two evaluations of ``fn`` each).

    Returns:
        ``(y_N, z_N)``.
    """
    with torch.no_grad():
        y = z = z0
        for _ in range(steps):
            y = torch.lerp(y, fn(z).to(y.dtype), beta)
            z = torch.lerp(z, fn(y).to(z.dtype), beta)
    return y, z


@register_backward("reversible")
class ReversibleBackward(BackwardMode):
    """The reversible equilibrium iteration: from ``y0 = z0``, ``reversible_steps`` coupled steps

    ``y_{n+1} = (1 - b) y_n + b f(z_n)``, ``z_{n+1} = (1 - b) z_n + b f(y_{n+1})`` (b =
    ``reversible_beta``),

    run without a graph, in float64 whatever f's precision (f sees the state cast to its own
    dtype); the output is ``f(z_N)`` (f at the returned state, as in every mode).
    Each step inverts algebraically, ``z_n = (z_{n+1} - b f(y_{n+1})) / (1 - b)`` and then
    ``y_n = (y_{n+1} - b f(z_n)) / (1 - b)``, so the backward pass rebuilds the trajectory from
    the last states, one step at a time, and backpropagates through each step with one
    vector-Jacobian product per evaluation of f: the gradient of the finite iteration, exact up
    to the reconstruction's rounding, with memory independent of the step count (three float64
    states are kept: y_N, z_N and z0) and twice the forward's evaluations in time.

    The step count is fixed, in training and evaluation alike (the paper's choice): every sample
    takes the same steps, so the reversal needs no per-sample bookkeeping, runs without a single
    host read, keeps a causal f exactly causal with ``sample_dims=2``, and costs what it costs
    whatever the data. The forward statistics report the residual of ``z_N`` against ``f_tol``
    (``eval_tol`` in evaluation) and ``2 N + 1`` evaluations.

    The reconstruction divides by ``1 - b`` at every step, so rounding grows by about
    ``1 / |1 - b|`` per step on the way back. The backward statistics say how well it went, per
    batch element: ``b_steps`` counts its vector-Jacobian products (2 N), ``b_abs_res`` is the
    error of the rebuilt initial state (the largest of ``||y_0' - z0||`` and ``||z_0' - z0||``),
    ``b_rel_res`` that error over ``||z_N||``, and ``b_diverged`` marks a reconstruction that is not
    finite. A large ``b_rel_res`` means the gradient is inexact: take fewer steps or a ``b``
    further from 1. f must be deterministic within a pass (variational dropout is: the backward
    pass reuses the forward's masks; a plain ``nn.Dropout`` inside f is not, and shows there).

    JR, when the pass computes it, is the estimate at ``z_N``, differentiated exactly (through f
    there and through the reversed iteration). Fixed-point correction and spectral normalization
    are refused (correction supervises a solver's iterates; the spectral norm's power iteration
    advances whenever the weights are recomputed, which the backward pass does).
    """

    reads = ("reversible_beta", "reversible_steps")

    @classmethod
    def check(cls, config: "DEQConfig") -> None:
        beta = config.reversible_beta
        if not 0.0 < beta < 2.0 or beta == 1.0:
            raise OptionValueError(f"reversible_beta must be in (0, 2) and not 1 (the reversal divides by "
                                   f"1 - reversible_beta), got {beta!r}", "reversible_beta")
        if config.fp_correction:
            raise OptionValueError(
                "backward='reversible' does not run fixed-point correction (fp_correction_states="
                f"{config.fp_correction_states}, fp_correction_steps={config.fp_correction_steps!r}): correction "
                "supervises a forward solver's intermediate iterates, and the reversible iteration has none; "
                "set fp_correction_states=0 and fp_correction_steps='', or use backward='implicit' or 'phantom'",
                "fp_correction_states", "fp_correction_steps")
        if config.spectral_norm:
            raise OptionValueError(
                "backward='reversible' cannot run with spectral_norm=True: the backward pass recomputes f's "
                "weights, and the spectral norm's power iteration advances at every training computation, so the "
                "reversed steps would run with other weights than the forward ones; use weight norm, or "
                "backward='implicit'", "spectral_norm", "backward")

    @classmethod
    def unread(cls, config: "DEQConfig") -> Optional[Unread]:
        """The forward solver's fields: the reversible mode runs its own fixed-length iteration."""
        return ("backward='reversible'", _SOLVER_FIELDS,
                "the reversible mode runs reversible_steps coupled steps, with no solver")

    def solve(self, fp: ForwardPass) -> Tuple[SolverResult, int]:
        cfg = fp.config
        steps = cfg.reversible_steps
        self._z0 = fp.z0.to(_iteration_dtype(fp.z0))
        self._y, self._z = reversible_iteration(fp.fn, self._z0, cfg.reversible_beta, steps)
        self._fz = None
        if not fp.grad:
            with torch.no_grad():
                self._fz = fp.fn(self._z)
        tol = cfg.f_tol if fp.training else (cfg.eval_tol or cfg.f_tol)
        result = _outcome(self._z.to(fp.z0.dtype), self._fz, 2 * steps + 1, tol, cfg.f_stop_mode)
        return result, 2 * steps + 1

    def attach(self, fp: ForwardPass, result: SolverResult,
               stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not fp.grad:
            return self._fz, None
        cfg = fp.config
        leaves = _leaves(fp.fn)
        z_n = _Reverse.apply(self._z0, self._y, self._z, fp.fn, cfg.reversible_beta, cfg.reversible_steps, stats,
                             *leaves).to(fp.z0.dtype)
        if not z_n.requires_grad:  # nothing upstream needs a gradient; JR still differentiates at z_N
            z_n.requires_grad_(fp.jac_on)
        f_out = fp.fn(z_n)
        fz = f_out.detach()
        tol = cfg.f_tol if fp.training else (cfg.eval_tol or cfg.f_tol)
        done = _outcome(z_n.detach(), fz, result.steps, tol, cfg.f_stop_mode)
        stats.f_abs_res, stats.f_rel_res = done.abs_res, done.rel_res
        stats.f_converged, stats.f_diverged = done.converged, done.diverged
        return f_out, fp.jac(f_out, z_n)


def _iteration_dtype(z0: torch.Tensor) -> torch.dtype:
    """float64, where the device has it: the rounding of each step's arithmetic is what the
    reversal amplifies, and f (run in its own precision on the cast state) recomputes the same
    values from a state rebuilt to float64 accuracy."""
    return z0.dtype if z0.device.type == "mps" else torch.float64


def _outcome(z: torch.Tensor, fz: Optional[torch.Tensor], steps: Any, tol: float, stop_mode: str) -> SolverResult:
    """The forward statistics of the iteration's last state: its residuals once ``fz`` is known
    (NaN placeholders until then), converged within ``tol``, diverged where not finite."""
    if fz is None:
        nan = torch.full((z.shape[0],), float("nan"), dtype=z.dtype, device=z.device)
        abs_res, rel_res = nan, nan.clone()
    else:
        abs_res, rel_res = residuals(z, fz)
    res = abs_res if stop_mode == "abs" else rel_res
    finite = torch.isfinite(z).all(dim=1) & torch.isfinite(res)
    if not isinstance(steps, torch.Tensor):
        steps = torch.full((z.shape[0],), steps, dtype=torch.int32, device=z.device)
    return SolverResult(z=z, fz=fz, steps=steps, abs_res=abs_res, rel_res=rel_res, converged=finite & (res <= tol),
                        diverged=~finite if fz is not None else ~torch.isfinite(z).all(dim=1))


def _leaves(fn: FlatMap) -> List[torch.Tensor]:
    """What f's value depends on besides the state and that gradients reach: its parameters and
    its tensor inputs that require grad (in the order the backward pass returns them)."""
    out: List[torch.Tensor] = [p for p in fn.f.parameters() if p.requires_grad]
    stack: List[Any] = [*fn.inputs, *fn.kwargs.values()]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                out.append(x)
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
    return out


class _Reverse(torch.autograd.Function):
    """``z_N`` of the coupled iteration (computed already, without a graph), whose backward pass
    rebuilds the trajectory from ``(y_N, z_N)`` and carries the incoming gradient back through
    every step to f's parameters and inputs (``leaves``)."""

    @staticmethod
    def forward(ctx, z0: torch.Tensor, y_n: torch.Tensor, z_n: torch.Tensor, fn: FlatMap, beta: float, steps: int,
                stats: "DEQStats", *leaves: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z0, y_n, z_n, *leaves)
        ctx.fn, ctx.beta, ctx.steps, ctx.stats = fn, beta, steps, stats
        ctx.draws = pass_draws(fn.f)
        return z_n.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "backward='reversible' does not support higher-order gradients (a backward with create_graph=True "
                "through a DEQLayer): its backward pass rebuilds the forward trajectory step by step rather than "
                "keeping a graph. Use backward='unrolled', whose gradient is an ordinary autograd graph")
        z0, y, z, *leaves = ctx.saved_tensors
        fn, beta = ctx.fn, ctx.beta
        keep = 1.0 - beta
        g_z, g_y = grad.to(z.dtype), torch.zeros_like(z)
        g_leaves: List[Optional[torch.Tensor]] = [None] * len(leaves)

        def step_back(x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            """``f(x)`` (detached) and the vector-Jacobian product of ``beta f`` at ``x`` with ``g``,
            the leaves' parts accumulated."""
            x = x.detach().requires_grad_()
            fx = fn(x)
            # retain_graph: the pass's parametrized weights (computed once) serve every step
            grads = torch.autograd.grad(fx, (x, *leaves), (g * beta).to(fx.dtype), allow_unused=True,
                                        retain_graph=True)
            for i, gl in enumerate(grads[1:]):
                if gl is not None:
                    g_leaves[i] = gl if g_leaves[i] is None else g_leaves[i] + gl
            return fx.detach().to(x.dtype), grads[0]

        # Grad mode first: the pass computes f's parametrized weights on entry, with a graph to their parameters.
        with torch.enable_grad(), equilibrium_pass(fn.f, replay=ctx.draws), AutocastBoundary(z.device.type).outside():
            for _ in range(ctx.steps):
                # z_{n+1} = (1 - b) z_n + b f(y_{n+1})
                f_y, vjp = step_back(y, g_z)
                g_y = g_y + vjp
                z = (z - beta * f_y) / keep
                # y_{n+1} = (1 - b) y_n + b f(z_n)
                f_z, vjp = step_back(z, g_y)
                g_z = keep * g_z + vjp
                g_y = keep * g_y
                y = (y - beta * f_z) / keep
        groups = fn.groups
        per_element = (groups, z0.numel() // max(groups, 1))
        error = torch.maximum((y - z0).reshape(per_element).norm(dim=1), (z - z0).reshape(per_element).norm(dim=1))
        scale = ctx.saved_tensors[2].reshape(per_element).norm(dim=1)
        ctx.stats.record_reversal(error, error / scale.clamp_min(torch.finfo(scale.dtype).tiny), 2 * ctx.steps)
        return (None, None, None, None, None, None, None, *g_leaves)
