"""The implicit backward: the gradient through the fixed point by a linear solve (IFT)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Tuple

import torch

from ..errors import OptionValueError
from ..solvers import InverseEstimate, SolverResult, SolveSpec, returns_inverse
from ..solvers.precision import REDUCED_PRECISION, AutocastBoundary
from .base import ForwardPass, SolvingMode, Unread
from .registry import register_backward

if TYPE_CHECKING:
    from ..config import DEQConfig
    from ..stats import DEQStats

__all__ = ["ImplicitBackward"]


@register_backward("implicit")
class ImplicitBackward(SolvingMode):
    """The implicit-function-theorem gradient: f is called once more at the detached z* with
    gradients on, and the gradient g arriving at its output is replaced by the solution u of
    ``u = u J_f(z*) + g``, solved by the backward solver (``b_solver``, ``b_max_iter``, ``b_tol``,
    ``b_stop_mode``, ``b_solver_options``) inside a custom autograd function: memory independent
    of the forward iterations.

    With ``b_init="forward_inverse"`` (``f_solver="broyden"``) the backward solve starts from the
    forward solve's own estimate of ``(I - J_f)^-1`` (SHINE, Ramzi et al. 2022): Broyden's
    ``H = -I + sum_i u_i v_i^T`` approximates the inverse Jacobian of ``f(z) - z``, so the row
    ``u = g (I - J_f)^-1`` is estimated as ``u0 = -H^T g``, per forward sample with the H the
    solver held at the sample's stop (see :func:`~deq_core.solvers.broyden`). ``b_refine_steps = k``
    then takes k backward solver steps from u0 (k + 1 vector-Jacobian products, the first
    measuring u0's residual; k = 0 returns u0), ``None`` the usual solve from there. The training
    forward keeps the estimate's vectors, at most ``2 * memory`` states per sample, until the
    backward pass; the forward's values and every other path are unchanged.
    """

    reads = ("b_solver", "b_max_iter", "b_tol", "b_stop_mode", "b_solver_options", "b_init", "b_refine_steps")
    corrects = True

    @staticmethod
    def forward_inverse(config: "DEQConfig") -> bool:
        """Whether the backward solve starts from the forward solver's inverse-Jacobian estimate."""
        return config.b_init == "forward_inverse"

    @classmethod
    def check(cls, config: "DEQConfig") -> None:
        if cls.forward_inverse(config) and not returns_inverse(config.f_solver):
            raise OptionValueError(
                f"b_init='forward_inverse' applies the forward solver's inverse-Jacobian estimate, which "
                f"f_solver={config.f_solver!r} does not keep: set f_solver='broyden' (the quasi-Newton solver, whose "
                "low-rank estimate it uses), or b_init='zero'", "b_init", "f_solver")

    @classmethod
    def unread(cls, config: "DEQConfig") -> Optional[Unread]:
        """b_refine_steps without the forward's estimate; b_max_iter when b_refine_steps replaces
        it; the solver and its options at 0 refinement steps (only the estimate's residual is measured)."""
        if not cls.forward_inverse(config):
            return (f"b_init={config.b_init!r}", ("b_refine_steps",),
                    "b_refine_steps is read with b_init='forward_inverse' only")
        if config.b_refine_steps is None:
            return None
        setting = f"b_init={config.b_init!r} with b_refine_steps={config.b_refine_steps}"
        if config.b_refine_steps == 0:
            return (setting, ("b_max_iter", "b_solver", "b_solver_options"),
                    "b_refine_steps replaces b_max_iter, and at 0 steps no backward solver runs")
        return setting, ("b_max_iter",), "b_refine_steps replaces b_max_iter"

    @classmethod
    def backward_solve(cls, config: "DEQConfig") -> SolveSpec:
        """The backward pass's linear solve: at most ``b_max_iter`` evaluations, or
        ``b_refine_steps + 1`` from the forward's estimate (the first measures its residual).

        Args:
            config: the layer's config.

        Returns:
            the :class:`~deq_core.solvers.SolveSpec`.
        """
        refined = cls.forward_inverse(config) and config.b_refine_steps is not None
        max_iter = config.b_refine_steps + 1 if refined else config.b_max_iter
        return SolveSpec(config.b_solver, max_iter, config.b_tol, config.b_stop_mode, config.check_every,
                         config.divergence_factor, dict(config.b_solver_options))

    def wants_inverse(self, fp: ForwardPass) -> bool:
        return fp.grad and self.forward_inverse(fp.config)

    def gradient(self, fp: ForwardPass, result: SolverResult,
                 stats: "DEQStats") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        z_in = result.z.detach().requires_grad_()
        f_out = fp.fn(z_in)
        jac = fp.jac(f_out, z_in)
        z = _ImplicitGrad.apply(f_out, z_in, self.backward_solve(fp.config), fp.fn.precision, fp.fn.groups, stats,
                                result.inverse)
        return z, jac


class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``f_out = f(z*)`` whose backward replaces the incoming gradient g by the
    solution u of ``u = u J_f(z*) + g`` (implicit function theorem); autograd then carries u
    through f to its parameters and inputs, giving ``g (I - J)^-1 df/dtheta``.

    The backward solve is the one its forward call was given (``solve``, in ``precision``), with
    one sample per batch element (``groups`` rows of the flat state) whatever the forward's
    samples were: the adjoint of a causal map runs from the last position to the first.
    Non-finite entries of g reach u unchanged, and when f runs in float16/bfloat16 a sample
    whose vector-Jacobian products overflowed gets a NaN gradient: a loss scaler must see an
    overflow to skip the step.

    With ``inverse``, the forward solver's estimate ``H ~= J_g^-1`` of ``g(z) = f(z) - z`` in the
    forward's sample layout, the solve starts from ``u0 = -H^T g`` (the row ``g (I - J_f)^-1``
    of the estimate, per forward sample: with ``sample_dims=2`` per position, so the estimate
    ignores the coupling between positions that the solve then corrects), and the stats count
    the steps taken from it (the solve's evaluations less the first, which measures u0's residual).
    """

    @staticmethod
    def forward(ctx, f_out: torch.Tensor, z_in: torch.Tensor, solve: SolveSpec, precision: torch.dtype,
                groups: int, stats: "DEQStats", inverse: Optional[InverseEstimate] = None) -> torch.Tensor:
        ctx.save_for_backward(f_out, z_in)
        ctx.solve, ctx.precision, ctx.groups, ctx.stats = solve, precision, groups, stats
        ctx.inverse = inverse
        return f_out.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "backward='implicit' does not support higher-order gradients (a backward with "
                "create_graph=True through a DEQLayer): its gradient comes from a linear solve that is "
                "not itself differentiated. Use backward='phantom' or backward='unrolled', whose "
                "gradients are ordinary autograd graphs and can be differentiated again")
        f_out, z_in = ctx.saved_tensors
        if ctx.groups == 0:  # an empty batch: nothing to solve
            return grad, None, None, None, None, None, None
        rows = grad.shape
        grad = grad.to(f_out.dtype).reshape(ctx.groups, -1)
        overflow = torch.zeros(ctx.groups, dtype=torch.bool, device=grad.device)
        reduced = ctx.precision in REDUCED_PRECISION

        def linear_map(u: torch.Tensor) -> torch.Tensor:
            (vjp,) = torch.autograd.grad(f_out, z_in, u.view(rows), retain_graph=True)
            vjp = vjp.view(ctx.groups, -1)
            if reduced:
                overflow.logical_or_(~torch.isfinite(vjp).all(dim=1))
            return vjp + grad

        if ctx.inverse is None:
            u0 = torch.zeros_like(grad)
        else:
            # In the forward's flat layout (its samples), outside any autocast of the caller.
            with AutocastBoundary(grad.device.type).outside():
                u0 = ctx.inverse.solve_transposed(grad.reshape(ctx.inverse.u.shape[0], -1)).view(ctx.groups, -1)
        result = ctx.solve.run(linear_map, u0, precision=ctx.precision)
        if ctx.inverse is not None:
            result = dataclasses.replace(result, steps=(result.steps - 1).clamp_(min=0))
        ctx.stats.record_backward(result)
        u = result.z.masked_fill(overflow[:, None], float("nan")) if reduced else result.z
        return torch.where(torch.isfinite(grad), u, grad).view(rows), None, None, None, None, None, None
