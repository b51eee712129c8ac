"""The DEQ-Transformer language model and its architectures."""
from .deq_transformer_decoder import DEQTransformerDecoder
from .deq_transformer_lm import DEQTransformerLanguageModel, DEQTransformerLMConfig

__all__ = ["DEQTransformerDecoder", "DEQTransformerLanguageModel", "DEQTransformerLMConfig"]
