"""fairseq plugin building blocks: relative attention, the layer f, stream batching, memory store."""
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
    a, mem = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    pos = relative_positions(10, 16, a.device, a.dtype)
    out = attn(a, pos, mem)
    changed = a.clone()
    changed[:, 3] += 1.0
    out2 = attn(changed, pos, mem)
    assert torch.allclose(out[:, :3], out2[:, :3], atol=1e-6)       # the past ignores the future
    assert not torch.allclose(out[:, 3:], out2[:, 3:], atol=1e-3)
    out3 = attn(a, pos, mem + 1.0)
    assert not torch.allclose(out, out3, atol=1e-3)                 # every query sees the memory


@pytest.mark.parametrize("pre_ln", [False, True])
def test_cell_supports_the_double_backward_jr_needs(pre_ln):
    torch.manual_seed(0)
    cell = DEQTransformerCell(16, 4, 32, dropout=0.1, attention_dropout=0.1, normalize_before=pre_ln).train()
    z = torch.randn(2, 5, 16, requires_grad=True)
    u1, u2 = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pos = relative_positions(8, 16, z.device, z.dtype)
    out = cell(z, u1, u2, pos, mem=torch.randn(2, 3, 16))
    (vjp,) = torch.autograd.grad(out, z, torch.randn_like(out), create_graph=True)
    vjp.pow(2).sum().backward()
    grads = [p.grad for p in cell.attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert cell.attn.q_proj.weight.grad.abs().sum() > 0


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
