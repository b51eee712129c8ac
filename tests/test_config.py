import argparse
import copy
import pickle

import pytest

from deq_core import DEQConfig, add_deq_args, config_from_args, deq_flags


def test_defaults_fill_solver_options():
    cfg = DEQConfig()
    assert cfg.f_solver_options == {"m": 5, "beta": 1.0, "lam": 1e-4}
    assert cfg.b_solver_options == {"memory": None}
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_from_dict_and_kwargs_never_mutate_the_caller():
    opts = {"m": 7}
    values = {"f_max_iter": 12, "f_solver_options": opts, "jac_weight": 2}
    before = copy.deepcopy(values)
    cfg = DEQConfig.from_dict(values)
    assert values == before and opts == {"m": 7}
    assert cfg.f_solver_options == {"m": 7, "beta": 1.0, "lam": 1e-4}
    assert cfg.jac_weight == 2.0 and isinstance(cfg.jac_weight, float)
    kw_cfg = DEQConfig(**values)
    assert values == before and kw_cfg == cfg


def test_namespace_round_trip_without_mutation():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    add_deq_args(parser)
    ns = parser.parse_args(["--f-max-iter", "14", "--b-solver", "anderson", "--b-solver-options",
                            "m=6,beta=0.9", "--eval-max-iter", "8", "--no-check-finite",
                            "--jac-weight", "2.5", "--jac-stop-epoch", "none"])
    before = vars(copy.deepcopy(ns))
    cfg = config_from_args(ns)
    assert vars(ns) == before
    assert (cfg.f_max_iter, cfg.b_solver, cfg.eval_max_iter, cfg.check_finite) == (14, "anderson", 8, False)
    assert cfg.b_solver_options == {"m": 6, "beta": 0.9, "lam": 1e-4}
    assert cfg.jac_weight == 2.5 and cfg.jac_stop_epoch is None


def test_another_solver_on_the_command_line_gets_its_own_default_options():
    # The parser's default options are the default solver's: Anderson's m/beta/lam must not reach
    # Broyden, whose options are only `memory`; options given, or the same solver, are kept.
    parser = add_deq_args(argparse.ArgumentParser(), defaults=DEQConfig(f_solver_options={"m": 7}))
    cfg = config_from_args(parser.parse_args(["--f-solver", "broyden", "--b-solver", "anderson"]))
    assert cfg.f_solver_options == DEQConfig(f_solver="broyden").f_solver_options == {"memory": None}
    assert cfg.b_solver_options == {"m": 5, "beta": 1.0, "lam": 1e-4}
    cfg = config_from_args(parser.parse_args(["--f-solver", "broyden", "--f-solver-options", "memory=4"]))
    assert cfg.f_solver_options == {"memory": 4}
    assert config_from_args(parser.parse_args(["--f-solver", "anderson"])).f_solver_options["m"] == 7
    assert config_from_args(parser.parse_args([])).f_solver_options["m"] == 7


def test_prefixed_flags():
    parser = argparse.ArgumentParser()
    add_deq_args(parser, prefix="deq_", exclude=("seed",))
    ns = parser.parse_args(["--deq-f-max-iter", "3"])
    assert not hasattr(ns, "deq_seed")
    assert config_from_args(ns, deq_flags(prefix="deq_")).f_max_iter == 3


@pytest.mark.parametrize("values, exc, pattern", [
    ({"f_max_itr": 3}, ValueError, r"unknown DEQ option\(s\): 'f_max_itr' \(did you mean 'f_max_iter'\?\)"),
    ({"f_max_iter": 0}, ValueError, r"f_max_iter must be >= 1, got 0"),
    ({"f_max_iter": 2.0}, TypeError, r"f_max_iter must be int, got 2.0"),
    ({"f_max_iter": True}, TypeError, r"f_max_iter must be int"),
    ({"f_tol": 0.0}, ValueError, r"f_tol must be > 0.0"),
    ({"f_tol": "1e-3"}, TypeError, r"f_tol must be float"),
    ({"f_solver": "newton"}, ValueError, r"f_solver must be one of \['anderson', 'broyden', 'fixed_point'"),
    ({"f_stop_mode": "max"}, ValueError, r"f_stop_mode must be one of \['abs', 'rel'\]"),
    ({"backward": "ift"}, ValueError, r"backward must be one of \['implicit', 'phantom', 'unrolled', 'reversible'\]"),
    ({"jac_freq": 1.5}, ValueError, r"jac_freq must be >= 0.0 and <= 1.0, got 1.5"),
    ({"jac_probe": "uniform"}, ValueError, r"jac_probe must be one of \['normal', 'rademacher'\]"),
    ({"jac_weight": float("nan")}, ValueError, r"jac_weight must be a number"),
    ({"f_solver_options": {"memory": 3}}, ValueError, r"f_solver_options: unknown option\(s\) \['memory'\]"),
    ({"b_solver_options": {"memory": 0}}, ValueError, r"b_solver_options\['memory'\].*>= 1"),
    ({"f_solver_options": [1]}, TypeError, r"f_solver_options must be a mapping"),
    ({"f_max_iter": 5, "f_max_iter_jitter": 5}, ValueError, r"f_max_iter_jitter must be < f_max_iter"),
    ({"eval_max_iter": 0}, ValueError, r"eval_max_iter must be >= 1"),
    ({"check_finite": "yes"}, TypeError, r"check_finite must be bool"),
])
def test_invalid_values_name_the_field(values, exc, pattern):
    with pytest.raises(exc, match=pattern):
        DEQConfig.from_dict(values)


def test_replace_switching_solver_drops_the_old_solver_options():
    cfg = DEQConfig(f_solver_options={"m": 3})
    new = cfg.replace(f_solver="broyden")
    assert new.f_solver_options == {"memory": None}
    assert cfg.f_solver_options["m"] == 3
    assert cfg.replace(f_max_iter=9).f_solver_options["m"] == 3


def test_frozen():
    cfg = DEQConfig()
    with pytest.raises(AttributeError):
        cfg.f_max_iter = 3


def test_suppressed_defaults_leave_only_explicit_flags():
    parser = argparse.ArgumentParser()
    add_deq_args(parser, suppress_defaults=True)
    ns = parser.parse_args(["--jac-weight", "2.5"])
    assert vars(ns) == {"jac_weight": 2.5}
    assert config_from_args(ns, base=DEQConfig(f_max_iter=14)).f_max_iter == 14


def test_numpy_scalars_and_zero_dim_tensors_are_numbers():
    import numpy as np
    import torch

    cfg = DEQConfig(f_max_iter=np.int64(12), f_tol=torch.tensor(1e-4, dtype=torch.float64),
                    jac_weight=np.float32(0.5), eval_max_iter=torch.tensor(3), check_finite=np.bool_(False))
    assert (cfg.f_max_iter, cfg.f_tol, cfg.jac_weight, cfg.eval_max_iter, cfg.check_finite) == (12, 1e-4, 0.5, 3, False)
    assert all(type(v) in (int, float, bool) for v in (cfg.f_max_iter, cfg.f_tol, cfg.jac_weight, cfg.check_finite))
    with pytest.raises(TypeError, match=r"f_max_iter must be int, got 2.5"):
        DEQConfig(f_max_iter=np.float64(2.5))
    with pytest.raises(TypeError, match=r"f_max_iter must be int, got tensor\(\[3\]\)"):
        DEQConfig(f_max_iter=torch.tensor([3]))   # a 1-element tensor is not a scalar
    with pytest.raises(ValueError, match=r"f_max_iter must be >= 1, got 0"):
        DEQConfig(f_max_iter=np.int32(0))
