"""fairseq plugin, in-process: registration, configuration, the wt103 shapes, memory, precision,
the JR term's scale, and bad option combinations."""
import dataclasses
import json
import math
import sys

import pytest

pytest.importorskip("fairseq")

import torch  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402

from deq_core import DEQConfig, UsageError  # noqa: E402
from fairseq_deq.models import DEQTransformerLanguageModel  # noqa: E402
from fairseq_deq.options import DEQ_FIELD_NAMES  # noqa: E402
from tests._fairseq_helpers import (USER_DIR, VOCAB, build, make_contractive, parse_train_config, run,  # noqa: E402
                                    write_dictionary)

# fairseq's config conversion goes through hydra's deprecated compose API.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header):UserWarning")]

TINY = ("--arch", "deq_transformer_lm_tiny", "--task", "language_modeling", "--tokens-per-sample", "16")
STREAMING = ("--arch", "deq_transformer_lm_tiny", "--task", "deq_language_modeling", "--tokens-per-sample", "16")


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    return write_dictionary(tmp_path_factory.mktemp("fairseq_dict"))


def _sample(batch=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB + 4, (batch, length + 1), generator=g)
    return {"id": torch.arange(batch), "nsentences": batch, "ntokens": batch * length,
            "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((batch,), length)},
            "target": tokens[:, 1:].contiguous()}


def test_user_dir_registers_model_architectures_criterions_and_task(tmp_path):
    # A fresh interpreter that only does what --user-dir does.
    script = (
        "import json, argparse\n"
        "from fairseq import utils\n"
        f"utils.import_user_module(argparse.Namespace(user_dir={USER_DIR!r}))\n"
        "from fairseq.criterions import CRITERION_REGISTRY\n"
        "from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY\n"
        "from fairseq.tasks import TASK_REGISTRY\n"
        "print('REGISTERED', json.dumps({'archs': [a for a, m in ARCH_MODEL_NAME_REGISTRY.items() "
        "if m == 'deq_transformer_lm'], 'model': MODEL_REGISTRY['deq_transformer_lm'].__name__, "
        "'criterions': sorted(c for c in CRITERION_REGISTRY if c.endswith('_jr')), "
        "'task': 'deq_language_modeling' in TASK_REGISTRY}))\n")
    out = run([sys.executable, "-c", script], cwd=tmp_path).stdout
    got = json.loads(out.split("REGISTERED ", 1)[1].splitlines()[0])
    assert got == {"archs": ["deq_transformer_lm", "deq_transformer_lm_wt103", "deq_transformer_lm_wt103_preln",
                             "deq_transformer_lm_tiny"],
                   "model": "DEQTransformerLanguageModel", "criterions": ["adaptive_loss_jr", "cross_entropy_jr"],
                   "task": True}


class _Task:
    """The two attributes a model build reads from a task."""

    def __init__(self, dict_dir=None, size=None):
        d = Dictionary.load(str(dict_dir / "dict.txt")) if dict_dir is not None else Dictionary()
        if size is not None:
            for i in range(size - len(d)):
                d.add_symbol(f"w{i}")
        self.source_dictionary = self.target_dictionary = d


def test_every_deq_core_option_is_a_flag_of_the_same_name(dict_dir):
    core = {f.name for f in dataclasses.fields(DEQConfig)}
    assert set(DEQ_FIELD_NAMES.values()) == core
    cfg = parse_train_config(dict_dir, *TINY, "--f-max-iter", "5", "--jac-weight", "0.7", "--pretrain-steps", "9",
                             "--f-solver-options", "m=3,beta=0.5", "--b-solver", "anderson", "--no-check-finite",
                             "--backward", "phantom", "--eval-max-iter", "4")
    model = DEQTransformerLanguageModel.build_model(cfg.model, _Task(dict_dir))
    c = model.decoder.deq.config
    assert (c.f_max_iter, c.jac_weight, c.pretrain_steps, c.eval_max_iter) == (5, 0.7, 9, 4)
    assert c.f_solver_options == {"m": 3, "beta": 0.5, "lam": 1e-4} and c.b_solver == "anderson"
    assert c.check_finite is False and c.backward == "phantom"
    assert c.seed == cfg.common.seed                      # fairseq's --seed drives the layer's draws


def test_the_base_architecture_shares_the_deq_defaults_and_the_seed_is_fairseqs(dict_dir):
    from omegaconf import OmegaConf

    configs = {}
    for arch in ("deq_transformer_lm", "deq_transformer_lm_tiny"):
        cfg = parse_train_config(dict_dir, "--arch", arch, "--task", "language_modeling", "--tokens-per-sample",
                                 "16", "--seed", "7")
        configs[arch] = DEQTransformerLanguageModel.build_model(cfg.model, _Task(dict_dir)).decoder.deq.config
        # The model's seed is interpolated from common.seed, so a hydra config resolves it too.
        assert OmegaConf.to_container(cfg, resolve=True)["model"]["seed"] == 7
    for c in configs.values():
        assert (c.f_solver, c.b_solver, c.f_stop_mode, c.b_stop_mode, c.sample_dims, c.seed) == \
            ("anderson", "broyden", "rel", "rel", 2, 7)


@pytest.mark.parametrize("arch,pre_ln", [("deq_transformer_lm_wt103", False), ("deq_transformer_lm_wt103_preln", True)])
def test_wt103_architecture_has_the_papers_shapes(dict_dir, arch, pre_ln):
    cfg = parse_train_config(dict_dir, "--arch", arch, "--task", "deq_language_modeling", "--tokens-per-sample", "150",
                             "--criterion", "adaptive_loss_jr", "--ddp-backend", "legacy_ddp")
    model = DEQTransformerLanguageModel.build_model(cfg.model, _Task(size=267735))   # WikiText-103 vocabulary
    dec = model.decoder
    cell, c = dec.deq.f, dec.deq.config
    assert (dec.embed_dim, cell.attn.num_heads, cell.attn.head_dim) == (700, 10, 70)
    assert tuple(cell.ffn.fc1.weight.shape) == (48000, 700) and cell.normalize_before is pre_ln
    assert dec.memory.length == 300 and dec.embed_tokens.cutoff == [20000, 40000, 200000, 267735]
    assert dec.adaptive_softmax.cutoff == [20000, 40000, 200000, 267735]
    assert dec.adaptive_softmax.tail[0][2].weight is dec.embed_tokens.embeddings[1][0].weight   # tied
    assert (c.f_solver, c.f_max_iter, c.f_max_iter_jitter) == ("anderson", 12, 2)
    assert (c.b_solver, c.b_max_iter) == ("broyden", 13)
    assert (c.f_stop_mode, c.jac_weight, c.jac_weight_increment, c.jac_increment_every) == ("rel", 1.9, 0.1, 35000)
    assert (c.jac_freq, c.jac_probes, c.pretrain_steps, c.unrolled_layers) == (0.35, 1, 32000, 2)
    assert (cfg.model.dropout, cfg.model.attention_dropout) == (0.06, 0.01)
    total = sum(p.numel() for p in model.parameters())
    embeddings = sum(p.numel() for p in dec.embed_tokens.parameters())
    # 96.94M in all (the cell 69.76M, the d -> 3d injection 1.47M), of which 25.71M tied adaptive
    # embeddings: the paper's 98M counts them too.
    assert 96.9e6 < total < 97.0e6 and 25.5e6 < embeddings < 26.0e6
    assert cell.injection == "qkv" and tuple(dec.injection.weight.shape) == (2100, 700)
    assert (dec.layer_norm is None) == (not pre_ln)


def test_embedding_and_output_dropout_is_locked_over_positions(dict_dir):
    """The paper's variational dropout outside f: one mask per sequence, the same at every position."""
    _, _, model = build(dict_dir, *TINY, "--dropout", "0.5")
    seen = {}
    model.decoder.injection.register_forward_hook(lambda m, args, out: seen.update(embedded=args[0]))
    model.decoder.output_dropout.register_forward_hook(lambda m, args, out: seen.update(out=out, inp=args[0]))
    tokens = torch.full((4, 12), 7)                                  # one token at every position
    model.train()
    torch.manual_seed(0)
    model(tokens, features_only=True)
    embedded, kept = seen["embedded"], seen["out"] != 0
    assert bool((embedded == embedded[:, :1]).all())                  # same mask at every position
    assert not torch.equal(embedded[0], embedded[1])                  # a mask per sequence
    assert 0.3 < float((embedded[:, 0] == 0).float().mean()) < 0.7
    assert bool((kept == kept[:, :1]).all()) and not bool(kept.all())
    assert torch.allclose(seen["out"][kept], 2 * seen["inp"][kept])
    model.eval()
    model(tokens, features_only=True)
    assert torch.equal(seen["out"], seen["inp"])                      # no dropout in evaluation


def test_adaptive_input_first_segment_gradients_stay_bounded(dict_dir):
    cfg, task, model = build(dict_dir, *TINY, "--criterion", "adaptive_loss_jr", "--ddp-backend", "legacy_ddp",
                             "--adaptive-input", "--adaptive-input-cutoff", "10,20", "--adaptive-softmax-cutoff",
                             "10,20", "--tie-adaptive-weights", "--jac-freq", "1")
    pad = task.source_dictionary.pad()
    norms = model.decoder.embed_tokens(torch.arange(VOCAB + 4)[None])[0].norm(dim=-1)
    assert norms[pad] == 0 and bool((norms[torch.arange(VOCAB + 4) != pad] > 0).all())
    # A segment start without memory whose token is the first of an adaptive band but one:
    # fairseq's AdaptiveInput would give it a zero embedding, and z = 0 a degenerate fixed point.
    sample = _sample()
    sample["net_input"]["src_tokens"][:, 0] = torch.tensor([10 + pad, 20 + pad, 10 + pad, 20 + pad])
    model.train()
    loss, sample_size, _ = task.build_criterion(cfg.criterion)(model, sample)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert float(grad_norm) / sample_size < 100


def test_memory_gives_the_same_states_as_solving_both_segments_jointly(dict_dir):
    _, _, model = build(dict_dir, *STREAMING, "--f-stop-mode", "abs", "--eval-tol", "1e-9", "--eval-max-iter", "200",
                        "--mem-len", "16", "--injection", "qkv")   # the paper's layer: memory is [a | u_k | u_v]
    model = make_contractive(model).double().eval()
    tokens = torch.randint(4, VOCAB + 4, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        joint, _ = model(tokens, features_only=True)
        first, _ = model(tokens[:, :16], mem_key="valid", mem_segment=0, features_only=True)
        second, extra = model(tokens[:, 16:], mem_key="valid", mem_segment=1, features_only=True)
        alone, _ = model(tokens[:, 16:], features_only=True)
    assert bool(extra["deq_stats"].f_converged.all())
    # Causal attention: the first segment's fixed point does not depend on the second, and the
    # second segment with the first one's states as memory is the joint fixed point.
    assert torch.allclose(first, joint[:, :16], atol=1e-7)
    assert torch.allclose(second, joint[:, 16:], atol=1e-7)
    assert not torch.allclose(alone, joint[:, 16:], atol=1e-2)


def test_trainer_update_count_reaches_the_layer(dict_dir):
    cfg, task, model = build(dict_dir, *TINY, "--pretrain-steps", "5", "--criterion", "cross_entropy_jr")
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    model.set_num_updates(4)          # what fairseq's task.train_step calls every update
    assert model.decoder.deq.num_updates == 4
    _, _, log = criterion(model, _sample())
    assert model.decoder.deq.stats.mode == "unrolled" and float(log["deq_f_steps"]) == 2
    model.set_num_updates(5)
    criterion(model, _sample())
    assert model.decoder.deq.stats.mode == "implicit"


def test_jr_term_is_scaled_by_the_sample_size_and_backward_stats_are_logged(dict_dir):
    cfg, task, model = build(dict_dir, *TINY, "--criterion", "cross_entropy_jr", "--jac-freq", "1",
                             "--jac-weight", "0.5")
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    loss, sample_size, log = criterion(model, _sample())
    assert sample_size == 64 and log["deq_jr_weight"] == 0.5
    assert torch.allclose(loss.detach() - log["loss"], 0.5 * log["deq_jr"] * sample_size, rtol=1e-5)
    assert float(log["deq_b_calls"]) == 0
    loss.backward()
    assert float(log["deq_b_calls"]) == 1 and float(log["deq_b_steps"]) >= 1   # filled by backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_a_float32_solver(dict_dir, dtype):
    # Evaluation solves to the tolerance (or the precision floor), so that the half and float32
    # outputs are two estimates of one fixed point, not two 8-step trajectories of a slow solve.
    cfg, task, model = build(dict_dir, *TINY, "--criterion", "cross_entropy_jr", "--jac-freq", "1",
                             "--eval-max-iter", "30", "--injection", "qkv")
    model = make_contractive(model)
    criterion = task.build_criterion(cfg.criterion)
    sample = _sample()
    model.eval()
    with torch.no_grad():
        reference, _ = model(**sample["net_input"], features_only=True)
    model = model.to(dtype).train()    # what --fp16 does to the whole model
    loss, _, log = criterion(model, sample)
    loss.backward()
    stats = model.decoder.deq.stats
    assert stats.f_abs_res.dtype == torch.float32 and stats.b_steps is not None and "deq_jr" in log
    assert all(p.grad is None or (p.grad.dtype == dtype and torch.isfinite(p.grad).all()) for p in model.parameters())
    model.eval()
    with torch.no_grad():
        half, _ = model(**sample["net_input"], features_only=True)
    assert half.dtype == dtype
    assert (half.float() - reference).norm() / reference.norm() < 0.05


def test_autocast_trains_with_jr(dict_dir):
    cfg, task, model = build(dict_dir, *TINY, "--criterion", "cross_entropy_jr", "--jac-freq", "1")
    criterion = task.build_criterion(cfg.criterion)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, log = criterion(model, _sample())
    loss.backward()
    assert math.isfinite(float(loss.detach())) and "deq_jr" in log and float(log["deq_b_calls"]) == 1


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (("--f-max-iter", "0"), r"f_max_iter must be >= 1, got 0 \(command-line flag --f-max-iter\)"),
    (("--f-max-iter", "4", "--f-max-iter-jitter", "4"), r"f_max_iter_jitter must be < f_max_iter"),
    (("--f-solver-options", "m=0"), r"f_solver_options\['m'\] for solver 'anderson' must be >= 1"),
    (("--f-solver-options", "depth=3"), r"unknown option\(s\) \['depth'\]"),
    (("--jac-freq", "1.5"), r"jac_freq must be >= 0.0 and <= 1.0"),
])
def test_bad_deq_options_fail_while_parsing_arguments(dict_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        parse_train_config(dict_dir, *TINY, *flags)


@pytest.mark.parametrize("flags,message", [
    (("--decoder-embed-dim", "66"), "divisible by --decoder-attention-heads"),
    (("--tie-adaptive-weights",), "--tie-adaptive-weights needs --adaptive-input"),
    (("--adaptive-softmax-cutoff", "30,20"), "--adaptive-softmax-cutoff must be increasing cutoffs"),
    (("--adaptive-input",), "--adaptive-input needs --adaptive-input-cutoff"),
])
def test_bad_model_options_fail_when_the_model_is_built(dict_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        build(dict_dir, *TINY, *flags)


def test_streaming_task_rejects_what_it_cannot_stream(dict_dir):
    stream = ("--task", "deq_language_modeling", "--tokens-per-sample", "16")
    with pytest.raises(ValueError, match="use --sample-break-mode none"):
        build(dict_dir, "--arch", "deq_transformer_lm_tiny", *stream, "--sample-break-mode", "eos")
    with pytest.raises(ValueError, match="use --arch deq_transformer_lm\\* or --task language_modeling"):
        build(dict_dir, "--arch", "transformer_lm", *stream)
    _, task, _ = build(dict_dir, "--arch", "deq_transformer_lm_tiny", *stream)
    with pytest.raises(ValueError, match="drop --context-window"):
        task.eval_lm_dataloader(dataset=None, context_window=8)


def test_criterions_reject_models_they_cannot_serve(dict_dir):
    # While the arguments are parsed or the criterion is built, before any data loads ...
    with pytest.raises(UsageError, match="set --adaptive-softmax-cutoff, or use --criterion cross_entropy_jr"):
        parse_train_config(dict_dir, *TINY, "--criterion", "adaptive_loss_jr", "--ddp-backend", "legacy_ddp")
    cfg, task, model = build(dict_dir, "--arch", "transformer_lm", "--task", "language_modeling",
                             "--tokens-per-sample", "16", "--criterion", "cross_entropy_jr")
    with pytest.raises(UsageError, match="needs a model whose decoder returns DEQ statistics .* got --arch transformer_lm"):
        task.build_criterion(cfg.criterion)
    # ... and when a criterion built for one model is handed another.
    cfg, task, _ = build(dict_dir, *TINY, "--criterion", "adaptive_loss_jr", "--ddp-backend", "legacy_ddp",
                         "--adaptive-softmax-cutoff", "10")
    _, _, plain = build(dict_dir, *TINY)
    with pytest.raises(UsageError, match="set --adaptive-softmax-cutoff, or use --criterion cross_entropy_jr"):
        task.build_criterion(cfg.criterion)(plain, _sample())
    cfg, task, _ = build(dict_dir, *TINY, "--criterion", "cross_entropy_jr")
    _, _, other = build(dict_dir, "--arch", "transformer_lm", "--task", "language_modeling", "--tokens-per-sample", "16")
    with pytest.raises(UsageError, match="needs a model whose decoder returns DEQ statistics"):
        task.build_criterion(cfg.criterion)(other, _sample())


def test_jac_stop_epoch_needs_a_task_that_passes_the_epoch(dict_dir):
    with pytest.raises(UsageError, match="--task language_modeling does not: use --task deq_language_modeling or "
                                         "--jac-stop-step"):
        parse_train_config(dict_dir, *TINY, "--jac-stop-epoch", "3")
    _, _, model = build(dict_dir, *STREAMING, "--jac-stop-epoch", "3")
    model.train()
    with pytest.raises(UsageError, match="train with --task deq_language_modeling or use --jac-stop-step"):
        model(**_sample()["net_input"])     # a loop of one's own that never calls set_epoch
    model.set_epoch(3)
    model(**_sample()["net_input"])
    assert model.decoder.deq.jac_weight == 0.0


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-LN", "pre-LN"])
def test_both_presets_layers_train_and_their_solves_converge(dict_dir, pre_ln):
    # A behaviour test, not the layer's own equation: the pre-LN layer that kept an identity path
    # (f = h + FFN(LN2(h))) stayed near 10 bits with rel. residual 0.5 and JR near 1 (J_f = I + ...),
    # where the paper's layer (f = LN2(h) + FFN(LN2(h))) trains as post-LN does.
    torch.manual_seed(0)
    flags = [*TINY, "--injection", "qkv", "--criterion", "cross_entropy_jr", "--jac-weight", "1.9", "--jac-freq", "1",
             "--pretrain-steps", "0", "--dropout", "0"] + (["--decoder-normalize-before"] if pre_ln else [])
    cfg, task, model = build(dict_dir, *flags)
    criterion = task.build_criterion(cfg.criterion)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    losses, logs = [], []
    for step in range(40):
        # A learnable stream: each token is the previous one plus 1 or 2 (mod the vocabulary).
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        tokens = 4 + (start + torch.cumsum(torch.randint(1, 3, (8, 17), generator=g), dim=1)) % VOCAB
        sample = {"id": torch.arange(8), "nsentences": 8, "ntokens": 8 * 16,
                  "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((8,), 16)},
                  "target": tokens[:, 1:].contiguous()}
        model.set_num_updates(step)
        loss, size, log = criterion(model, sample)
        optimizer.zero_grad()
        (loss / size).backward()
        optimizer.step()
        losses.append(float(log["loss"]) / size)
        logs.append(log)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    rel_res = sum(float(log["deq_f_rel_res"]) for log in logs[-5:]) / 5
    jr = sum(float(log["deq_jr"]) for log in logs[-5:]) / 5
    assert rel_res < 0.02 and jr < 0.5, (rel_res, jr)


def test_segment_memory_is_tensors_in_the_state_dict_and_older_checkpoints_load(dict_dir):
    _, _, model = build(dict_dir, *STREAMING)
    net_input = dict(_sample()["net_input"], mem_key="train", mem_segment=4)
    model.decoder.set_epoch(2)
    model.train()
    model(**net_input)
    state = model.state_dict()
    entry = "decoder.memory.train@0/1"
    assert state[f"{entry}.states"].shape == (4, 16, 64)
    assert int(state[f"{entry}.next_segment"]) == 5 and int(state[f"{entry}.epoch"]) == 2
    x = torch.zeros(4, 16, 64)
    for saved in (state, {**{k: v for k, v in state.items() if not k.startswith("decoder.memory.")},
                          # the layout before the memory was tensors: the decoder's extra state
                          "decoder._extra_state": {"memory": {"train": {
                              "states": state[f"{entry}.states"], "next_segment": 5, "epoch": 2}}}}):
        _, _, fresh = build(dict_dir, *STREAMING)
        fresh.load_state_dict(saved)
        assert fresh.decoder.memory.read("train", 5, x).equal(state[f"{entry}.states"])
        assert fresh.decoder.memory.read("train", 4, x) is None
    # Memory written by two ranks is not this single process's streams.
    two_ranks = {k.replace("@0/1", "@0/2"): v for k, v in state.items()}
    _, _, fresh = build(dict_dir, *STREAMING)
    fresh.load_state_dict(two_ranks)
    assert fresh.decoder.memory.read("train", 5, x) is None


def test_every_option_an_architecture_sets_is_unset_in_the_config_by_default():
    # fairseq's hydra path fills in the dataclass defaults before the architecture function runs
    # (which keeps any value already there), so an option an architecture sets must default to None.
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY

    from fairseq_deq.models import DEQTransformerLMConfig

    defaults = {f.name: f.default for f in dataclasses.fields(DEQTransformerLMConfig)}
    archs = [a for a, m in ARCH_MODEL_NAME_REGISTRY.items() if m == "deq_transformer_lm" and a != m]
    assert len(archs) == 3
    for arch in archs:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](args)
        not_unset = sorted(k for k in vars(args) if k in defaults and defaults[k] is not None)
        assert not not_unset, (arch, not_unset)
