"""fairseq plugin building blocks: relative attention, the layer f, stream batching, memory store."""
import math

import pytest

pytest.importorskip("fairseq")

import torch  # noqa: E402

from fairseq_deq.data import stream_batches  # noqa: E402
from fairseq_deq.modules import (DEQTransformerCell, RelativeMultiheadAttention, SegmentMemory,  # noqa: E402
                                 rel_shift, relative_positions)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rel_shift_matches_explicit_indexing():
    t, k = 5, 9
    x = torch.randn(2, 3, t, k)
    out = rel_shift(x)
    for i in range(t):
        for j in range(k - t + i + 1):  # keys up to the query's own position
            assert out[:, :, i, j].equal(x[:, :, i, j + t - 1 - i])


def test_attention_is_causal_and_uses_memory():
    torch.manual_seed(0)
    attn = RelativeMultiheadAttention(16, 4).eval()
    a = torch.randn(2, 6, 16)
    pos = relative_positions(10, 16, a.device, a.dtype)
    u, mem = torch.randn(2, 6, 48), torch.randn(2, 4, 48)
    out = attn(a, pos, mem, u)
    for which in ("input", "injection"):
        a2, u2 = a.clone(), u.clone()
        (a2 if which == "input" else u2)[:, 3] += 1.0
        out2 = attn(a2, pos, mem, u2)
        assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)   # the past ignores the future
        assert not torch.allclose(out[:, 3:], out2[:, 3:], atol=1e-3)
    for part in (slice(0, 16), slice(16, 32), slice(32, 48)):       # memory's input, key and value injection
        shifted = mem.clone()
        shifted[..., part] += 1.0
        assert not torch.allclose(out, attn(a, pos, shifted, u), atol=1e-3)  # every query sees the memory


def test_attention_injects_into_queries_keys_and_values():
    """[q, k, v] = W_qkv a + u: adding W_qkv d to u is the same as adding d to the input."""
    torch.manual_seed(0)
    attn = RelativeMultiheadAttention(16, 4).eval()
    a, u, d = torch.randn(2, 6, 16), torch.randn(2, 6, 48), torch.randn(2, 6, 16)
    pos = relative_positions(6, 16, a.device, a.dtype)
    w_qkv = torch.cat([attn.q_proj.weight, attn.kv_proj.weight])
    assert torch.allclose(attn(a + d, pos, u=u), attn(a, pos, u=u + d @ w_qkv.T), atol=1e-5)


def test_a_float64_attention_computes_in_float64():
    """Central differences at step 1e-6 match the exact directional derivative to ~1e-9 only if
    nothing on the way (scores, softmax, positions) rounds to float32 (then they are off by ~0.1)."""
    torch.manual_seed(0)
    attn = RelativeMultiheadAttention(16, 4).eval().double()
    a, u, d = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 6, 16), (2, 6, 48), (2, 6, 16)))
    pos = relative_positions(6, 16, a.device, a.dtype)

    def f(x):
        return attn(x, pos, u=u)

    _, exact = torch.func.jvp(f, (a,), (d,))
    eps = 1e-6
    with torch.no_grad():
        exact, central = exact.detach(), (f(a + eps * d) - f(a - eps * d)) / (2 * eps)
    assert float((central - exact).norm() / exact.norm()) < 1e-7


def test_float64_positions_are_exact_in_float64():
    pos = relative_positions(300, 64, torch.device("cpu"), torch.float64)
    angle = 299 * 10000 ** (-2 * 5 / 64)       # distance 299 (row 0), frequency 5
    assert abs(float(pos[0, 5]) - math.sin(angle)) < 1e-12 and abs(float(pos[0, 37]) - math.cos(angle)) < 1e-12


@pytest.mark.parametrize("injection", ["qkv", "residual"])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_cell_supports_the_double_backward_jr_needs(pre_ln, injection):
    torch.manual_seed(0)
    cell = DEQTransformerCell(16, 4, 32, dropout=0.1, attention_dropout=0.1, normalize_before=pre_ln,
                              injection=injection).train()
    z = torch.randn(2, 5, 16, requires_grad=True)
    u = torch.randn(2, 5, cell.injection_dim)
    pos = relative_positions(8, 16, z.device, z.dtype)
    mem = cell.memory_entry(torch.randn(2, 3, 16), torch.randn(2, 3, cell.injection_dim)).detach()
    out = cell(z, u, pos, mem=mem)
    (vjp,) = torch.autograd.grad(out, z, torch.randn_like(out), create_graph=True)
    vjp.pow(2).sum().backward()
    grads = [p.grad for p in cell.attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert cell.attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pre_ln", [False, True])
def test_cell_layouts_follow_their_equations(pre_ln):
    torch.manual_seed(0)
    z, pos = torch.randn(2, 5, 16), relative_positions(5, 16, torch.device("cpu"), torch.float32)
    paper = DEQTransformerCell(16, 4, 32, normalize_before=pre_ln, injection="qkv").eval()
    u = torch.randn(2, 5, 48)
    a = paper.attn_norm(z) if pre_ln else z
    attn = paper.attn(a, pos, u=u)
    if pre_ln:  # the paper's code: the attention block's output normalized before the residual
        b = paper.ffn_norm(z + attn)
        expected = b + paper.ffn(b)
    else:
        h = paper.attn_norm(z + attn)
        expected = paper.ffn_norm(h + paper.ffn(h))
    assert torch.allclose(paper(z, u, pos), expected, atol=1e-6)
    residual = DEQTransformerCell(16, 4, 32, normalize_before=pre_ln, injection="residual").eval()
    u_attn, u_ffn = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    a = (residual.attn_norm(z) if pre_ln else z) + u_attn
    attn = residual.attn(a, pos)
    if pre_ln:
        b = residual.ffn_norm(z + attn)
        expected = b + residual.ffn(b + u_ffn)
    else:
        b = residual.attn_norm(a + attn) + u_ffn
        expected = residual.ffn_norm(b + residual.ffn(b))
    assert torch.allclose(residual(z, torch.cat([u_attn, u_ffn], -1), pos), expected, atol=1e-6)
    with pytest.raises(ValueError, match="injection must be one of"):
        DEQTransformerCell(16, 4, 32, injection="ffn")


def test_stream_batches_keep_each_row_on_one_column_and_cover_every_block_once():
    blocks, batch, shards = 53, 3, 2
    per_shard = [stream_batches(blocks, batch, shards, s) for s in range(shards)]
    seen = sorted(i for batches in per_shard for b in batches for i in b)
    assert seen == list(range(blocks))
    assert len(per_shard[0]) == len(per_shard[1])                  # every worker runs the same steps
    segments = len(per_shard[0])
    for batches in per_shard:
        for s in range(1, segments):
            prev, cur = batches[s - 1], batches[s]
            assert len(cur) <= len(prev)                            # rows only drop at the end
            assert cur == [i + 1 for i in prev[:len(cur)]]          # row b continues its column
    with pytest.raises(ValueError, match="batch size"):
        stream_batches(10, 0)


def test_segment_memory_reads_only_the_next_segment_of_the_same_stream():
    mem = SegmentMemory(4)
    x = torch.randn(2, 3, 8)
    mem.write("valid", 0, None, x, training=False)
    assert mem.read("valid", 0, x) is None                          # not a continuation
    assert mem.read("train", 1, x) is None                          # another stream
    got = mem.read("valid", 1, x)
    assert got.equal(x)
    y = torch.randn(2, 3, 8)
    mem.write("valid", 1, got, y, training=False)
    assert mem.read("valid", 2, y).equal(torch.cat([x, y], 1)[:, -4:])   # the last 4 positions
    assert mem.read("valid", 2, y[:1]).shape[0] == 1                # a shorter final batch
    mem.write("train", 5, None, x, training=True)
    mem.reset(training=False)
    assert mem.read("valid", 2, y) is None and mem.read("train", 6, x) is not None
    mem.reset()
    assert mem.read("train", 6, x) is None
