"""fairseq plugin end to end through the real command-line entry points on a generated corpus:
fairseq-preprocess, fairseq-train (streaming task with JR, stock task, resume), fairseq-eval-lm,
and the hub interface on the trained checkpoint."""
import math
import random
import re
import shutil

import pytest

pytest.importorskip("fairseq")

import torch  # noqa: E402

from tests._fairseq_helpers import (USER_DIR, cli, json_logs, parse_train_config, preprocess, run,  # noqa: E402
                                    tiny_train_args, write_topic_corpus)

# fairseq's config conversion goes through hydra's deprecated compose API, and its data loader
# asks for pinned memory on CPU-only machines.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    r"ignore:(?s).*(version_base|strict flag|ConfigStore schema|no longer experimental|package header"
    r"|'pin_memory'):UserWarning")]

STREAM = ("--task", "deq_language_modeling", "--criterion", "cross_entropy_jr")
# The JR weight grows by 0.5 every 100 updates after 20 pretraining updates (a 2-layer unrolled stack).
SCHEDULE = ("--pretrain-steps", "20", "--jac-weight-increment", "0.5", "--jac-increment-every", "100")


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq_cli")
    write_topic_corpus(root / "raw", {"train": 400, "valid": 40, "test": 40})
    preprocess(root / "raw", root / "data-bin")
    return root / "data-bin"


@pytest.fixture(scope="module")
def trained(data_bin):
    """300 updates of the tiny model with segment memory and JR; (checkpoint dir, log)."""
    save = data_bin.parent / "stream"
    proc = run(tiny_train_args(data_bin, save, *STREAM, *SCHEDULE, "--max-update", "300", "--log-interval", "10",
                               "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "20"), cwd=data_bin.parent)
    return save, proc.stdout


def test_streaming_task_continues_every_row_and_resets_memory_per_epoch(data_bin):
    from fairseq import tasks

    cfg = parse_train_config(data_bin, "--arch", "deq_transformer_lm_tiny", "--task", "deq_language_modeling",
                             "--tokens-per-sample", "16", "--batch-size", "8")
    task = tasks.setup_task(cfg.task)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    batches = list(task.get_batch_iterator(dataset, max_sentences=8).next_epoch_itr(shuffle=True))
    assert sum(b["ntokens"] for b in batches) == sum(dataset.sizes)     # every token once
    for s, (prev, cur) in enumerate(zip(batches, batches[1:])):
        assert (cur["net_input"]["mem_key"], cur["net_input"]["mem_segment"]) == ("valid", s + 1)
        rows = cur["target"].shape[0]
        # Row b of the next batch starts where row b of this one stopped.
        assert cur["net_input"]["src_tokens"][:, 0].equal(prev["target"][:rows, -1])

    model = task.build_model(cfg.model).eval()
    with torch.no_grad():
        model(**batches[0]["net_input"])
    net_input = dict(batches[1]["net_input"], mem_key="train")
    model.train()
    model(**net_input)
    x = torch.zeros(8, 16, 64)
    assert model.decoder.memory.read("valid", 1, x) is not None
    task.begin_valid_epoch(1, model)                  # a validation starts its streams afresh
    assert model.decoder.memory.read("valid", 1, x) is None
    assert model.decoder.memory.read("train", 2, x) is not None
    task.begin_epoch(2, model)                        # a new epoch forgets everything
    assert model.decoder.memory.read("train", 2, x) is None


def test_training_logs_jr_and_solver_metrics_and_switches_from_pretraining(trained):
    _, log = trained
    inner = json_logs(log, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == list(range(10, 301, 10))
    pretraining = [r for r in inner if int(r["num_updates"]) <= 20]
    assert all(float(r["f_steps"]) == 2 and "b_steps" not in r and "jr" not in r for r in pretraining)
    solving = [r for r in inner if int(r["num_updates"]) > 20]
    for r in solving:
        assert 2 < float(r["f_steps"]) <= 8 and 1 <= float(r["b_steps"]) <= 8
        assert math.isfinite(float(r["f_rel_res"])) and math.isfinite(float(r["b_rel_res"]))
    # JR runs on 35% of the updates (the arch's jac_freq): an interval of 10 may draw none, and
    # then shows the latest estimate.
    with_jr = [r for r in solving if int(r["jr_passes"]) > 0]
    assert len(with_jr) >= len(solving) - 3 and all(int(r["jr_passes"]) <= 10 for r in solving)
    assert all(float(r["jr"]) > 0 and float(r["jr_weight"]) in (1.0, 1.5, 2.0) for r in solving)
    assert float(inner[-1]["loss"]) < float(inner[0]["loss"]) - 0.5
    # Residuals keep 6 decimals (small ones would read 0 at fairseq's usual 3), step counts 3.
    residuals = [r[k] for r in solving for k in ("f_rel_res", "b_rel_res")]
    assert all(len(v.partition(".")[2]) <= 6 for v in residuals)
    assert any(len(v.partition(".")[2]) > 3 for v in residuals)
    assert all(len(r["f_steps"].partition(".")[2]) <= 3 for r in solving)
    valid = json_logs(log, "valid")
    assert len(valid) == 2                                     # end of epoch 1 and at --max-update
    for r in valid:
        assert 1 < float(r["valid_f_steps"]) <= 8 and math.isfinite(float(r["valid_ppl"]))
    assert "train_jr" in json_logs(log, "train")[0]


def test_resume_from_checkpoint_last_continues_the_update_count(trained, data_bin, tmp_path):
    save, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(save, resumed)
    proc = run(tiny_train_args(data_bin, resumed, *STREAM, *SCHEDULE,
                               "--max-update", "303", "--log-interval", "1", "--jac-freq", "1"), cwd=tmp_path)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 2 @ 300 updates\)", proc.stdout)
    inner = json_logs(proc.stdout, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [301, 302, 303]
    # Step 300 is past pretraining with the weight grown twice: the layer got the update count.
    assert all(float(r["jr_weight"]) == 2.0 and float(r["f_steps"]) > 2 for r in inner)


def test_a_run_resumed_mid_epoch_continues_exactly(data_bin, tmp_path):
    """The segment memory is in the checkpoint: after a mid-epoch resume, every update has the
    loss of the uninterrupted run (fairseq seeds every update from --seed and the update count)."""
    flags = (*STREAM, "--log-interval", "1", "--jac-freq", "1")
    whole = run(tiny_train_args(data_bin, tmp_path / "whole", *flags, "--max-update", "12"), cwd=tmp_path)
    run(tiny_train_args(data_bin, tmp_path / "parts", *flags, "--max-update", "6"), cwd=tmp_path)
    resumed = run(tiny_train_args(data_bin, tmp_path / "parts", *flags, "--max-update", "12"), cwd=tmp_path)
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch 1 @ 6 updates\)", resumed.stdout)
    reference = {int(r["num_updates"]): r for r in json_logs(whole.stdout, "train_inner")}
    after = {int(r["num_updates"]): r for r in json_logs(resumed.stdout, "train_inner")}
    assert sorted(after) == list(range(7, 13))
    for update, r in after.items():
        assert r["loss"] == reference[update]["loss"] and r["f_steps"] == reference[update]["f_steps"], update


def test_stock_language_modeling_task_trains_with_adaptive_softmax(data_bin):
    proc = run(tiny_train_args(
        data_bin, data_bin.parent / "stock", "--task", "language_modeling", "--criterion", "adaptive_loss_jr",
        "--ddp-backend", "legacy_ddp", "--adaptive-input", "--adaptive-input-cutoff", "12,24",
        "--adaptive-softmax-cutoff", "12,24", "--tie-adaptive-weights", "--tie-adaptive-proj",
        "--max-update", "8", "--log-interval", "4", "--jac-freq", "1"), cwd=data_bin.parent)
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 2 and all("jr" in r and "b_steps" in r for r in inner)
    (valid,) = json_logs(proc.stdout, "valid")
    assert math.isfinite(float(valid["valid_loss"])) and "valid_f_steps" in valid


def test_the_stock_criterion_trains_without_jr_and_says_so_at_the_first_update(data_bin):
    proc = run(tiny_train_args(data_bin, data_bin.parent / "stock_ce", "--task", "language_modeling",
                               "--criterion", "cross_entropy", "--max-update", "3", "--log-interval", "1",
                               "--jac-freq", "1"), cwd=data_bin.parent, warnings=True)
    assert proc.stdout.count("a backward pass reached the layer's output but not the JR term") == 1
    assert "--criterion cross_entropy_jr" in proc.stdout
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 3 and not any("jr" in r for r in inner)


def _eval_lm(data_bin, checkpoint, overrides: str):
    """(loss in bits, forward solver steps per position) that fairseq-eval-lm logs."""
    proc = run(cli("fairseq-eval-lm") + [
        str(data_bin), "--user-dir", USER_DIR, "--path", str(checkpoint), "--task", "deq_language_modeling",
        "--tokens-per-sample", "16", "--batch-size", "8", "--gen-subset", "test", "--cpu",
        "--model-overrides", overrides], cwd=data_bin.parent)
    match = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", proc.stdout)
    steps = re.search(r"DEQ forward solve over the evaluation: ([\d.]+) steps per position, abs. residual "
                      r"([\d.e+-]+), rel. residual ([\d.e+-]+)", proc.stdout)
    assert match and steps, proc.stdout[-3000:]
    return float(match.group(1)), float(steps.group(1))


def test_eval_lm_with_iteration_limits_and_memory(trained, data_bin):
    save, _ = trained
    checkpoint = save / "checkpoint_last.pt"
    (full, full_steps), (two_steps, limited), (no_memory, _) = (
        _eval_lm(data_bin, checkpoint, overrides) for overrides in ("{}", "{'eval_max_iter': 2}", "{'mem_len': 0}"))
    assert all(math.isfinite(v) for v in (full, two_steps, no_memory))
    assert limited <= 2 < full_steps <= 8                       # the override changed the solve, and
    assert full != two_steps                                    # eval-lm reports the solver's work
    # Words of a document come from its own small topic: context from the previous segment helps.
    assert full < no_memory - 0.05


def test_hub_interface_loads_the_checkpoint_and_samples_text(trained, data_bin):
    from fairseq_deq.models import DEQTransformerLanguageModel

    save, _ = trained
    lm = DEQTransformerLanguageModel.from_pretrained(str(save), checkpoint_file="checkpoint_last.pt",
                                                     data_name_or_path=str(data_bin), user_dir=USER_DIR)
    lm.eval()
    torch.manual_seed(0)
    text = lm.sample("w1 w2", beam=1, sampling=True, sampling_topk=5, max_len_b=12)
    words = text.split()
    assert words[:2] == ["w1", "w2"] and len(words) > 4
    assert all(re.fullmatch(r"w\d+", w) for w in words)
    # Incremental beam search, three times as many tokens as the training segment (16).
    long = lm.sample("w1 w2", beam=4, min_len=48, max_len_b=48).split()
    assert len(long) == 48 and long[:2] == ["w1", "w2"] and all(re.fullmatch(r"w\d+", w) for w in long)
    scores = lm.score("w1 w2 w1 w2")["positional_scores"]
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    # Scoring never mixes inputs: a sentence scores the same alone and inside a list of 20.
    rng = random.Random(0)
    sentences = [" ".join(f"w{rng.randrange(1, 30)}" for _ in range(rng.randrange(3, 12))) for _ in range(20)]
    together = [h["positional_scores"] for h in lm.score(sentences)]
    for sentence, scored in zip(sentences, together):
        alone = lm.score(sentence)["positional_scores"]
        assert torch.allclose(scored, alone, atol=1e-5), sentence


@pytest.mark.parametrize("flags,message", [
    (("--criterion", "adaptive_loss_jr", "--adaptive-softmax-cutoff", "12,24"), "--ddp-backend=legacy_ddp"),
    (("--criterion", "cross_entropy_jr", "--f-max-iter", "0"),
     "f_max_iter must be >= 1, got 0 (command-line flag --f-max-iter)"),
    (("--mem-len", "-1"), "--mem-len must be >= 0, got -1"),
])
def test_bad_flag_combinations_fail_before_any_data_loads(data_bin, tmp_path, flags, message):
    proc = run(tiny_train_args(data_bin, tmp_path / "ck", "--task", "language_modeling", *flags), cwd=tmp_path,
               check=False)
    assert proc.returncode != 0 and message in proc.stdout
    assert "begin training epoch" not in proc.stdout and "blocks from" not in proc.stdout


@pytest.mark.parametrize("flags,message", [
    (("--f-max-iter", "2", "--f-max-iter-jitter", "1"), "use --f-max-iter >= --f-max-iter-jitter + 2"),
    (("--adaptive-input", "--adaptive-input-cutoff", "5,10,15,20,25", "--criterion", "adaptive_loss_jr"),
     "gives the last of its 6 bands width 64 // 4**5 = 0"),
    (("--criterion", "cross_entropy_jr", "--adaptive-softmax-cutoff", "12,24"),
     "--criterion cross_entropy_jr needs a plain softmax; with --adaptive-softmax-cutoff use --criterion "
     "adaptive_loss_jr"),
])
def test_more_bad_flag_combinations_fail_while_fairseq_train_parses_its_arguments(data_bin, flags, message):
    # The same argument parsing fairseq-train runs first (the CLI cases above show it ends the run).
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_train_config(data_bin, "--arch", "deq_transformer_lm_tiny", "--task", "language_modeling",
                           "--tokens-per-sample", "16", *flags)


def test_memory_efficient_fp16_trains_a_half_model_with_jr_on_cpu(data_bin):
    flags = (*STREAM, "--max-update", "6", "--log-interval", "1", "--jac-freq", "1", "--disable-validation", "--no-save")
    half, full = (json_logs(run(tiny_train_args(data_bin, data_bin.parent / name, *flags, *extra),
                                cwd=data_bin.parent).stdout, "train_inner")
                  for name, extra in (("mefp16", ("--memory-efficient-fp16",)), ("fp32", ())))
    assert len(half) == len(full) == 6
    for r in half:
        assert math.isfinite(float(r["loss"])) and math.isfinite(float(r["jr"]))
        assert float(r["f_diverged"]) == 0.0 and 1 <= float(r["f_steps"]) <= 8
        assert 0.0 <= float(r["f_stalled"]) <= 1.0 and "b_stalled" in r
        assert float(r["loss_scale"]) >= 1
    # The backward residual is in the units of the unscaled loss (the loss scale, 128 at first,
    # multiplied it before), so it reads as the float32 run's does.
    ratios = sorted(float(h["b_abs_res"]) / float(f["b_abs_res"]) for h, f in zip(half, full))
    assert 0.1 < ratios[len(ratios) // 2] < 10, ratios


@pytest.mark.parametrize("flags, message", [
    (("--amp",), r"--amp is fairseq's CUDA autocast \(torch.cuda.amp\): on CPU it does nothing .* use "
                 r"--memory-efficient-fp16 \(a half-precision model"),
    (("--fp16",), r"--fp16 keeps its flattened float32 master weights on a CUDA device, and there is none here: "
                  r"add --fp16-no-flatten-grads or use --memory-efficient-fp16"),
    (("--bf16",), r"--bf16 in fairseq implies --tpu, which needs torch_xla \(not installed\): use --memory-efficient-fp16"),
    (("--memory-efficient-bf16",), r"--memory-efficient-bf16 in fairseq implies --tpu"),
])
@pytest.mark.parametrize("criterion", ["cross_entropy_jr", "adaptive_loss_jr"])
def test_precision_flags_that_cannot_run_on_cpu_are_refused(data_bin, flags, message, criterion):
    from fairseq import tasks

    extra = ("--adaptive-softmax-cutoff", "10", "--ddp-backend", "legacy_ddp") if criterion == "adaptive_loss_jr" else ()
    for task_name in ("deq_language_modeling", "language_modeling"):
        cfg = parse_train_config(data_bin, "--arch", "deq_transformer_lm_tiny", "--task", task_name,
                                 "--criterion", criterion, "--tokens-per-sample", "16", *extra, *flags)
        if task_name == "deq_language_modeling":
            with pytest.raises(ValueError, match=message):
                tasks.setup_task(cfg.task)
            continue
        task = tasks.setup_task(cfg.task)
        with pytest.raises(ValueError, match=message):
            task.build_criterion(cfg.criterion)
    ok = parse_train_config(data_bin, "--arch", "deq_transformer_lm_tiny", "--task", "deq_language_modeling",
                            "--criterion", criterion, "--tokens-per-sample", "16", *extra, "--memory-efficient-fp16")
    tasks.setup_task(ok.task).build_criterion(ok.criterion)


@pytest.mark.parametrize("flags, warns", [((), True), (("--load-checkpoint-on-all-dp-ranks",), False)])
def test_a_multi_process_run_is_told_the_flag_its_resume_needs(data_bin, caplog, flags, warns):
    from fairseq import tasks

    cfg = parse_train_config(data_bin, "--arch", "deq_transformer_lm_tiny", *STREAM, "--tokens-per-sample", "16",
                             "--distributed-world-size", "2", *flags)
    with caplog.at_level("WARNING"):
        tasks.setup_task(cfg.task)
    said = [r.getMessage() for r in caplog.records if "--load-checkpoint-on-all-dp-ranks" in r.getMessage()]
    assert len(said) == (1 if warns else 0), said


def _average_as_fairseq_does(paths):
    """What fairseq's ``scripts/average_checkpoints.py`` (not installed with fairseq) does to the
    model states: every value a tensor, summed through ``clone()``/``+=``, floats divided, integers
    floor-divided; the other entries are the first checkpoint's."""
    new_state, summed = None, {}
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=False)
        new_state = new_state or state
        for key, p in state["model"].items():
            p = p.float() if isinstance(p, torch.HalfTensor) else p
            summed[key] = p.clone() if key not in summed else summed[key].__iadd__(p)
    for key, v in summed.items():
        if v.is_floating_point():
            v.div_(len(paths))
        else:
            v //= len(paths)
    new_state["model"] = summed
    return new_state


def test_checkpoints_average_as_fairseq_users_do(data_bin, tmp_path):
    save = tmp_path / "save"
    run(tiny_train_args(data_bin, save, *STREAM, "--max-update", "6", "--save-interval-updates", "3",
                        "--disable-validation", "--jac-freq", "1"), cwd=tmp_path)
    paths = [save / "checkpoint_1_3.pt", save / "checkpoint_1_6.pt"]
    states = [torch.load(p, map_location="cpu", weights_only=True)["model"] for p in paths]
    assert states[0].keys() == states[1].keys() and all(torch.is_tensor(v) for v in states[0].values())
    assert any(k.startswith("decoder.memory.train@0/1.") for k in states[0])        # the memory is kept
    averaged = _average_as_fairseq_does(paths)
    torch.save(averaged, tmp_path / "averaged.pt")
    weight = "decoder.embed_tokens.weight"
    assert averaged["model"][weight].allclose((states[0][weight] + states[1][weight]) / 2)
    bits, steps = _eval_lm(data_bin, tmp_path / "averaged.pt", "{}")
    assert math.isfinite(bits) and steps >= 1


@pytest.mark.parametrize("arch", ["deq_transformer_lm_tiny", "deq_transformer_lm"])
def test_a_hydra_config_naming_an_architecture_builds_the_model_arch_builds(data_bin, tmp_path, arch):
    """fairseq-hydra-train fills in the model dataclass's defaults before the architecture
    function runs: the architecture's settings must still win, as with ``--arch``."""
    from fairseq import checkpoint_utils

    small = {} if arch.endswith("tiny") else {"decoder_embed_dim": 32, "decoder_ffn_embed_dim": 64}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in small.items()]
    cli_run = run(tiny_train_args(data_bin, tmp_path / "cli", *STREAM, "--max-update", "1", "--log-interval", "1",
                                  "--disable-validation", "--arch", arch, *flags), cwd=tmp_path)
    hydra_run = run(cli("fairseq-hydra-train") + [
        f"common.user_dir={USER_DIR}", "common.cpu=true", "common.seed=1", "common.log_format=json",
        "common.log_interval=1", "+task._name=deq_language_modeling", f"+task.data={data_bin}",
        "+task.tokens_per_sample=16", f"+model._name={arch}", "+model.dropout=0",
        *(f"+model.{k}={v}" for k, v in small.items()), "++criterion._name=cross_entropy_jr",
        "++optimizer._name=adam", "optimization.lr=[0.005]", "dataset.batch_size=8", "dataset.num_workers=0",
        "dataset.disable_validation=true", "optimization.max_update=1", f"checkpoint.save_dir={tmp_path / 'hydra'}",
        "checkpoint.no_epoch_checkpoints=true", f"hydra.run.dir={tmp_path / 'hydra_run'}"], cwd=tmp_path)
    (cli_model,), _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "cli" / "checkpoint_last.pt")])
    (hydra_model,), _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "hydra" / "checkpoint_last.pt")])
    assert hydra_model.decoder.deq.config == cli_model.decoder.deq.config
    assert ({k: v.shape for k, v in hydra_model.state_dict().items()}
            == {k: v.shape for k, v in cli_model.state_dict().items()})
    # The base architecture has no JR weight: the JR criterion says so once, on either path.
    for proc in (cli_run, hydra_run):
        said = proc.stdout.count("--criterion cross_entropy_jr adds no JR term")
        assert said == (1 if arch == "deq_transformer_lm" else 0), proc.stdout[-3000:]


@pytest.mark.parametrize("flags, message", [
    (("--task", "language_modeling", "--criterion", "adaptive_loss_jr"),
     "--criterion adaptive_loss_jr needs an adaptive softmax: set --adaptive-softmax-cutoff"),
    (("--task", "language_modeling", "--jac-stop-epoch", "2"),
     "--jac-stop-epoch needs the epoch number, .* use --task deq_language_modeling or --jac-stop-step"),
    (("--arch", "transformer_lm", "--task", "language_modeling", "--criterion", "cross_entropy_jr"),
     "--criterion cross_entropy_jr needs a model whose decoder returns DEQ statistics .* got --arch transformer_lm"),
    (("--task", "deq_language_modeling", "--tokens-per-sample", "0"), "--tokens-per-sample must be >= 1, got 0"),
    (("--task", "deq_language_modeling", "--dropout", "1.5"), r"--dropout is a dropout probability in \[0, 1\), got 1.5"),
    (("--task", "language_modeling", "--mem-len", "64"),
     "--mem-len 64 is the attention memory of --task deq_language_modeling's streams, and --task language_modeling "
     "has none"),
    (("--task", "deq_language_modeling", "--f-max-iter", "0"), r"f_max_iter must be >= 1, got 0 \(command-line flag"),
])
def test_bad_combinations_fail_in_one_line_before_data_loads(data_bin, tmp_path, flags, message):
    proc = run(tiny_train_args(data_bin, tmp_path, "--max-update", "1", *flags), cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert re.search(f"^fairseq-train: error: {message}", proc.stdout, re.M), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "loaded" not in proc.stdout, proc.stdout[-3000:]


def test_eval_lm_says_what_keeps_it_comparable_with_training(trained, data_bin):
    save, _ = trained
    base = cli("fairseq-eval-lm") + [str(data_bin), "--user-dir", USER_DIR, "--path", str(save / "checkpoint_last.pt"),
                                    "--gen-subset", "test", "--cpu"]
    # Without --batch-size the streaming task would cut the split into 36000 // 16 streams.
    proc = run(base + ["--task", "deq_language_modeling", "--tokens-per-sample", "16"], cwd=data_bin.parent,
               check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    assert re.search(r"^fairseq-eval-lm: error: fairseq-eval-lm --task deq_language_modeling needs --batch-size, "
                     r"the number of parallel streams .* would make 2250 streams", proc.stdout, re.M), proc.stdout[-2000:]
    # The plain task's blocks (1024 tokens by default) reach further back than training did.
    proc = run(base + ["--task", "language_modeling", "--batch-size", "2"], cwd=data_bin.parent)
    assert proc.stdout.count("training attended at most 47 (--mem-len 32 + --tokens-per-sample 16 - 1)") == 1
    assert re.search(r"Loss \(base 2\): [\d.]+", proc.stdout)


def test_the_reversible_mode_trains_from_the_command_line_and_logs_its_reconstruction(data_bin, tmp_path):
    proc = run(tiny_train_args(data_bin, tmp_path, *STREAM, "--backward", "reversible", "--reversible-steps", "4",
                               "--reversible-beta", "0.5", "--max-update", "60",
                               "--log-interval", "10"), cwd=tmp_path)
    inner = json_logs(proc.stdout, "train_inner")
    assert len(inner) == 6
    for r in inner:
        assert float(r["f_steps"]) == 9 and float(r["b_steps"]) == 8   # 2 N + 1 evaluations, 2 N products
        assert float(r["b_rel_res"]) < 1e-4 and float(r["b_diverged"]) == 0  # z0 rebuilt (float64 states)
    assert float(inner[-1]["loss"]) < float(inner[0]["loss"]) - 0.3  # measured 4.57 -> 4.10
