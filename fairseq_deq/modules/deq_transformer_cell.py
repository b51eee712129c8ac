"""The weight-tied layer f(z, x) of the DEQ-Transformer: relative attention and a feed-forward
block, with the input injected as in the paper (into the queries, keys and values) or into the
attention and feed-forward inputs."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deq_core import VariationalDropout

from .feed_forward import PositionwiseFeedForward
from .relative_attention import RelativeMultiheadAttention

__all__ = ["DEQTransformerCell", "INJECTIONS"]

#: Where the injection enters f, ``"qkv"`` (the paper's) or ``"residual"``.
INJECTIONS = ("qkv", "residual")


class DEQTransformerCell(nn.Module):
    """One Transformer-XL layer used as the equilibrium function ``f(z, u, pos, mem)``.

    ``u`` ``(B, T, injection_dim)`` is the injection (a linear map of the embeddings, computed
    once per forward outside f); ``pos`` are the relative position embeddings and ``mem``
    ``(B, M, memory_dim)`` what earlier positions left for later ones to attend to
    (:meth:`memory_entry`, detached). ``Attn(a; u_qkv)`` is the attention whose
    ``[q, k, v] = W_qkv a + u_qkv``.

    ``injection="qkv"`` (the paper's; ``u`` is ``3d`` wide, the FFN input gets no injection)::

        post-LN:  a = z;       h = LN1(a + Attn(a; u));  f = LN2(h + FFN(h))
        pre-LN:   a = LN1(z);  h = z + Attn(a; u);       b = LN2(h);  f = b + FFN(b)

    ``injection="residual"`` (``u = [u_attn, u_ffn]``, ``2d`` wide)::

        post-LN:  a = z + u_attn;       h = LN1(a + Attn(a; 0));  b = h + u_ffn;  f = LN2(b + FFN(b))
        pre-LN:   a = LN1(z) + u_attn;  h = z + Attn(a; 0);       b = LN2(h);     f = b + FFN(b + u_ffn)

    The pre-LN layer is that of the paper's code (its weight-shared position-wise feed-forward
    with ``pre_lnorm`` normalizes the attention block's output before the residual): f carries
    ``LN2(h)``, not ``h``, so f has no identity path from z (an identity path makes ``J_f = I + ...``,
    which JR cannot shrink and the solver cannot contract).

    The linear maps keep torch's fan-in initialization (that of the paper's 1x1 convolutions)
    unless ``init_std`` asks for a normal one. Norms are ``torch.nn.LayerNorm`` (twice
    differentiable, which JR needs; fairseq's LayerNorm helper may return apex's fused kernel).
    Dropout is variational: one mask per equilibrium pass.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 normalize_before: bool = False, init_std: Optional[float] = None,
                 injection: str = "qkv") -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        self.embed_dim = embed_dim
        self.normalize_before = normalize_before
        self.injection = injection
        self.attn = RelativeMultiheadAttention(embed_dim, num_heads, attention_dropout)
        self.ffn = PositionwiseFeedForward(embed_dim, ffn_dim, activation_dropout)
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.attn_dropout = VariationalDropout.features1d(dropout)
        self.ffn_dropout = VariationalDropout.features1d(dropout)
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    @property
    def injection_dim(self) -> int:
        """The width of ``u``: ``3d`` (``"qkv"``) or ``2d`` (``"residual"``)."""
        return (3 if self.injection == "qkv" else 2) * self.embed_dim

    def _split(self, z: torch.Tensor, u: torch.Tensor):
        """The attention input ``a`` and the injections into q/k/v and into the FFN input."""
        a = self.attn_norm(z) if self.normalize_before else z
        if self.injection == "qkv":
            return a, u, None
        u_attn, u_ffn = u.chunk(2, dim=-1)
        return a + u_attn, None, u_ffn

    def memory_entry(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """What later positions read of positions at state ``z`` with injection ``u``: the
        attention input, and with ``"qkv"`` the key/value part of the injection."""
        a, u_qkv, _ = self._split(z, u)
        return a if u_qkv is None else torch.cat([a, u_qkv[..., self.embed_dim:]], dim=-1)

    def forward(self, z: torch.Tensor, u: torch.Tensor, pos: torch.Tensor,
                mem: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f(z; u, pos, mem): one weight-tied Transformer-XL layer on the state ``z``."""
        a, u_qkv, u_ffn = self._split(z, u)
        attn = self.attn_dropout(self.attn(a, pos, mem, u_qkv))
        if self.normalize_before:
            b = self.ffn_norm(z + attn)
            return b + self.ffn_dropout(self.ffn(b if u_ffn is None else b + u_ffn))
        h = self.attn_norm(a + attn)
        b = h if u_ffn is None else h + u_ffn
        return self.ffn_norm(b + self.ffn_dropout(self.ffn(b)))
