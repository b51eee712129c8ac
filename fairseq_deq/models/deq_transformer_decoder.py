"""The DEQ-Transformer decoder: embeddings -> injection -> equilibrium of one weight-tied layer
(with segment memory) -> (final LayerNorm, pre-LN only) -> adaptive softmax or output projection."""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

import torch
from fairseq import utils
from fairseq.models import FairseqIncrementalDecoder
from fairseq.modules import AdaptiveSoftmax
from torch import nn

from deq_core import DEQConfig, DEQLayer, UsageError, VariationalDropout, apply_weight_norm

from ..modules import DEQTransformerCell, SegmentMemory, relative_positions

__all__ = ["DEQTransformerDecoder"]

logger = logging.getLogger(__name__)


class DEQTransformerDecoder(FairseqIncrementalDecoder):
    """Decoder whose hidden states are the fixed point of
    :class:`~fairseq_deq.modules.deq_transformer_cell.DEQTransformerCell`.

    ``forward(tokens, mem_key=None, mem_segment=None)``: when a streaming task passes the stream
    key and segment index, the layer attends to the memory of the previous segment of the same
    stream and the memory is updated (detached). The second output holds ``deq_stats`` (the
    layer's :class:`~deq_core.DEQStats`) and ``deq_backward``, its ``backward_summary()`` (ran,
    steps, abs and rel residual of the implicit backward solve), filled in by ``backward()``.

    As in the paper, the injection is a linear map of the embeddings (by default ``d -> 3d``,
    added to the layer's queries, keys and values; see ``--injection``), and dropout on the embeddings and on the output is
    variational (locked): one mask per sequence, the same at every position. A post-LN layer's
    output is already normalized; a pre-LN model ends with a LayerNorm.

    Incremental decoding (``incremental_state``, as fairseq's generators pass it): the state
    holds what the positions decoded so far leave for later ones to attend to, at their fixed points, and each
    new token solves only for its own position while attending to them, as a segment attends to
    its memory. A new token attends to at most ``mem_len + tokens_per_sample - 1`` earlier
    positions, the most any position attends to in training.
    """

    def __init__(self, cfg: Any, dictionary, embed_tokens: nn.Module, deq_config: DEQConfig) -> None:
        super().__init__(dictionary)
        dim = cfg.decoder_embed_dim
        self.embed_dim = dim
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(dim)
        self.embed_dropout = VariationalDropout.features1d(cfg.dropout)
        cell = DEQTransformerCell(dim, cfg.decoder_attention_heads, cfg.decoder_ffn_embed_dim,
                                  dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
                                  activation_dropout=cfg.activation_dropout,
                                  normalize_before=cfg.decoder_normalize_before, init_std=cfg.init_std,
                                  injection=cfg.injection)
        self.injection = nn.Linear(dim, cell.injection_dim)
        if cfg.init_std is not None:
            nn.init.normal_(self.injection.weight, std=cfg.init_std)
            nn.init.zeros_(self.injection.bias)
        if not cfg.no_weight_norm:
            apply_weight_norm(self.injection)
            apply_weight_norm(cell)
        self.deq = DEQLayer(cell, deq_config)
        self.layer_norm = nn.LayerNorm(dim) if cfg.decoder_normalize_before else None
        self.output_dropout = VariationalDropout.features1d(cfg.dropout)
        self.memory = SegmentMemory(cfg.mem_len)
        self.max_target_positions = cfg.max_target_positions
        self.context = cfg.mem_len + cfg.tokens_per_sample - 1  # positions a new token attends to
        self._needs_epoch = deq_config.jac_stop_epoch is not None
        self._warned_context = False  # a forward longer than training's context, told once
        self._epoch: Optional[int] = None
        self.output_projection: Optional[nn.Module] = None
        self._build_output(cfg, dictionary, embed_tokens)

    def _build_output(self, cfg: Any, dictionary, embed_tokens: nn.Module) -> None:
        if cfg.adaptive_softmax_cutoff is not None:
            self.adaptive_softmax = AdaptiveSoftmax(
                len(dictionary), self.embed_dim,
                utils.eval_str_list(cfg.adaptive_softmax_cutoff, type=int),
                dropout=cfg.adaptive_softmax_dropout,
                adaptive_inputs=embed_tokens if cfg.tie_adaptive_weights else None,
                factor=cfg.adaptive_softmax_factor, tie_proj=cfg.tie_adaptive_proj)
        elif cfg.share_decoder_input_output_embed:
            self.output_projection = nn.Linear(self.embed_dim, len(dictionary), bias=False)
            self.output_projection.weight = embed_tokens.weight
        else:
            self.output_projection = nn.Linear(self.embed_dim, len(dictionary), bias=False)
            nn.init.normal_(self.output_projection.weight, std=self.embed_dim ** -0.5)

    # -- fairseq hooks ---------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Called by the model's ``set_epoch`` (the streaming task calls it every epoch)."""
        self._epoch = int(epoch)

    def max_positions(self) -> int:
        """The longest input scored or generated (``--max-target-positions``)."""
        return self.max_target_positions

    def upgrade_state_dict_named(self, state_dict: Dict[str, Any], name: str) -> Dict[str, Any]:
        """fairseq's hook before loading: a checkpoint written when the memory was saved as the
        decoder's extra state (one process's streams) loads as that of rank 0 of 1."""
        prefix = f"{name}." if name else ""
        old = state_dict.pop(f"{prefix}_extra_state", None)
        for key, e in (old or {}).get("memory", {}).items():
            entry = f"{prefix}memory.{key}@0/1"
            state_dict[f"{entry}.states"] = e["states"]
            state_dict[f"{entry}.next_segment"] = torch.tensor(int(e["next_segment"]))
            state_dict[f"{entry}.epoch"] = torch.tensor(-1 if e["epoch"] is None else int(e["epoch"]))
        return super().upgrade_state_dict_named(state_dict, name)

    def reset_memory(self, training: Optional[bool] = None, keep_epoch: Optional[int] = None) -> None:
        """Forget the segment memory (see :meth:`~fairseq_deq.modules.segment_memory.SegmentMemory.reset`)."""
        self.memory.reset(training, keep_epoch)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, prev_output_tokens: torch.Tensor, encoder_out: Any = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[torch.Tensor]]]] = None,
                src_lengths: Optional[torch.Tensor] = None, mem_key: Optional[str] = None,
                mem_segment: Optional[int] = None, features_only: bool = False,
                **unused: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Logits (or features) of ``prev_output_tokens``; see the class docstring for the memory
        and incremental arguments. Returns ``(x, extra)`` as fairseq decoders do."""
        x, extra = self.extract_features(prev_output_tokens, incremental_state=incremental_state,
                                         mem_key=mem_key, mem_segment=mem_segment)
        if not features_only:
            x = self.output_layer(x)
        return x, extra

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[torch.Tensor]]],
                                  new_order: torch.Tensor) -> None:
        """Follow beam search's reordering of the hypotheses (rows of the cached states)."""
        cached = self.get_incremental_state(incremental_state, "past")
        if cached is not None and cached.get("states") is not None:
            cached["states"] = cached["states"].index_select(0, new_order)
            self.set_incremental_state(incremental_state, "past", cached)

    def extract_features(self, prev_output_tokens: torch.Tensor,
                         incremental_state: Optional[Dict[str, Dict[str, Optional[torch.Tensor]]]] = None,
                         mem_key: Optional[str] = None, mem_segment: Optional[int] = None,
                         **unused: Any) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The fixed point of every (new) position (final-LayerNorm'ed in a pre-LN model), and the statistics."""
        past: Optional[torch.Tensor] = None
        if incremental_state is not None:
            if mem_key is not None:
                raise ValueError("incremental decoding attends to the decoded positions, not to a stream's "
                                 "segment memory: pass incremental_state or mem_key, not both")
            cached = self.get_incremental_state(incremental_state, "past")
            past = None if cached is None else cached.get("states")
            if past is not None:
                prev_output_tokens = prev_output_tokens[:, -1:]
        if self.training and self._needs_epoch and self._epoch is None:
            raise UsageError("--jac-stop-epoch needs the epoch number, which fairseq's trainer only "
                             "passes to models through the task: train with --task deq_language_modeling "
                             "or use --jac-stop-step")
        x = self.embed_dropout(self.embed_scale * self.embed_tokens(prev_output_tokens))
        u = self.injection(x)
        if incremental_state is not None:
            mem = None if past is None or self.context == 0 else past[:, -self.context:].to(x.dtype)
        else:
            mem = None if mem_key is None else self.memory.read(mem_key, int(mem_segment), x)
        klen = x.shape[1] + (0 if mem is None else mem.shape[1])
        if incremental_state is None and klen - 1 > self.context and not self._warned_context:
            self._warned_context = True
            mem_len = self.memory.length
            tokens = self.context - mem_len + 1
            logger.warning(f"scoring {x.shape[1]} tokens at once: the last attends {klen - 1} positions back, and "
                           f"training attended at most {self.context} (--mem-len {mem_len} + --tokens-per-sample "
                           f"{tokens} - 1); fairseq-eval-lm evaluates as training did with --task "
                           f"deq_language_modeling --tokens-per-sample {tokens}")
        pos = relative_positions(klen, self.embed_dim, x.device, x.dtype)
        # The state has the model's dtype (under autocast the ops choose their own precision);
        # the solvers keep their iterates in float32 whatever it is.
        z, stats = self.deq(u, pos, z0=x.new_zeros(x.shape), mem=mem)
        if mem_key is not None or incremental_state is not None:
            with torch.no_grad():
                current = self.deq.f.memory_entry(z.detach(), u.detach())
            if incremental_state is not None:
                states = current if past is None else torch.cat([past, current], dim=1)
                self.set_incremental_state(incremental_state, "past", {"states": states[:, -max(self.context, 1):]})
            else:
                self.memory.write(mem_key, int(mem_segment), mem, current, self.training, self._epoch)
        extra = {"attn": None, "deq_stats": stats, "deq_backward": stats.backward_summary()}
        return self.features_from_deq_state(z), extra

    def features_from_deq_state(self, z: torch.Tensor) -> torch.Tensor:
        """The features :meth:`extract_features` gives for the equilibrium layer's state ``z``
        (final LayerNorm in a pre-LN model, output dropout); fixed-point correction applies it
        to the solver states it supervises."""
        if self.layer_norm is not None:
            z = self.layer_norm(z)
        return self.output_dropout(z)

    def output_layer(self, features: torch.Tensor, **unused: Any) -> torch.Tensor:
        """Logits of ``features`` (the features themselves with an adaptive softmax, which the criterion applies)."""
        if self.adaptive_softmax is not None:
            return features
        return self.output_projection(features)
