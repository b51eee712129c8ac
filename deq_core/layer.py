"""The equilibrium layer: prepare the state, solve, hand over to the backward mode, record statistics."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ._checks import JRWatch, check_calling_pattern, check_finite, check_z0
from .backward import BackwardMode, ForwardPass, UnrolledBackward, get_backward
from .config import DEQConfig
from .flat_map import FlatMap, equilibrium_pass
from .jacobian import JRSchedule, jac_frobenius_estimate, spectral_radius
from .schedule import StepSchedule, follow_optimizer_steps
from .solvers.precision import AutocastBoundary
from .spectral_norm import apply_spectral_norm
from .state import State, StateSpec
from .stats import DEQStats

__all__ = ["DEQLayer", "name_deq_layers"]


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

    Gradients follow the backward mode ``config.backward`` (:mod:`deq_core.backward`: "implicit",
    "phantom", "unrolled" or a registered one of your own); during the first
    ``config.pretrain_steps`` training steps the layer runs as an unrolled weight-tied stack. In
    training, Jacobian regularization is computed when the step's Bernoulli(``jac_freq``) draw
    says so and the current JR weight is positive; add ``stats.jr_term`` to the loss (a JR term
    that a backward pass never reached is reported once). The step count follows the steps of
    the optimizers holding the layer's parameters, or the training loop sets it through
    :meth:`set_num_updates` (fairseq's trainer and ``timm_deq.train`` do), which then takes
    precedence (:mod:`deq_core.schedule`).

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
    at step k is ``f^(k-1)(z0)``), a detached copy taken at that call only. Where the solve or the
    sample stopped before its k-th evaluation (it converged, stalled or diverged earlier, or the
    jittered limit is below k), or that argument is not finite, the state is the sample's z*
    (the lowest-residual iterate the output is f of). ``stats.correction_states`` holds these
    states, in order of ``stats.correction_steps`` and in the structure and dtype of the output;
    each has exactly the iterate's value and the gradient of a phantom chain from it
    (``phantom_steps`` steps ``z <- z + phantom_damping (f(z) - z)`` from z_k, differentiated
    by autograd, so each keeps ``phantom_steps`` graphs of f until the backward pass). The output
    and its gradient are those of the configured backward mode, unchanged. Combine them with
    :func:`~deq_core.fixed_point_correction` (``states = [*stats.correction_states, output]``,
    ``gamma = stats.correction_gamma``).

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
        # (num_updates, epoch or -1) in the state dict, so that a checkpoint resumes (and an
        # evaluated checkpoint runs) in the right phase; the schedule keeps Python copies, so
        # that no device value is read back per call.
        self.register_buffer("schedule_state", torch.tensor([0, -1], dtype=torch.int64))
        self._schedule = StepSchedule(self.schedule_state)
        self._jr_watch = JRWatch()
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

    # -- the training-step schedule ------------------------------------------------------------
    def set_num_updates(self, num_updates: int) -> None:
        """Tell the layer the optimizer step count (drives pretraining, JR schedule, random draws).

        Without it the layer counts the steps of the optimizers that hold its parameters (a step
        that follows at least one training pass counts once; with gradient accumulation that is
        one per optimizer step). Once called, the layer follows the count it is given only.

        Args:
            num_updates: the number of optimizer steps taken so far.
        """
        self._schedule.set_step(self.schedule_state, int(num_updates), explicit=True)

    def set_epoch(self, epoch: int) -> None:
        """Tell the layer the epoch (drives ``jac_stop_epoch``).

        Args:
            epoch: the current epoch.
        """
        self._schedule.set_epoch(self.schedule_state, int(epoch))

    def _optimizer_stepped(self) -> None:
        """Called after a step of an optimizer that holds a parameter of this layer."""
        self._jr_watch.check()
        self._schedule.optimizer_stepped(self.schedule_state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "schedule_state" in state_dict:
            self._schedule.read(self.schedule_state, force=True)

    @property
    def num_updates(self) -> int:
        """The optimizer step count, given to :meth:`set_num_updates`, counted from optimizer
        steps, or loaded with the state dict."""
        return self._schedule.num_updates

    @property
    def epoch(self) -> Optional[int]:
        """The epoch given to :meth:`set_epoch` or loaded with the state dict (``None`` before any)."""
        return self._schedule.epoch

    @property
    def pretraining(self) -> bool:
        """Whether the current step is in the unrolled pretraining phase."""
        return self._schedule.num_updates < self.config.pretrain_steps

    @property
    def jac_weight(self) -> float:
        """The JR weight at the current step, from the schedule in the config."""
        return JRSchedule.from_config(self.config).weight_at(self._schedule.num_updates, self._schedule.epoch)

    def backward_mode(self) -> BackwardMode:
        """The backward mode of the next pass: the unrolled stack while pretraining, else the
        mode ``config.backward`` names."""
        cls = UnrolledBackward if self.pretraining else get_backward(self.config.backward)
        return cls(self.config)

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
        compiled when ``compile_f`` is on) and the model around it stays compiled. ``torch.export``
        and the ONNX exporters are refused: a graph of fixed operations cannot hold a solve whose
        number of steps depends on the data.
        """
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            raise RuntimeError(
                "DEQLayer cannot be exported (torch.export, torch.onnx): its forward is a solve whose number of "
                "evaluations of f and per-sample stops depend on the data, which a graph of fixed operations "
                "cannot hold. Run the model eagerly or with torch.compile (the layer is one graph break there), "
                "and ship its state_dict (timm: save_for_hf or torch.save(model.state_dict()))")
        return self._equilibrium_forward(*inputs, z0=z0, **kwargs)

    @torch.compiler.disable
    def _equilibrium_forward(self, *inputs: Any, z0: Optional[State] = None,
                             **kwargs: Any) -> Tuple[State, DEQStats]:
        grad = torch.is_grad_enabled()
        check_calling_pattern(self, grad)
        if self.config.check_finite:
            check_finite(inputs, kwargs, z0)
        jac_on, shortened_by, jac_weight = self._begin_pass(grad)
        mode = self.backward_mode()
        with equilibrium_pass(self.f):
            fp = self._forward_pass(inputs, kwargs, z0, grad, jac_on, shortened_by)
            with fp.fn.boundary.outside():
                result, max_iter = mode.solve(fp)
                stats = DEQStats.from_solve(mode.name, result, max_iter, solved=mode.solves)
                z, jac = mode.attach(fp, result, stats)
                stats.record_jr(jac, jac_weight)
                self._jr_watch.start(z, jac)
                out = fp.fn.spec.unpack(z, fp.fn.spec.dtype)
        self.stats = stats
        return out, stats

    def _begin_pass(self, grad: bool) -> Tuple[bool, int, float]:
        """This pass's JR decision, forward-limit reduction and JR weight (no JR, no reduction
        and weight 0 outside training)."""
        if not self.training:
            self._schedule.read(self.schedule_state)  # something else may have written it (an EMA copy)
            return False, 0, 0.0
        self._jr_watch.check()
        jac_on, shortened_by = self._schedule.draw(self.config, self.name)
        weight = self.jac_weight
        return jac_on and grad and weight > 0.0, shortened_by, weight

    def _forward_pass(self, inputs, kwargs, z0, grad: bool, jac_on: bool, shortened_by: int) -> ForwardPass:
        state = self._initial_state(inputs, kwargs) if z0 is None else z0
        spec = StateSpec(state, "z0", sample_dims=self.config.sample_dims)
        if z0 is not None:
            check_z0(spec, inputs)
        fn = FlatMap(self.f, spec, inputs, kwargs, AutocastBoundary(spec.device.type))
        z0_flat = spec.pack(state, fn.state_dtype).detach()
        solve_map = fn.using(self._compiled_f()) if self.config.compile_f else fn
        return ForwardPass(fn=fn, z0=z0_flat, config=self.config, training=self.training, grad=grad, jac_on=jac_on,
                           shortened_by=shortened_by, solve_map=solve_map)

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

    # -- diagnostics ---------------------------------------------------------------------------
    def _equilibrium(self, inputs, kwargs, z0) -> Tuple[FlatMap, torch.Tensor]:
        """The flat map and its no-grad fixed point at the evaluation limits (for diagnostics),
        with one sample per batch element whatever ``sample_dims`` the solve used."""
        fp = self._forward_pass(inputs, kwargs, z0, False, False, 0)
        spec = self.config.forward_solve(training=False)
        with torch.no_grad(), fp.fn.boundary.outside():
            z = spec.run(fp.solve_map, fp.z0, precision=fp.fn.precision, sequence_length=fp.fn.sequence_length).z
        return fp.fn.per_batch_element(z)

    def spectral_radius(self, *inputs: Any, z0: Optional[State] = None, n_iter: int = 20,
                        **kwargs: Any) -> torch.Tensor:
        """Per-sample power-method estimate of rho(J_f(z*)) at this layer's fixed point.

        Args:
            inputs, z0, kwargs: as for :meth:`forward`.
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
            inputs, z0, kwargs: as for :meth:`forward`.
            n_probes: Hutchinson probes (one vector-Jacobian product each).

        Returns:
            a detached ``(B,)`` tensor in the state dtype.
        """
        with equilibrium_pass(self.f), torch.enable_grad():
            fn, z = self._equilibrium(inputs, kwargs, z0)
            z_in = z.detach().requires_grad_()
            return jac_frobenius_estimate(fn(z_in), z_in, n_probes, self.config.jac_probe,
                                          create_graph=False).detach()
