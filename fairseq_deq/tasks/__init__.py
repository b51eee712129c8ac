"""Tasks: language modeling over contiguous streams for the segment memory."""
from .deq_language_modeling import DEQLanguageModelingConfig, DEQLanguageModelingTask

__all__ = ["DEQLanguageModelingConfig", "DEQLanguageModelingTask"]
