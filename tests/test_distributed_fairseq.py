"""fairseq-train with two CPU processes (gloo, legacy_ddp, one process per --distributed-rank) training
the DEQ-Transformer with JR, against one process holding both processes' streams."""
import math

import pytest

pytest.importorskip("fairseq")

import torch  # noqa: E402

from deq_core import DEQLayer  # noqa: E402
from tests._fairseq_helpers import USER_DIR, cli, json_logs, preprocess, write_topic_corpus  # noqa: E402
from tests._launch import check, free_port, start  # noqa: E402
from tests._maps import TanhCell  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

SEED, UPDATES, STREAMS = 5, 4, 4


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    root = tmp_path_factory.mktemp("fairseq_ddp")
    write_topic_corpus(root / "raw", {"train": 40, "valid": 8, "test": 8})
    preprocess(root / "raw", root / "data-bin")
    return root / "data-bin"


def _train(data_bin, save_dir, *extra):
    return cli("fairseq-train") + [
        str(data_bin), "--user-dir", USER_DIR, "--cpu", "--arch", "deq_transformer_lm_tiny",
        "--task", "deq_language_modeling", "--tokens-per-sample", "16", "--criterion", "cross_entropy_jr",
        "--jac-freq", "0.5", "--pretrain-steps", "0", "--dropout", "0", "--optimizer", "adam", "--lr", "0.005",
        "--max-update", str(UPDATES), "--log-interval", "1", "--log-format", "json", "--num-workers", "0",
        "--seed", str(SEED), "--save-dir", str(save_dir), "--no-epoch-checkpoints", *extra]


def test_two_cpu_processes_train_with_jr_like_one_process(data_bin):
    root = data_bin.parent
    dist = ["--distributed-world-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}",
            "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
            "--batch-size", str(STREAMS)]
    procs = [start(_train(data_bin, root / f"rank{r}", *dist, "--distributed-rank", str(r)), cwd=root)
             for r in (0, 1)]
    procs.append(start(_train(data_bin, root / "single", "--batch-size", str(2 * STREAMS)), cwd=root))
    ddp_log, _, single_log = check(procs)
    ddp, single = json_logs(ddp_log, "train_inner"), json_logs(single_log, "train_inner")
    assert len(ddp) == len(single) == UPDATES
    # Logged values are gathered from both processes: both ranks' streams per update.
    assert all(int(r["bsz"]) == 2 * STREAMS and int(r["wpb"]) == 2 * STREAMS * 16 for r in ddp)
    # JR ran at exactly the updates whose draw (fairseq's --seed, the update count) says so, and the
    # streams of the two ranks together are the single process's batch (before any update differs).
    probe = DEQLayer(TanhCell(2, 2), jac_weight=1.0, jac_freq=0.5, seed=SEED, f_max_iter=1,
                     name="decoder.deq")  # the model's name for its layer
    expected = []
    for step in range(UPDATES):
        probe.set_num_updates(step)
        expected.append(probe(torch.zeros(1, 2, dtype=torch.float64))[1].jac_frobenius is not None)
    assert set(expected) == {True, False}
    assert [int(r["jr_passes"]) for r in ddp] == [2 * ran for ran in expected]    # both ranks' passes
    assert [int(r["jr_passes"]) for r in single] == [int(ran) for ran in expected]
    # Every line has a JR estimate once one ran: the interval's, or the latest when it ran none.
    first = expected.index(True)
    assert all(r.get("jr") is None for r in ddp[:first]) and all(math.isfinite(float(r["jr"])) for r in ddp[first:])
    assert all(ddp[u]["jr"] == ddp[u - 1]["jr"] for u in range(first + 1, UPDATES) if not expected[u])
    for key in ("loss", "f_steps", "f_abs_res", "b_steps"):
        assert float(ddp[0][key]) == pytest.approx(float(single[0][key]), rel=2e-3, abs=2e-3), key
    assert (root / "rank0" / "checkpoint_last.pt").exists() and not (root / "rank1" / "checkpoint_last.pt").exists()


def test_two_processes_resumed_mid_epoch_continue_exactly(data_bin):
    """Every rank's segment memory is in the checkpoint: 4 updates, a resume, and 4 more give the
    losses of 8 straight updates (fairseq seeds every update from --seed and the update count)."""
    root = data_bin.parent

    def two_ranks(save_dir, updates):
        dist = ["--distributed-world-size", "2", "--distributed-init-method", f"tcp://127.0.0.1:{free_port()}",
                "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp",
                "--batch-size", str(STREAMS), "--jac-freq", "1", "--load-checkpoint-on-all-dp-ranks"]
        procs = [start(_train(data_bin, save_dir, *dist, "--distributed-rank", str(r), "--max-update", str(updates)),
                       cwd=root) for r in (0, 1)]
        return {int(r["num_updates"]): r for r in json_logs(check(procs)[0], "train_inner")}

    straight = two_ranks(root / "straight", 2 * UPDATES)
    two_ranks(root / "parts", UPDATES)
    resumed = two_ranks(root / "parts", 2 * UPDATES)
    assert sorted(resumed) == list(range(UPDATES + 1, 2 * UPDATES + 1))
    diffs = {u: abs(float(r["loss"]) - float(straight[u]["loss"])) for u, r in resumed.items()}
    assert max(diffs.values()) == 0.0, diffs
