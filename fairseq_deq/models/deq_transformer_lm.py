"""``deq_transformer_lm``: the DEQ-Transformer language model (Bai, Koltun and Kolter, ICML 2021)
registered with fairseq, and its named architectures."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq import utils
from fairseq.dataclass import ChoiceEnum
from fairseq.models import FairseqLanguageModel, register_model, register_model_architecture
from fairseq.modules import AdaptiveInput
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import nn

from deq_core import DEQConfig, UsageError, name_deq_layers

from ..modules import INJECTIONS

from ..options import deq_config_from, deq_options
from .deq_transformer_decoder import DEQTransformerDecoder

__all__ = ["DEQTransformerLanguageModel", "DEQTransformerLMConfig"]

DEFAULT_MAX_TARGET_POSITIONS = 1024
_STREAMING_TASK = "deq_language_modeling"  # the task that feeds the segment memory


# The DEQ defaults every architecture shares (``--arch deq_transformer_lm`` included): the paper's
# solver set-up (Anderson forward, Broyden backward, relative stop test), one JR probe, and every
# position its own solver sample, so that no solver decision at one position looks at the
# positions after it and the model is exactly causal (the joint solve leaks ~1e-2 nats).
_DEQ_DEFAULTS = dict(f_solver="anderson", b_solver="broyden", f_stop_mode="rel", b_stop_mode="rel",
                     jac_probes=1, sample_dims=2)
# The layer's options that architectures set: None in the config unless given (see deq_options).
_ARCH_DEQ_FIELDS = (*_DEQ_DEFAULTS, "f_max_iter", "f_max_iter_jitter", "b_max_iter", "jac_weight",
                    "jac_weight_increment", "jac_increment_every", "jac_freq", "pretrain_steps", "unrolled_layers")

_BY_ARCH = " (default: the architecture's)"


@dataclass
class DEQTransformerLMConfig(deq_options("DEQTransformerLMOptions", by_architecture=_ARCH_DEQ_FIELDS)):
    """Model options; the equilibrium layer's options come from :class:`~fairseq_deq.options.DEQOptions`.

    The options an architecture sets are None unless given: the architecture function (or, for
    ``deq_transformer_lm`` itself, :meth:`DEQTransformerLanguageModel.build_model`) fills them
    in, also when a hydra config names the architecture (``model._name``).
    """

    decoder_embed_dim: Optional[int] = field(default=None, metadata={"help": "model dimension" + _BY_ARCH})
    decoder_ffn_embed_dim: Optional[int] = field(default=None, metadata={
        "help": "inner dimension of the FFN" + _BY_ARCH})
    decoder_attention_heads: Optional[int] = field(default=None, metadata={"help": "attention heads" + _BY_ARCH})
    decoder_normalize_before: Optional[bool] = field(default=None, metadata={
        "help": "pre-LN layer (default: the architecture's; deq_transformer_lm: post-LN as in Transformer-XL)"})
    dropout: Optional[float] = field(default=None, metadata={
        "help": "variational (locked) dropout on the embeddings, inside the layer and on its output" + _BY_ARCH})
    attention_dropout: Optional[float] = field(default=None, metadata={
        "help": "variational dropout on the attention probabilities" + _BY_ARCH})
    activation_dropout: Optional[float] = field(default=None, metadata={
        "help": "variational dropout after the FFN activation" + _BY_ARCH})
    injection: Optional[ChoiceEnum(INJECTIONS)] = field(default=None, metadata={
        "help": "where the embeddings' injection enters the layer: 'qkv' (the paper's: a d -> 3d map added to the "
                "attention's queries, keys and values) or 'residual' (d -> 2d, added to the attention input "
                "and to the feed-forward input)" + _BY_ARCH})
    mem_len: Optional[int] = field(default=None, metadata={
        "help": "positions of previous segments kept as attention memory (used with "
                "--task deq_language_modeling, which streams the corpus)" + _BY_ARCH})
    no_weight_norm: bool = field(default=False, metadata={
        "help": "do not put DEQ weight normalization on the layer's and the injection's linears"})
    no_scale_embedding: bool = field(default=False, metadata={"help": "do not scale embeddings by sqrt(d)"})
    init_std: Optional[float] = field(default=None, metadata={
        "help": "std of a normal init of the layer's and the injection's weights (default: torch's fan-in "
                "uniform init, as the paper's 1x1 convolutions; with 0.02 a small model's first LayerNorm "
                "sees a near-zero input at z = 0 and its gradients are ~20x larger)"})
    share_decoder_input_output_embed: Optional[bool] = field(default=None, metadata={
        "help": "tie the output projection to the (plain) input embedding" + _BY_ARCH})
    adaptive_input: Optional[bool] = field(default=None, metadata={"help": "use fairseq's AdaptiveInput" + _BY_ARCH})
    adaptive_input_factor: Optional[float] = field(default=None, metadata={
        "help": "adaptive input dimension divisor" + _BY_ARCH})
    adaptive_input_cutoff: Optional[str] = field(default=None, metadata={
        "help": "comma separated adaptive input cutoffs" + _BY_ARCH})
    adaptive_softmax_cutoff: Optional[str] = field(default=None, metadata={
        "help": "comma separated adaptive softmax cutoffs (use with --criterion adaptive_loss_jr)" + _BY_ARCH})
    adaptive_softmax_dropout: float = field(default=0.0, metadata={
        "help": "dropout in the adaptive softmax tail projections"})
    adaptive_softmax_factor: Optional[float] = field(default=None, metadata={
        "help": "adaptive softmax dimension divisor" + _BY_ARCH})
    tie_adaptive_weights: Optional[bool] = field(default=None, metadata={
        "help": "tie adaptive softmax and adaptive input weights" + _BY_ARCH})
    tie_adaptive_proj: Optional[bool] = field(default=None, metadata={
        "help": "tie adaptive softmax and adaptive input projections" + _BY_ARCH})
    # From other parts of the config.
    tokens_per_sample: int = II("task.tokens_per_sample")
    max_target_positions: Optional[int] = II("task.max_target_positions")


@register_model("deq_transformer_lm", dataclass=DEQTransformerLMConfig)
class DEQTransformerLanguageModel(FairseqLanguageModel):
    """A language model whose single weight-tied Transformer-XL layer is solved to equilibrium."""

    #: the streaming task checks this before feeding ``mem_key``/``mem_segment``.
    supports_segment_memory = True
    #: the decoder returns ``deq_stats``, which the JR criterions check when they are built.
    returns_deq_stats = True

    @classmethod
    def build_model(cls, cfg: DEQTransformerLMConfig, task) -> "DEQTransformerLanguageModel":
        """fairseq's factory: the model for ``cfg`` on ``task``'s dictionary, options checked (the
        options no architecture function set take ``deq_transformer_lm``'s defaults)."""
        _base_architecture(cfg)
        deq_config = deq_config_from(cfg)
        _check_model_options(cfg, deq_config, len(task.source_dictionary))
        if safe_getattr(cfg, "max_target_positions", None) is None:
            # Relative positions and incremental decoding have no inherent limit: generation and
            # scoring are capped here (--max-target-positions), not at the training segment length.
            cfg.max_target_positions = max(DEFAULT_MAX_TARGET_POSITIONS, safe_getattr(cfg, "tokens_per_sample", 0))
        dictionary = task.source_dictionary
        dim = cfg.decoder_embed_dim
        if cfg.adaptive_input:
            embed_tokens: nn.Module = _adaptive_input(cfg, len(dictionary), dictionary.pad())
        else:
            embed_tokens = nn.Embedding(len(dictionary), dim, padding_idx=dictionary.pad())
            nn.init.normal_(embed_tokens.weight, std=dim ** -0.5)
            nn.init.zeros_(embed_tokens.weight[dictionary.pad()])
        model = cls(DEQTransformerDecoder(cfg, task.target_dictionary, embed_tokens, deq_config))
        return name_deq_layers(model)  # "decoder.deq" in its random draws

    def reset_memory(self, training: Optional[bool] = None, keep_epoch: Optional[int] = None) -> None:
        """Forget the segment memory: all streams, or those of training/eval mode; with
        ``keep_epoch``, the training streams written in that epoch stay (a resumed run)."""
        self.decoder.reset_memory(training, keep_epoch)


def _adaptive_input(cfg: Any, vocab_size: int, pad: int) -> AdaptiveInput:
    """fairseq's AdaptiveInput, with a non-zero initial embedding for every token but the pad.

    AdaptiveInput zeroes row ``pad`` of every band, so tokens ``cutoff[i] + pad`` would start
    with a zero embedding, hence a zero injection; at a position with no context (a segment start
    without memory) ``z = 0`` is then a fixed point of f where LayerNorm's Jacobian is
    ``1/sqrt(eps)``, and the first updates' gradients explode.
    """
    dim = cfg.decoder_embed_dim
    embed = AdaptiveInput(vocab_size, pad, dim, cfg.adaptive_input_factor, dim,
                          utils.eval_str_list(cfg.adaptive_input_cutoff, type=int))
    for band in embed.embeddings[1:]:
        weight = band[0].weight
        nn.init.normal_(weight[pad], std=weight.shape[1] ** -0.5)
    return embed


def _check_model_options(cfg: Any, deq: DEQConfig, vocab_size: Optional[int] = None) -> None:
    """Reject option combinations that would fail later or silently do something else.

    Run while arguments are parsed (``vocab_size`` unknown: the cutoffs are checked against it
    when the model is built) and again when the model is built; ``deq`` is the layer's config
    the caller built from ``cfg``.
    """
    cfg = _WithDefaults(cfg)
    dim, heads = cfg.decoder_embed_dim, cfg.decoder_attention_heads
    if dim % heads or dim % 2:
        raise UsageError(f"--decoder-embed-dim ({dim}) must be even and divisible by "
                         f"--decoder-attention-heads ({heads})")
    if cfg.mem_len < 0:
        raise UsageError(f"--mem-len must be >= 0, got {cfg.mem_len}")
    for flag, value in (("--adaptive-input-cutoff", cfg.adaptive_input_cutoff if cfg.adaptive_input else None),
                        ("--adaptive-softmax-cutoff", cfg.adaptive_softmax_cutoff)):
        if value is None:
            continue
        cut = utils.eval_str_list(value, type=int)
        top = vocab_size if vocab_size is not None else float("inf")
        if not cut or any(b <= a for a, b in zip(cut, cut[1:])) or cut[0] <= 0 or cut[-1] >= top:
            raise UsageError(f"{flag} must be increasing cutoffs between 0 and the vocabulary size "
                             f"({vocab_size or 'of the dictionary'}), got {value!r}")
        factor_flag = flag.replace("-cutoff", "-factor")
        factor = cfg.adaptive_input_factor if "input" in flag else cfg.adaptive_softmax_factor
        if int(dim // factor ** len(cut)) < 1:
            raise UsageError(f"{flag} {value!r} with {factor_flag} {factor} gives the last of its {len(cut) + 1} "
                             f"bands width {dim} // {factor}**{len(cut)} = 0 at --decoder-embed-dim {dim}: use "
                             "fewer cutoffs or a smaller factor")
    if cfg.adaptive_input and cfg.adaptive_input_cutoff is None:
        raise UsageError("--adaptive-input needs --adaptive-input-cutoff")
    if cfg.tie_adaptive_weights:
        if not cfg.adaptive_input or cfg.adaptive_softmax_cutoff is None:
            raise UsageError("--tie-adaptive-weights needs --adaptive-input and --adaptive-softmax-cutoff")
        if (utils.eval_str_list(cfg.adaptive_input_cutoff, type=int)
                != utils.eval_str_list(cfg.adaptive_softmax_cutoff, type=int)
                or cfg.adaptive_input_factor != cfg.adaptive_softmax_factor):
            raise UsageError("--tie-adaptive-weights needs equal --adaptive-input-cutoff/--adaptive-softmax-cutoff "
                             "and --adaptive-input-factor/--adaptive-softmax-factor")
    if cfg.tie_adaptive_proj and not cfg.tie_adaptive_weights:
        raise UsageError("--tie-adaptive-proj needs --tie-adaptive-weights")
    if cfg.share_decoder_input_output_embed and (cfg.adaptive_input or cfg.adaptive_softmax_cutoff):
        raise UsageError("--share-decoder-input-output-embed ties a plain embedding to a plain softmax; "
                         "with adaptive input/softmax use --tie-adaptive-weights")
    limit = deq.f_max_iter - deq.f_max_iter_jitter
    if limit < 2:
        raise UsageError(f"--f-max-iter {deq.f_max_iter} with --f-max-iter-jitter {deq.f_max_iter_jitter} lets a "
                         f"training step solve with {limit} evaluation of f, which is not an equilibrium solve: use "
                         "--f-max-iter >= --f-max-iter-jitter + 2")
    for name in ("dropout", "attention_dropout", "activation_dropout", "adaptive_softmax_dropout"):
        p = getattr(cfg, name)
        if not 0 <= p < 1:
            raise UsageError(f"--{name.replace('_', '-')} is a dropout probability in [0, 1), got {p}")
    tokens = safe_getattr(cfg.values, "tokens_per_sample", None)
    if isinstance(tokens, int) and tokens < 1:
        raise UsageError(f"--tokens-per-sample must be >= 1, got {tokens}")
    criterion = safe_getattr(cfg.values, "criterion", None)
    if criterion == "cross_entropy_jr" and cfg.adaptive_softmax_cutoff:
        raise UsageError("--criterion cross_entropy_jr needs a plain softmax; with --adaptive-softmax-cutoff use "
                         "--criterion adaptive_loss_jr")
    if criterion == "adaptive_loss_jr" and not cfg.adaptive_softmax_cutoff:
        raise UsageError("--criterion adaptive_loss_jr needs an adaptive softmax: set --adaptive-softmax-cutoff, or use "
                         "--criterion cross_entropy_jr")
    task = _task_name(cfg.values)
    if task is not None and task != _STREAMING_TASK:
        if cfg.mem_len > 0:
            raise UsageError(f"--mem-len {cfg.mem_len} is the attention memory of --task {_STREAMING_TASK}'s streams, "
                             f"and --task {task} has none: drop --mem-len (or set it to 0) or use --task {_STREAMING_TASK}")
        if deq.jac_stop_epoch is not None:
            raise UsageError(f"--jac-stop-epoch needs the epoch number, which fairseq's trainer only passes to models "
                             f"through the task, and --task {task} does not: use --task {_STREAMING_TASK} or "
                             "--jac-stop-step")


def _task_name(args: Any) -> Optional[str]:
    """The task's name where the model config knows it (fairseq-train's flat namespace, or a
    config converted from it); a hydra model config does not."""
    task = safe_getattr(args, "task", None)
    return task if isinstance(task, str) else None


def _memory_default(args: Any, length: int) -> int:
    """An architecture's memory length: ``length`` unless the task is known to have no streams."""
    task = _task_name(args)
    return length if task in (None, _STREAMING_TASK) else 0


class _WithDefaults:
    """A model config read with the dataclass defaults for the options it does not hold yet (an
    architecture function sees only the flags given so far)."""

    def __init__(self, values: Any) -> None:
        self.values = values

    def __getattr__(self, name: str) -> Any:
        return safe_getattr(self.values, name, _MODEL_DEFAULTS.get(name))


_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DEQTransformerLMConfig)}


# -- architectures -------------------------------------------------------------------------------
def _base_architecture(args: Any) -> None:
    """Defaults shared by every architecture (applied after the architecture's own values)."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 512)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 2048)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    args.decoder_normalize_before = safe_getattr(args, "decoder_normalize_before", False)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.0)
    args.mem_len = safe_getattr(args, "mem_len", 0)
    args.injection = safe_getattr(args, "injection", "qkv")
    args.adaptive_input = safe_getattr(args, "adaptive_input", False)
    args.adaptive_input_factor = safe_getattr(args, "adaptive_input_factor", 4)
    args.adaptive_softmax_factor = safe_getattr(args, "adaptive_softmax_factor", 4)
    args.tie_adaptive_weights = safe_getattr(args, "tie_adaptive_weights", False)
    args.tie_adaptive_proj = safe_getattr(args, "tie_adaptive_proj", False)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", False)
    layer_defaults = DEQConfig()
    for name in _ARCH_DEQ_FIELDS:
        setattr(args, name, safe_getattr(args, name, _DEQ_DEFAULTS.get(name, getattr(layer_defaults, name))))
    # Fail at argument parsing, before any data is loaded.
    _check_model_options(args, deq_config_from(args))


@register_model_architecture("deq_transformer_lm", "deq_transformer_lm_wt103")
def deq_transformer_lm_wt103(args: Any) -> None:
    """The paper's WikiText-103 DEQ-Transformer (post-LN): d 700, 10 heads, FFN 48000, adaptive
    input/softmax 20000/40000/200000 with factor 4 (tied), memory 300, JR 1.9 (+0.1 every 35000
    updates) at frequency 0.35, 32000 pretraining updates of a 2-layer unrolled stack, Anderson 12
    (minus 0-2 at random) forward and Broyden 13 backward iterations."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 700)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 48000)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 10)
    args.dropout = safe_getattr(args, "dropout", 0.06)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.01)
    args.mem_len = safe_getattr(args, "mem_len", _memory_default(args, 300))
    args.adaptive_input = safe_getattr(args, "adaptive_input", True)
    args.adaptive_input_cutoff = safe_getattr(args, "adaptive_input_cutoff", "20000,40000,200000")
    args.adaptive_input_factor = safe_getattr(args, "adaptive_input_factor", 4)
    args.adaptive_softmax_cutoff = safe_getattr(args, "adaptive_softmax_cutoff", "20000,40000,200000")
    args.adaptive_softmax_factor = safe_getattr(args, "adaptive_softmax_factor", 4)
    args.tie_adaptive_weights = safe_getattr(args, "tie_adaptive_weights", True)
    args.tie_adaptive_proj = safe_getattr(args, "tie_adaptive_proj", True)
    args.f_max_iter = safe_getattr(args, "f_max_iter", 12)
    args.f_max_iter_jitter = safe_getattr(args, "f_max_iter_jitter", 2)
    args.b_max_iter = safe_getattr(args, "b_max_iter", 13)
    args.jac_weight = safe_getattr(args, "jac_weight", 1.9)
    args.jac_weight_increment = safe_getattr(args, "jac_weight_increment", 0.1)
    args.jac_increment_every = safe_getattr(args, "jac_increment_every", 35000)
    args.jac_freq = safe_getattr(args, "jac_freq", 0.35)
    args.pretrain_steps = safe_getattr(args, "pretrain_steps", 32000)
    args.unrolled_layers = safe_getattr(args, "unrolled_layers", 2)
    _base_architecture(args)


@register_model_architecture("deq_transformer_lm", "deq_transformer_lm_wt103_preln")
def deq_transformer_lm_wt103_preln(args: Any) -> None:
    """The paper's pre-LN variant of the WikiText-103 model (same sizes and JR schedule)."""
    args.decoder_normalize_before = safe_getattr(args, "decoder_normalize_before", True)
    deq_transformer_lm_wt103(args)


@register_model_architecture("deq_transformer_lm", "deq_transformer_lm_tiny")
def deq_transformer_lm_tiny(args: Any) -> None:
    """A small model for tests and the CPU demo: d 64, 4 heads, FFN 256, memory 32, tied plain
    softmax (unless adaptive input/softmax are asked for), Anderson 8 / Broyden 8 iterations,
    JR 1.0 at frequency 0.35, and the ``residual`` injection, which trains better at this size
    (``python -m fairseq_deq.demo``: test perplexity 107.6 against 124.5 with ``qkv``)."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.mem_len = safe_getattr(args, "mem_len", _memory_default(args, 32))
    args.injection = safe_getattr(args, "injection", "residual")
    plain_softmax = not (safe_getattr(args, "adaptive_input", False) or safe_getattr(args, "adaptive_softmax_cutoff"))
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", plain_softmax)
    args.f_max_iter = safe_getattr(args, "f_max_iter", 8)
    args.f_max_iter_jitter = safe_getattr(args, "f_max_iter_jitter", 1)
    args.b_max_iter = safe_getattr(args, "b_max_iter", 8)
    args.jac_weight = safe_getattr(args, "jac_weight", 1.0)
    args.jac_freq = safe_getattr(args, "jac_freq", 0.35)
    _base_architecture(args)
