"""The equilibrium layer: forward solve, backward modes, Jacobian regularization, statistics."""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._steps import follow_optimizer_steps
from ._warn import warn_user
from .config import DEQConfig
from .jacobian import JRSchedule, jac_frobenius_estimate, spectral_radius
from .solvers import InverseEstimate, SolveSpec, SolverResult, residuals
from .solvers.precision import REDUCED_PRECISION, AutocastBoundary, lower_precision
from .spectral_norm import apply_spectral_norm
from .state import State, StateSpec, state_dtype_for
from .stats import DEQStats

__all__ = ["DEQLayer", "equilibrium_pass", "name_deq_layers"]

# Training passes without any set_num_updates() call after which a layer whose config depends on
# the step (pretraining, a JR schedule) warns that the step never advanced.
_STEPLESS_PASSES_WARNING = 100


@contextlib.contextmanager
def equilibrium_pass(f: nn.Module) -> Iterator[None]:
    """One pass of f's stabilizers: variational-dropout masks drawn once, parametrized weights
    (DEQ weight norm) computed once, both shared by every call of f inside the block."""
    members = [m for m in f.modules() if hasattr(m, "_deq_begin_pass")]
    for m in members:
        m._deq_begin_pass()
    try:
        with parametrize.cached():
            # Compute the weights now, under the caller's grad mode: if the first access happened
            # inside the no-grad solver, the cached weights would carry no graph to g and v.
            for m in f.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
            yield
    finally:
        for m in members:
            m._deq_end_pass()


def name_deq_layers(module: nn.Module) -> nn.Module:
    """Name every unnamed :class:`DEQLayer` inside ``module`` by its qualified name there
    (``"deq"``, ``"decoder.deq"``, ...), so that layers sharing a seed draw independently.

    Args:
        module: the model; layers given a name already keep it.

    Returns:
        ``module``.
    """
    for qualified, m in module.named_modules():
        if isinstance(m, DEQLayer) and not m.name:
            m.name = qualified
    return module


class _FlatMap:
    """f as a map on flat ``(B, D)`` solver states; checks f's output structure and dtype.

    f runs under the caller's autocast state captured in ``boundary`` (the layer's own arithmetic
    runs outside it); ``precision`` is the dtype f's values are computed in. ``call`` evaluates f
    (f itself by default, or a compiled version of it)."""

    def __init__(self, f: nn.Module, spec: StateSpec, inputs: Sequence[Any], kwargs: Mapping[str, Any],
                 boundary: AutocastBoundary, call: Optional[Callable[..., State]] = None):
        self.f, self.spec, self.inputs, self.kwargs, self.boundary = f, spec, inputs, kwargs, boundary
        self.call = boundary.inside(f if call is None else call)
        self.f_dtype = spec.dtype
        self.state_dtype = state_dtype_for(spec.dtype)
        self.precision = lower_precision(boundary.compute_dtype, spec.dtype)
        # (batch, position) samples: positions of one sequence are consecutive rows.
        self.sequence_length = spec.sample_shape[1] if len(spec.sample_shape) == 2 else None
        self.groups = spec.sample_shape[0]

    def using(self, call: Callable[..., State]) -> "_FlatMap":
        """The same map with f evaluated through ``call``."""
        return _FlatMap(self.f, self.spec, self.inputs, self.kwargs, self.boundary, call)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.is_leaf and z.requires_grad:
            # Autograd refuses an in-place op on a view of such a leaf before the check below
            # could name f; f gets a copy, so that the check reports it (a state copy per call
            # of f at a leaf: once per differentiable pass).
            z = z.clone()
        state = self.spec.unpack(z, self.f_dtype)
        versions = _versions(state)
        out = self.call(state, *self.inputs, **self.kwargs)
        if _versions(state) != versions:  # metadata only: no host read, so on every call
            raise RuntimeError(
                f"f ({type(self.f).__name__}) modified its state input z in place (for example nn.ReLU(inplace=True), "
                "z += ... or z.mul_(...) applied to z): the solver's iterate would change under it, which silently "
                "corrupts the solve. Compute a new tensor from z instead (inplace=False, z = z + ...)")
        self._check_dtype(out)
        return self.spec.pack(out, self.state_dtype, what="f's output")

    def _check_dtype(self, out: State) -> None:
        tensors = out if isinstance(out, (list, tuple)) else (out,)
        allowed = {self.f_dtype}
        if self.boundary.enabled:
            allowed.add(self.boundary.dtype)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dtype not in allowed:
                raise TypeError(f"f returned dtype {t.dtype} for a state of dtype {self.f_dtype}; "
                                f"f must return the state's dtype (or the autocast dtype), one of "
                                f"{sorted(map(str, allowed))}")


def _versions(state: State) -> Tuple[int, ...]:
    """The version counters of a state's tensors (they change with every in-place write)."""
    return tuple(t._version for t in (state if isinstance(state, (list, tuple)) else (state,)))


class _StepRecorder:
    """Wraps the map a solver is given and keeps a detached copy of the argument of its k-th call
    for each requested k (k = 1 is the first call, whose argument is the solver's z0): the
    solver's iterates at those steps, taken without touching the solver. Only the requested
    calls are copied, so it holds ``len(steps)`` states."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.wanted = frozenset(steps)
        self.calls = 0
        self.saved: Dict[int, torch.Tensor] = {}

    def wrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def recording(z: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls in self.wanted:
                # A copy: solvers update their iterate buffers in place.
                self.saved[self.calls] = z.detach().clone()
            return fn(z)
        return recording

    def state_at(self, step: int, result: SolverResult) -> torch.Tensor:
        """The iterate at ``step`` per sample: the argument of the ``step``-th call where the sample
        was still active then (``result.steps >= step``) and that argument is finite, else the
        sample's z* (``result.z``): the solve, or the sample, stopped before that step."""
        saved = self.saved.get(step)
        if saved is None:
            return result.z.clone()
        keep = (result.steps >= step) & torch.isfinite(saved).all(dim=1)
        return torch.where(keep[:, None], saved, result.z)


class _JRWatch:
    """Records whether a backward pass reached a training pass's output and its JR estimate."""

    def __init__(self, out: torch.Tensor, jac: torch.Tensor) -> None:
        self.output_reached = self.jr_reached = False
        out.register_hook(self._output)
        jac.register_hook(self._jr)

    def _output(self, grad: torch.Tensor) -> None:
        self.output_reached = True

    def _jr(self, grad: torch.Tensor) -> None:
        self.jr_reached = True


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
                groups: int, stats: DEQStats, inverse: Optional[InverseEstimate] = None) -> torch.Tensor:
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


class DEQLayer(nn.Module):
    """Deep equilibrium layer around ``f(z, *inputs, **kwargs)``: returns ``(f(z*), stats)``.

    The state z may be a tensor or a list/tuple of tensors sharing the batch dimension; its
    initial value is ``z0`` when given, else ``f.init_state(*inputs, **kwargs)`` when f defines
    it, else zeros shaped like the first tensor input. Solvers run on a float32 copy of the state
    (float64 for float64 states) whatever precision f runs in.

    The output is ``f(z*)``, f at the solver's lowest-residual iterate z*, in every mode: with
    and without gradients, in training and evaluation, so a forward limit of k always means k
    evaluations of f and the output of the last one kept (at limit 1, ``f(z0)``). The solvers
    keep f's value at their best iterate, so this costs no extra evaluation, only one more
    state-sized buffer. The backward mode changes the gradient, never the value.

    Gradients follow ``config.backward`` ("implicit", "phantom" or "unrolled"); during the first
    ``config.pretrain_steps`` training steps the layer runs as an unrolled weight-tied stack. In
    training, Jacobian regularization is computed when the step's Bernoulli(``jac_freq``) draw
    says so and the current JR weight is positive; add ``stats.jr_term`` to the loss (a JR term
    that a backward pass never reached is reported once). The step count follows the steps of
    the optimizers holding the layer's parameters, or the training loop sets it through
    :meth:`set_num_updates` (fairseq's trainer and ``timm_deq.train`` do), which then takes precedence.

    With ``config.compile_f`` the solver's evaluations of f (all but one per forward pass, and
    run under ``no_grad``) go through ``torch.compile(f, backend=config.compile_backend)``,
    compiled on first use and kept on the layer (outside the state dict; copies and pickles of
    the layer drop it and compile again). The single differentiable call of f at z*, through
    which gradients and the JR term flow, and the pretraining/unrolled/phantom passes stay
    eager: JR differentiates a vector-Jacobian product (double backward), which compiled graphs
    do not support. Variational-dropout masks drawn inside a compiled call come from the
    compiled code's random stream, so they differ from an eager run with the same seed.

    Random decisions (JR on this step?, the limit's jitter) are a function of ``config.seed``,
    the step, the call within the step and the layer's ``name``, so that every process of a
    distributed run agrees and two layers of one model draw independently once named
    (:func:`name_deq_layers` names them by their place in the model; both plugins' models do).

    With ``config.spectral_norm`` the layer applies :func:`~deq_core.apply_spectral_norm` to f
    when it is built (changing the field on a built layer has no effect).

    Fixed-point correction (``config.fp_correction_states`` or ``fp_correction_steps``; Bai et
    al. 2022, DEQ optical flow) supervises states along the forward solve besides the output. It
    runs in training passes with gradients, in the implicit and phantom modes, after
    pretraining; in every other pass ``stats.correction_states`` is ``None``. The solver is not
    changed: the map it is given is wrapped, and the **state at step k** is, per sample, the
    argument of the k-th evaluation of f by the forward solver (k = 1 is the first evaluation,
    whose argument is z0 in the built-in solvers; for ``fixed_point`` without damping the state
    at step k is ``f^(k-1)(z0)``), a detached copy taken at that call only. Where the solve or the sample
    stopped before its k-th evaluation (it converged, stalled or diverged earlier, or the
    jittered limit is below k), or that argument is not finite, the state is the sample's z*
    (the lowest-residual iterate the output is f of). ``stats.correction_states`` holds these
    states, in order of ``stats.correction_steps`` and in the structure and dtype of the output;
    each has exactly the iterate's value and the gradient of a phantom chain from it
    (``phantom_steps`` steps ``z <- z + phantom_damping (f(z) - z)`` from z_k, differentiated
    by autograd, so each keeps ``phantom_steps`` graphs of f until the backward pass). The output
    and its gradient are those of the configured backward mode, unchanged. Combine them with
    :func:`~deq_core.fixed_point_correction` (``states = [*stats.correction_states, output]``,
    ``gamma = stats.correction_gamma``).

    With ``config.b_init="forward_inverse"`` (implicit mode, ``f_solver="broyden"``) the backward
    solve starts from the forward solve's own estimate of ``(I - J_f)^-1`` (SHINE, Ramzi et al.
    2022): Broyden's ``H = -I + sum_i u_i v_i^T`` approximates the inverse Jacobian of
    ``f(z) - z``, so the row ``u = g (I - J_f)^-1`` the backward solves for is estimated as
    ``u0 = -H^T g = g - sum_i (u_i . g) v_i``, per forward sample with the H the solver held at
    the sample's stop (see :func:`~deq_core.solvers.broyden`). ``b_refine_steps = k`` then takes
    k backward solver steps from u0 (k + 1 vector-Jacobian products, the first measuring u0's
    residual; k = 0 returns u0), ``None`` the usual solve from there. The training forward keeps
    the estimate's vectors, at most ``2 * memory`` states per sample (``f_solver_options
    ["memory"]``, default ``f_max_iter``), until the backward pass; the forward's values and
    every other path are unchanged.

    Args:
        f: the map ``f(z, *inputs, **kwargs)``.
        config: a :class:`DEQConfig`, a mapping of its fields, or ``None`` for the defaults.
        name: the layer's name in the random draws (default ``""``).
        **options: config fields overriding ``config``.
    """

    def __init__(self, f: nn.Module, config: Union[DEQConfig, Mapping[str, Any], None] = None,
                 *, name: str = "", **options: Any) -> None:
        super().__init__()
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {type(name).__name__}")
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module, got {type(f).__name__}")
        if config is None or isinstance(config, Mapping):
            config = DEQConfig.from_dict({**dict(config or {}), **options})
        elif isinstance(config, DEQConfig):
            config = config.replace(**options) if options else config
        else:
            raise TypeError(f"config must be a DEQConfig, a mapping or None, got {type(config).__name__}")
        if config.spectral_norm:
            apply_spectral_norm(f, scale=config.spectral_norm_scale, learn_scale=config.spectral_norm_learn_scale,
                                clip=config.spectral_norm_clip)
        self.f = f
        self.name = name
        self.config: DEQConfig = config
        self.stats: Optional[DEQStats] = None
        self._num_updates = 0
        self._epoch: Optional[int] = None
        self._calls = 0
        self._stepless_passes = 0  # training passes before the first counted step; -1 after it
        self._explicit_steps = False  # set_num_updates() was called: optimizer steps no longer count
        self._trained_since_step = False
        self._jr_watch: Optional[_JRWatch] = None
        self._jr_unused_warned = False
        # (num_updates, epoch or -1) in the state dict, so that a checkpoint resumes (and an
        # evaluated checkpoint runs) in the right phase; the Python copies above are what
        # forward() reads, so no device value is read back per call. An eval-mode forward reads
        # the buffer again when something else wrote it (an EMA copy of a trained model).
        self.register_buffer("schedule_state", torch.tensor([0, -1], dtype=torch.int64))
        self._buffer_seen = self._buffer_key()
        follow_optimizer_steps(self)

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_f_cache", None)  # compiled code is rebuilt on demand, never copied
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        follow_optimizer_steps(self)  # copies (deepcopy, pickle) follow their own optimizers

    def __prepare_scriptable__(self) -> "DEQLayer":
        raise RuntimeError(
            "DEQLayer cannot be scripted with torch.jit.script: the solve is a data-dependent Python loop "
            "over a variable number of evaluations of f, with per-sample freezing and a custom autograd "
            "backward. Run the model eagerly or with torch.compile (the layer is one graph break there)")

    def extra_repr(self) -> str:
        """The main solver and JR settings, for ``repr``."""
        c = self.config
        return (f"f_solver={c.f_solver}, f_max_iter={c.f_max_iter}, backward={c.backward}, "
                f"b_solver={c.b_solver}, jac_weight={c.jac_weight}, jac_freq={c.jac_freq}")

    @contextlib.contextmanager
    def overridden(self, **changes: Any) -> Iterator["DEQLayer"]:
        """Run with some config fields changed, e.g. ``with layer.overridden(eval_max_iter=4):``.

        Args:
            **changes: :class:`DEQConfig` fields and their values for the block (validated as
                :meth:`DEQConfig.replace` does; an unknown or invalid one raises before the block).

        Returns:
            a context manager yielding the layer; the previous config is back after the block,
            also when it raises. A backward pass run later uses the config of its own forward.
        """
        previous = self.config
        self.config = previous.replace(**changes)
        try:
            yield self
        finally:
            self.config = previous

    # -- training-step state -----------------------------------------------------------------
    def set_num_updates(self, num_updates: int) -> None:
        """Tell the layer the optimizer step count (drives pretraining, JR schedule, random draws).

        Without it the layer counts the steps of the optimizers that hold its parameters (a step
        that follows at least one training pass counts once; with gradient accumulation that is
        one per optimizer step). Once called, the layer follows the count it is given only.

        Args:
            num_updates: the number of optimizer steps taken so far.
        """
        self._explicit_steps = True
        self._set_step(int(num_updates))

    def set_epoch(self, epoch: int) -> None:
        """Tell the layer the epoch (drives ``jac_stop_epoch``)."""
        self._epoch = int(epoch)
        self.schedule_state[1] = self._epoch
        self._buffer_seen = self._buffer_key()

    def _set_step(self, num_updates: int) -> None:
        self._num_updates = num_updates
        self._calls = 0
        self._stepless_passes = -1
        self.schedule_state[0] = num_updates
        self._buffer_seen = self._buffer_key()

    def _optimizer_stepped(self) -> None:
        """Called after a step of an optimizer that holds a parameter of this layer."""
        self._check_jr_reached_backward()
        if self._explicit_steps or not self._trained_since_step:
            return
        self._trained_since_step = False
        self._set_step(self._num_updates + 1)

    def _buffer_key(self) -> Tuple[int, int]:
        buf = self.schedule_state
        return id(buf), buf._version

    def _read_schedule_buffer(self) -> None:
        updates, epoch = (int(v) for v in self.schedule_state.tolist())
        if updates != self._num_updates:
            self._calls = 0
        self._num_updates, self._epoch = updates, (None if epoch < 0 else epoch)
        self._buffer_seen = self._buffer_key()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "schedule_state" in state_dict:
            self._read_schedule_buffer()

    @property
    def num_updates(self) -> int:
        """The optimizer step count: given to :meth:`set_num_updates`, counted from optimizer
        steps, or loaded with the state dict."""
        return self._num_updates

    @property
    def pretraining(self) -> bool:
        """Whether the current step is in the unrolled pretraining phase."""
        return self._num_updates < self.config.pretrain_steps

    @property
    def jac_weight(self) -> float:
        """The JR weight at the current step, from the schedule in the config."""
        return JRSchedule.from_config(self.config).weight_at(self._num_updates, self._epoch)

    def _draw(self) -> Tuple[bool, int]:
        """This training call's random decisions (JR on?, forward-limit reduction), a function of
        (seed, name, step, call within step) only, so every process of a distributed run agrees."""
        cfg = self.config
        if self._stepless_passes >= 0:
            self._warn_if_stepless(cfg)
        salt = zlib.crc32(self.name.encode())  # not hash(): that one differs between processes
        key = (((cfg.seed * 1_000_003 + salt) * 1_000_033 + self._num_updates) * 1_000_037
               + self._calls) % (2 ** 62)
        self._calls += 1
        u = torch.rand(2, generator=torch.Generator().manual_seed(key)).tolist()
        return u[0] < cfg.jac_freq, int(u[1] * (cfg.f_max_iter_jitter + 1))

    def _warn_if_stepless(self, cfg: DEQConfig) -> None:
        self._stepless_passes += 1
        stepped = cfg.pretrain_steps > 0 or (cfg.jac_increment_every > 0 and cfg.jac_weight_increment > 0) \
            or cfg.jac_stop_step is not None
        if stepped and self._stepless_passes == _STEPLESS_PASSES_WARNING:
            warn_user(
                f"DEQLayer has run {self._stepless_passes} training passes, set_num_updates() was never "
                "called and no optimizer holding the layer's parameters has stepped, so the step count is "
                f"still {self._num_updates}: pretraining (pretrain_steps={cfg.pretrain_steps}) and the JR "
                "schedule do not advance. Call set_num_updates(step) once per optimizer step (fairseq's "
                "trainer and timm_deq.train do), or step an optimizer that holds the layer's parameters",
                RuntimeWarning)

    def _check_jr_reached_backward(self) -> None:
        watch, self._jr_watch = self._jr_watch, None
        if watch is None or not watch.output_reached or watch.jr_reached or self._jr_unused_warned:
            return
        self._jr_unused_warned = True
        warn_user(
            "DEQLayer computed the Jacobian-regularization term in training, and a backward pass reached "
            "the layer's output but not the JR term: the loss does not include it, so JR has no effect "
            "and only costs time. Add stats.jr_term to the loss (timm models: model.deq_stats.jr_term, "
            "or train with python -m timm_deq.train / timm_deq.DEQClassificationTask; fairseq: "
            "--criterion cross_entropy_jr or adaptive_loss_jr), or set jac_weight=0 to turn JR off",
            RuntimeWarning)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, *inputs: Any, z0: Optional[State] = None, **kwargs: Any) -> Tuple[State, DEQStats]:
        """Solve for the equilibrium of f given ``inputs`` and attach its gradient.

        Args:
            *inputs: the inputs of f after the state (``f(z, *inputs, **kwargs)``).
            z0: the initial state (default: ``f.init_state(*inputs, **kwargs)`` or zeros shaped
                like the first floating-point input).
            **kwargs: keyword inputs of f.

        Returns:
            ``(z, stats)``: the equilibrium state in the structure and dtype of ``z0``, and the
            :class:`DEQStats` of this pass (also kept as ``self.stats``).

        Under autocast only f runs in reduced precision; the solvers, the backward solve and JR's
        reduction run in the state dtype (float32, or float64 for float64 states).

        Inside ``torch.compile`` of a whole model the layer is one explicit graph break: the
        solver loop is data dependent and JR differentiates a vector-Jacobian product, which
        compiled graphs cannot do, so the layer runs eagerly (its solver evaluations of f
        compiled when ``compile_f`` is on) and the model around it stays compiled.
        """
        return self._equilibrium_forward(*inputs, z0=z0, **kwargs)

    @torch.compiler.disable
    def _equilibrium_forward(self, *inputs: Any, z0: Optional[State] = None,
                             **kwargs: Any) -> Tuple[State, DEQStats]:
        cfg = self.config
        grad = torch.is_grad_enabled()
        self._check_calling_pattern(grad)
        if cfg.check_finite:
            _check_finite(inputs, kwargs, z0)
        if self.training:
            self._check_jr_reached_backward()
            self._trained_since_step = True
        elif self._buffer_key() != self._buffer_seen:
            self._read_schedule_buffer()
        jac_on, cut = self._draw() if self.training else (False, 0)
        jac_weight = self.jac_weight if self.training else 0.0
        jac_on = jac_on and grad and jac_weight > 0.0
        jac: Optional[torch.Tensor] = None
        correction = None
        with equilibrium_pass(self.f):
            spec, fn, z0_flat = self._prepare(inputs, kwargs, z0)
            with fn.boundary.outside():
                if self.pretraining or cfg.backward == "unrolled":
                    mode, max_iter = "unrolled", cfg.unrolled_layers
                    result, z, jac = self._unrolled(fn, z0_flat, jac_on)
                else:
                    mode, solve = cfg.backward, cfg.forward_solve(self.training, cut)
                    max_iter = solve.max_iter
                    steps = cfg.correction_steps(max_iter) if self.training and grad else None
                    recorder = _StepRecorder(steps) if steps else None
                    inverse = grad and mode == "implicit" and cfg.forward_inverse
                    with torch.no_grad():
                        result = self._solve(fn, z0_flat, solve, recorder, inverse=inverse)
                    if not grad:
                        z = result.fz if result.fz is not None else fn(result.z)
                    elif mode == "phantom":
                        z, jac = self._phantom(fn, result.z, jac_on)
                    else:
                        z_in = result.z.detach().requires_grad_()
                        z = fn(z_in)
                        jac = self._jac(z, z_in) if jac_on else None
                    if steps is not None:
                        states = [spec.unpack(self._correction_state(fn, recorder.state_at(k, result)), spec.dtype)
                                  for k in steps]
                        correction = (steps, states, cfg.fp_correction_gamma)
                stats = DEQStats.from_solve(mode, result, max_iter, jac_frobenius=jac, jac_weight=jac_weight,
                                            correction=correction)
                if mode == "implicit" and grad:
                    z = _ImplicitGrad.apply(z, z_in, cfg.backward_solve(), fn.precision, fn.groups, stats,
                                            result.inverse if inverse else None)
                if jac is not None and z.requires_grad:
                    self._jr_watch = _JRWatch(z, jac)
                out = spec.unpack(z, spec.dtype)
        self.stats = stats
        return out, stats

    def _check_calling_pattern(self, grad: bool) -> None:
        if getattr(self, "_is_replica", False):
            raise RuntimeError(
                "DEQLayer does not support nn.DataParallel: its (z, DEQStats) output cannot be gathered "
                "and the replicas' statistics never reach the wrapped module. Use "
                "torch.nn.parallel.DistributedDataParallel (one process per GPU, e.g. torchrun), which "
                "both plugins' training entry points support")
        if grad and _in_backward():
            raise RuntimeError(
                "DEQLayer ran its forward inside a backward pass, which is what torch.utils.checkpoint "
                "does when it recomputes a checkpointed region: with use_reentrant=True the first "
                "forward ran without gradients, so the JR term was lost; with use_reentrant=False the "
                "whole solve would be recomputed for every vector-Jacobian product of the backward "
                "solve. Checkpointing is not supported around a DEQLayer and not needed for it: the "
                "implicit backward keeps one application of f, whatever the number of solver steps. "
                "Checkpoint the modules before and after the layer instead")

    def _prepare(self, inputs, kwargs, z0) -> Tuple[StateSpec, _FlatMap, torch.Tensor]:
        if z0 is None:
            z0 = self._initial_state(inputs, kwargs)
            spec = StateSpec(z0, "z0", sample_dims=self.config.sample_dims)
        else:
            spec = StateSpec(z0, "z0", sample_dims=self.config.sample_dims)
            _check_z0_against_inputs(spec, inputs)
        fn = _FlatMap(self.f, spec, inputs, kwargs, AutocastBoundary(spec.device.type))
        return spec, fn, spec.pack(z0, fn.state_dtype).detach()

    def _initial_state(self, inputs, kwargs) -> State:
        init = getattr(self.f, "init_state", None)
        if callable(init):
            return init(*inputs, **kwargs)
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return torch.zeros_like(x)
        raise ValueError("no initial state: pass z0=..., give f an init_state(*inputs) method, "
                         "or pass a floating-point tensor input shaped like the state")

    def _compiled_f(self) -> Callable[..., State]:
        """``torch.compile(f)``, built on first use and rebuilt when f or the backend changes."""
        backend = self.config.compile_backend
        cached = self.__dict__.get("_compiled_f_cache")
        if cached is None or cached[0] is not self.f or cached[1] != backend:
            cached = (self.f, backend, torch.compile(self.f, backend=backend))
            self.__dict__["_compiled_f_cache"] = cached  # not a submodule: stays out of the state dict
        return cached[2]

    def _solve(self, fn: _FlatMap, z0: torch.Tensor, solve: SolveSpec,
               recorder: Optional[_StepRecorder] = None, inverse: bool = False) -> SolverResult:
        """The no-grad forward solve (through the compiled f when ``compile_f`` is on), the
        solver's calls of the map counted and recorded by ``recorder`` when given, with the
        solver's inverse-Jacobian estimate when ``inverse``."""
        if self.config.compile_f:
            fn = fn.using(self._compiled_f())
        call = fn if recorder is None else recorder.wrap(fn)
        result = solve.run(call, z0, precision=fn.precision, sequence_length=fn.sequence_length, inverse=inverse)
        if inverse and result.inverse is None:
            raise RuntimeError(f"b_init='forward_inverse': the forward solver {solve.solver!r} was asked for its "
                               "inverse-Jacobian estimate and returned none (SolverResult.inverse)")
        return result

    def _jac(self, f_out: torch.Tensor, z_in: torch.Tensor) -> Optional[torch.Tensor]:
        """The batch-mean JR estimate (``None`` for an empty batch: no term, not NaN)."""
        cfg = self.config
        if f_out.shape[0] == 0:
            return None
        return jac_frobenius_estimate(f_out, z_in, cfg.jac_probes, cfg.jac_probe).mean()

    def _phantom(self, fn: _FlatMap, z_star: torch.Tensor,
                 jac_on: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The phantom gradient: k damped steps from z*, differentiated by ordinary backprop.

        The value returned is f(z*), the first step's f, as in every other mode; the gradient is
        the one of the k-step chain (``f(z*) + (z_k - stopgrad(z_k))``, exact in value).
        """
        z, f_star, jac = self._phantom_chain(fn, z_star, jac_on)
        return f_star.detach() + (z - z.detach()), jac

    def _phantom_chain(self, fn: _FlatMap, z: torch.Tensor,
                       jac_on: bool) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``phantom_steps`` damped steps ``z <- z + phantom_damping (f(z) - z)`` from (a detached)
        ``z``, under autograd: the last z, f at the first z, and the JR estimate there when ``jac_on``."""
        cfg = self.config
        z = z.detach().requires_grad_(jac_on)
        jac = f_first = None
        for i in range(cfg.phantom_steps):
            f_z = fn(z)
            if i == 0:
                f_first = f_z
                jac = self._jac(f_z, z) if jac_on else None
            z = torch.lerp(z, f_z, cfg.phantom_damping)
        return z, f_first, jac

    def _correction_state(self, fn: _FlatMap, z_k: torch.Tensor) -> torch.Tensor:
        """A supervised state of fixed-point correction: the value of the iterate ``z_k`` exactly,
        the gradient of the phantom chain from it (``z_k + (z' - stopgrad(z'))``, z' the chain's end)."""
        end, _, _ = self._phantom_chain(fn, z_k, False)
        return z_k + (end - end.detach())

    def _unrolled(self, fn: _FlatMap, z0: torch.Tensor,
                  jac_on: bool) -> Tuple[SolverResult, torch.Tensor, Optional[torch.Tensor]]:
        """``unrolled_layers`` applications of f from z0, differentiated by ordinary backprop;
        the result describes the last application (residual between the last two states)."""
        n = self.config.unrolled_layers
        z = z0.requires_grad_(jac_on)
        prev = z
        for _ in range(n):
            prev, z = z, fn(z)
        abs_res, rel_res = residuals(prev.detach(), z.detach())
        diverged = ~torch.isfinite(abs_res)
        result = SolverResult(z=prev.detach(), fz=z.detach(), steps=torch.full_like(abs_res, n, dtype=torch.int32),
                              abs_res=abs_res, rel_res=rel_res, converged=torch.zeros_like(diverged),
                              diverged=diverged)
        return result, z, (self._jac(z, prev) if jac_on else None)

    # -- diagnostics ---------------------------------------------------------------------------
    def _equilibrium(self, inputs, kwargs, z0) -> Tuple[_FlatMap, torch.Tensor]:
        """The flat map and its no-grad fixed point at the evaluation limits (for diagnostics),
        with one sample per batch element whatever ``sample_dims`` the solve used."""
        spec, fn, z0_flat = self._prepare(inputs, kwargs, z0)
        with torch.no_grad(), fn.boundary.outside():
            z = self._solve(fn, z0_flat, self.config.forward_solve(training=False)).z
        if len(spec.sample_shape) > 1:
            state = spec.unpack(z, fn.state_dtype)
            spec = StateSpec(state, "z")
            fn = _FlatMap(self.f, spec, inputs, kwargs, fn.boundary)
            z = spec.pack(state, fn.state_dtype)
        return fn, z

    def spectral_radius(self, *inputs: Any, z0: Optional[State] = None, n_iter: int = 20,
                        **kwargs: Any) -> torch.Tensor:
        """Per-sample power-method estimate of rho(J_f(z*)) at this layer's fixed point.

        Args:
            *inputs, z0, **kwargs: as for :meth:`forward`.
            n_iter: power iterations (one vector-Jacobian product each).

        Returns:
            a ``(B,)`` tensor in the state dtype.
        """
        with equilibrium_pass(self.f):
            fn, z = self._equilibrium(inputs, kwargs, z0)
            return spectral_radius(fn, z, n_iter=n_iter)

    def jacobian_frobenius(self, *inputs: Any, z0: Optional[State] = None, n_probes: int = 8,
                           **kwargs: Any) -> torch.Tensor:
        """Per-sample Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` at this layer's fixed point:
        the quantity JR penalizes, measured without keeping a graph (a training diagnostic).

        Args:
            *inputs, z0, **kwargs: as for :meth:`forward`.
            n_probes: Hutchinson probes (one vector-Jacobian product each).

        Returns:
            a detached ``(B,)`` tensor in the state dtype.
        """
        with equilibrium_pass(self.f), torch.enable_grad():
            fn, z = self._equilibrium(inputs, kwargs, z0)
            z_in = z.detach().requires_grad_()
            return jac_frobenius_estimate(fn(z_in), z_in, n_probes, self.config.jac_probe,
                                          create_graph=False).detach()


def _check_z0_against_inputs(spec: StateSpec, inputs: Sequence[Any]) -> None:
    """A given z0 must share the batch size and (outside autocast) the dtype of the first
    floating-point input (the tensor the default z0 is shaped like), or f would fail on it
    without naming it."""
    first = next((i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()
                  and x.dim() >= 1), None)
    if first is None:
        return
    x = inputs[first]
    if x.shape[0] != spec.sample_shape[0]:
        raise ValueError(f"z0 has batch size {spec.sample_shape[0]} but input {first} of the equilibrium layer has "
                         f"{x.shape[0]}: pass z0 with the inputs' batch size (or omit it for the default)")
    if x.dtype != spec.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts the inputs
        raise TypeError(f"z0 has dtype {spec.dtype} but input {first} of the equilibrium layer has {x.dtype}: f runs "
                        "in the state's dtype, so pass z0 in the inputs' dtype (autocast still runs f in half "
                        "precision)")


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


def _check_finite(inputs: Sequence[Any], kwargs: Mapping[str, Any], z0: Optional[State]) -> None:
    named: Dict[str, torch.Tensor] = {}
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            named[f"input {i}"] = x
    for k, x in kwargs.items():
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            named[f"keyword input {k!r}"] = x
    if z0 is not None:
        for i, x in enumerate(z0 if isinstance(z0, (list, tuple)) else (z0,)):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                named[f"z0[{i}]"] = x
    if not named:
        return
    flags = torch.stack([torch.isfinite(x).all() for x in named.values()])
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(named, flags.tolist()) if not ok]
    raise ValueError(f"non-finite values (NaN or inf) in {', '.join(bad)} of the equilibrium layer")
