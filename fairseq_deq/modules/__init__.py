"""Building blocks of the DEQ-Transformer: relative attention, feed-forward, the layer f, memory."""
from .deq_transformer_cell import INJECTIONS, DEQTransformerCell
from .feed_forward import PositionwiseFeedForward
from .relative_attention import RelativeMultiheadAttention, rel_shift, relative_positions
from .segment_memory import SegmentMemory

__all__ = ["DEQTransformerCell", "INJECTIONS", "PositionwiseFeedForward", "RelativeMultiheadAttention", "rel_shift",
           "relative_positions", "SegmentMemory"]
