"""The DEQ-Transformer is exactly causal: a token has no effect on the outputs at earlier positions,
because every position is its own sample for every solver decision (``sample_dims=2``)."""
import pytest
import torch

pytest.importorskip("fairseq")
from tests._fairseq_helpers import VOCAB, build, write_dictionary  # noqa: E402

LENGTH = 64
TINY = ("--arch", "deq_transformer_lm_tiny", "--task", "deq_language_modeling", "--tokens-per-sample", str(LENGTH))


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    return write_dictionary(tmp_path_factory.mktemp("fairseq_causal_dict"))


def _log_probs(model, tokens, first_segment=None):
    with torch.no_grad():
        if first_segment is None:
            logits, _ = model(tokens)
        else:  # the memory holds the first segment's states when the second one is solved
            model(first_segment, mem_key="valid", mem_segment=0)
            logits, _ = model(tokens, mem_key="valid", mem_segment=1)
    return torch.log_softmax(logits.double(), dim=-1)


def _max_leak(model, tokens, positions, first_segment=None):
    """The largest change of any earlier position's log-probabilities when the token at t changes."""
    base = _log_probs(model, tokens, first_segment)
    leak = 0.0
    for t in positions:
        changed = tokens.clone()
        changed[:, t] = 4 + (changed[:, t] - 4 + 7) % VOCAB
        other = _log_probs(model, changed, first_segment)
        leak = max(leak, float((other[:, :t] - base[:, :t]).abs().max()))
        assert not torch.equal(other[:, t:], base[:, t:])  # the token does change what follows
    return leak


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
@pytest.mark.parametrize("memory", [False, True])
def test_a_token_changes_nothing_at_earlier_positions(dict_dir, solver, memory):
    _, _, model = build(dict_dir, *TINY, "--f-solver", solver, "--mem-len", "16" if memory else "0")
    torch.manual_seed(0)
    model.eval()
    tokens = torch.randint(4, VOCAB + 4, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    first = torch.randint(4, VOCAB + 4, (2, 16), generator=torch.Generator().manual_seed(4)) if memory else None
    assert model.decoder.deq.config.sample_dims == 2
    assert _max_leak(model, tokens, range(1, LENGTH), first) == 0.0  # every t of the sequence


def test_the_joint_solve_leaks_and_that_is_why_it_is_not_the_default(dict_dir):
    _, _, model = build(dict_dir, *TINY, "--sample-dims", "1")
    torch.manual_seed(0)
    model.eval()
    tokens = torch.randint(4, VOCAB + 4, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    assert _max_leak(model, tokens, range(8, LENGTH, 8)) > 1e-5


@pytest.mark.parametrize("injection", ["qkv", "residual"])
def test_incremental_decoding_equals_full_sequence_scoring_and_reorders_for_beams(dict_dir, injection):
    _, _, model = build(dict_dir, *TINY, "--eval-tol", "1e-10", "--eval-max-iter", "200", "--injection", injection)
    model = model.double().eval()
    tokens = torch.randint(4, VOCAB + 4, (3, 24), generator=torch.Generator().manual_seed(5))
    full = _log_probs(model, tokens)
    state = {}
    steps = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, extra = model(tokens[:, : t + 1], incremental_state=state)
            assert logits.shape[1] == 1 and extra["deq_stats"].f_steps.numel() == 3  # one new position
            steps.append(torch.log_softmax(logits.double(), dim=-1)[:, 0])
    incremental = torch.stack(steps, dim=1)
    assert float((incremental - full).abs().max()) < 1e-6
    # Beam search reorders the hypotheses: the cached fixed points follow.
    order = torch.tensor([2, 0, 0])
    model.decoder.reorder_incremental_state_scripting(state, order)
    longer = torch.cat([tokens[order], tokens[order, -1:]], dim=1)
    with torch.no_grad():
        logits, _ = model(longer, incremental_state=state)
    reference = _log_probs(model, longer)[:, -1]
    assert float((torch.log_softmax(logits.double(), dim=-1)[:, 0] - reference).abs().max()) < 1e-6


def test_the_reversible_mode_is_exactly_causal(dict_dir):
    _, _, model = build(dict_dir, *TINY, "--backward", "reversible", "--reversible-steps", "4")
    model.eval()
    tokens = torch.randint(4, VOCAB + 4, (2, LENGTH), generator=torch.Generator().manual_seed(3))
    assert _max_leak(model, tokens, range(1, LENGTH, 3)) == 0.0


def test_reversible_incremental_decoding_equals_full_scoring_once_the_iteration_has_converged(dict_dir):
    # Decoding solves each new position against the cached states of the earlier ones, while full
    # scoring iterates all positions jointly for the same fixed step count: the two agree where
    # that count reaches the fixed point (here 100 steps: relative residual ~1e-11).
    _, _, model = build(dict_dir, *TINY, "--backward", "reversible", "--reversible-steps", "100")
    model = model.double().eval()
    tokens = torch.randint(4, VOCAB + 4, (3, 24), generator=torch.Generator().manual_seed(5))
    full = _log_probs(model, tokens)
    state, steps = {}, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, extra = model(tokens[:, : t + 1], incremental_state=state)
            assert extra["deq_stats"].f_steps.tolist() == [201] * 3
            steps.append(torch.log_softmax(logits.double(), dim=-1)[:, 0])
    assert float((torch.stack(steps, dim=1) - full).abs().max()) < 1e-6
