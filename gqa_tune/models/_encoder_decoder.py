"""Encoder-decoder (seq2seq) transformers with grouped-query attention.

The counterpart of grouped-query-attention-pytorch's ``GQATransformer`` /
``GQATransformerLM``, built from gqa_tune's parts (``gqa_attention``,
``gqa_mlp``) and torchtune's (``TransformerSelfAttentionLayer``, ``RMSNorm``,
``FeedForward``, ``TiedLinear``), with the masking an encoder-decoder needs:

* encoder self-attention: bidirectional, hiding padded source positions;
* decoder self-attention: causal;
* decoder cross-attention: **not** causal (every target position sees the
  whole source), hiding only padded source positions.

All attention layers are gqa_tune ``MultiHeadAttention`` modules, so
``gqa_tune.convert.convert_model_`` and the attention backends apply to them.
"""

from typing import Optional, Union

import torch
from torch import nn
from torchtune.modules import (
    FeedForward,
    RMSNorm,
    TiedLinear,
    TransformerCrossAttentionLayer,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)

from gqa_tune import _checks as checks
from gqa_tune.generation import generate
from gqa_tune.models._component_builders import _rope, gqa_attention, gqa_mlp, init_from_scratch
from gqa_tune.modules.attention import MultiHeadAttention

ACTIVATIONS = ("swiglu", "relu", "gelu")


class GQADecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, then torchtune's ``TransformerCrossAttentionLayer``
    (cross-attention and the feed-forward block), so it follows torchtune's layer protocol
    (``forward(x, *, mask, encoder_input, encoder_mask, input_pos)``, ``setup_caches``, ``reset_cache``) and a
    ``TransformerDecoder`` of these layers is what :func:`gqa_tune.generate` decodes.

    Each sub-block is ``x + scale(block(norm(x)))``, as in torchtune's layers (``*_scale`` default to identity;
    the builders put dropout there). A target row that sees no source position (all of it padding) gets no
    cross-attention and no feed-forward update, as in torchtune.

    Args:
        attn (MultiHeadAttention): self-attention (``is_causal=True``).
        cross_attn (MultiHeadAttention): attention to the encoder output
            (``is_causal=False``, no positional embeddings).
        mlp (nn.Module): feed-forward block.
        sa_norm, ca_norm, mlp_norm (Optional[nn.Module]): norms before each block.
        sa_scale, ca_scale, mlp_scale (Optional[nn.Module]): applied to each
            block's output before the residual add.
    """

    def __init__(
        self,
        attn: MultiHeadAttention,
        cross_attn: MultiHeadAttention,
        mlp: nn.Module,
        *,
        sa_norm: Optional[nn.Module] = None,
        ca_norm: Optional[nn.Module] = None,
        mlp_norm: Optional[nn.Module] = None,
        sa_scale: Optional[nn.Module] = None,
        ca_scale: Optional[nn.Module] = None,
        mlp_scale: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if cross_attn.is_causal:
            raise ValueError("cross_attn must be built with is_causal=False: every target position sees the source")
        if cross_attn.pos_embeddings is not None:
            raise ValueError("cross_attn must not have positional embeddings: queries and keys are different sequences")
        self.attn = attn
        self.sa_norm = sa_norm or nn.Identity()
        self.sa_scale = sa_scale or nn.Identity()
        self.cross = TransformerCrossAttentionLayer(
            cross_attn, mlp, ca_norm=ca_norm, mlp_norm=mlp_norm, ca_scale=ca_scale, mlp_scale=mlp_scale
        )

    @property
    def cross_attn(self) -> MultiHeadAttention:
        return self.cross.attn

    @property
    def mlp(self) -> nn.Module:
        return self.cross.mlp

    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int, decoder_max_seq_len: int
    ) -> None:
        """KV caches: ``decoder_max_seq_len`` positions for self-attention, ``encoder_max_seq_len`` for the
        cross-attention (the encoder output, written on the first call)."""
        self.attn.setup_cache(batch_size, dtype, decoder_max_seq_len)
        self.cross.setup_caches(
            batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=decoder_max_seq_len
        )

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None and self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()
        self.cross.reset_cache()

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        encoder_input: Optional[torch.Tensor] = None,
        encoder_mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): target ``[b, s_tgt, d]``.
            mask (Optional[torch.Tensor]): self-attention mask (torchtune's); ``None`` = causal.
            encoder_input (Optional[torch.Tensor]): the encoder output ``[b, s_src, d]``; ``None`` only while
                decoding with caches already holding it.
            encoder_mask (Optional[torch.Tensor]): bool ``[b, s_tgt, s_src]``, True = attend.
            input_pos (Optional[torch.Tensor]): RoPE positions ``[b, s_tgt]``.
        """
        h = self.sa_norm(x)
        x = x + self.sa_scale(self.attn(h, h, mask=mask, input_pos=input_pos))
        return self.cross(x, encoder_input=encoder_input, encoder_mask=encoder_mask)


def _key_mask(src_mask: Optional[torch.Tensor], s_q: int) -> Optional[torch.Tensor]:
    """``[b, s_src]`` keep-mask -> ``[b, s_q, s_src]`` attention mask (a view)."""
    if src_mask is None:
        return None
    return src_mask[:, None, :].expand(-1, s_q, -1)


class GQATransformer(nn.Module):
    """Encoder-decoder transformer over embeddings ``[b, s, d]``.

    Args:
        encoder_layers (nn.ModuleList): layers called as ``layer(x, mask=...)``
            (e.g. ``TransformerSelfAttentionLayer`` with non-causal attention).
        decoder_layers (nn.ModuleList): :class:`GQADecoderLayer` s.
        encoder_norm, decoder_norm (nn.Module): final norms of each stack.
        max_seq_len (int): longest source or target sequence (RoPE table).
    """

    def __init__(
        self,
        *,
        encoder_layers: nn.ModuleList,
        decoder_layers: nn.ModuleList,
        encoder_norm: nn.Module,
        decoder_norm: nn.Module,
        max_seq_len: int,
    ) -> None:
        super().__init__()
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_norm = encoder_norm
        self.decoder_norm = decoder_norm
        self.max_seq_len = max_seq_len

    # ---- checks -------------------------------------------------------------------------------------------------

    def _check_seq(self, name: str, x: torch.Tensor, offset: int = 0) -> None:
        if x.dim() != 3:
            raise ValueError(f"{name} must be [b, s, d], got shape {tuple(x.shape)}")
        if offset + x.shape[1] > self.max_seq_len:
            raise ValueError(f"{name} reaches length {offset + x.shape[1]}, more than max_seq_len={self.max_seq_len}")

    @staticmethod
    def _check_src_mask(src_mask: Optional[torch.Tensor], b: int, s_src: int) -> None:
        if src_mask is None:
            return
        if not isinstance(src_mask, torch.Tensor) or src_mask.dtype != torch.bool:
            raise ValueError(
                f"src_mask must be a bool tensor (True = keep), got {getattr(src_mask, 'dtype', src_mask)}"
            )
        if tuple(src_mask.shape) != (b, s_src):
            raise ValueError(f"src_mask of shape {tuple(src_mask.shape)} does not fit: expected [b={b}, s_src={s_src}]")

    # ---- forward --------------------------------------------------------------------------------------------------

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode ``src`` ``[b, s_src, d]``; ``src_mask`` bool ``[b, s_src]`` (True = real token).

        Padded positions are hidden as keys; their own outputs are computed but
        carry no information to the real positions.
        """
        self._check_seq("src", src)
        self._check_src_mask(src_mask, src.shape[0], src.shape[1])
        mask = _key_mask(src_mask, src.shape[1])
        x = src
        for layer in self.encoder_layers:
            x = layer(x, mask=mask)
        return self.encoder_norm(x)

    def decode(
        self,
        tgt: torch.Tensor,
        memory: Optional[torch.Tensor],
        src_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decode ``tgt`` ``[b, s_tgt, d]`` against the encoder output ``memory`` ``[b, s_src, d]``.

        With caches enabled (:meth:`setup_caches`), ``tgt`` holds only the new
        positions; pass ``memory`` on the first call (it fills the
        cross-attention caches) and ``None`` afterwards.
        """
        cached = self.caches_are_enabled()
        offset = self.decoder_layers[0].attn.kv_cache.size if cached else 0
        self._check_seq("tgt", tgt, offset)
        if memory is None:
            if not cached or self.decoder_layers[0].cross_attn.kv_cache.size == 0:
                raise ValueError("memory (the encoder output) is required unless the caches already hold it")
            s_src = self.decoder_layers[0].cross_attn.kv_cache.size
        else:
            if memory.dim() != 3 or memory.shape[0] != tgt.shape[0] or memory.shape[2] != tgt.shape[2]:
                raise ValueError(
                    f"memory of shape {tuple(memory.shape)} does not fit tgt {tuple(tgt.shape)}: expected [b, s_src, d]"
                )
            s_src = memory.shape[1]
        self._check_src_mask(src_mask, tgt.shape[0], s_src)
        encoder_mask = _key_mask(src_mask, tgt.shape[1])
        x = tgt
        for layer in self.decoder_layers:
            x = layer(x, encoder_input=memory, encoder_mask=encoder_mask)
        return self.decoder_norm(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            src (torch.Tensor): source embeddings ``[b, s_src, d]``.
            tgt (torch.Tensor): target embeddings ``[b, s_tgt, d]`` (shifted right by the caller).
            src_mask (Optional[torch.Tensor]): bool ``[b, s_src]``, True = keep,
                False = padding (hidden from encoder self-attention and from
                cross-attention).

        Returns:
            torch.Tensor: decoder output ``[b, s_tgt, d]``.
        """
        if src.dim() == 3 and tgt.dim() == 3 and (src.shape[0] != tgt.shape[0] or src.shape[2] != tgt.shape[2]):
            raise ValueError(f"src {tuple(src.shape)} and tgt {tuple(tgt.shape)} must share batch and width")
        return self.decode(tgt, self.encode(src, src_mask), src_mask)

    # ---- KV caches (decoder only) ---------------------------------------------------------------------------------

    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int, decoder_max_seq_len: int
    ) -> None:
        """KV caches for incremental decoding (``n_kv`` heads each).

        Self-attention caches hold ``decoder_max_seq_len`` positions, cross-attention
        caches ``encoder_max_seq_len`` (the encoder output, written on the first step).
        """
        for layer in self.decoder_layers:
            layer.setup_caches(
                batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len, decoder_max_seq_len=decoder_max_seq_len
            )

    def caches_are_setup(self) -> bool:
        return self.decoder_layers[0].caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.decoder_layers[0].caches_are_enabled()

    def reset_caches(self) -> None:
        """Empty the caches (keep them allocated)."""
        for layer in self.decoder_layers:
            layer.reset_cache()

    def remove_caches(self) -> None:
        """Drop the caches: ``forward`` runs without them again."""
        for layer in self.decoder_layers:
            for attn in (layer.attn, layer.cross_attn):
                attn.kv_cache = None
                attn.cache_enabled = False


class GQATransformerLM(nn.Module):
    """Token-level encoder-decoder: shared embedding, :class:`GQATransformer`, output head.

    Args:
        tok_embeddings (nn.Embedding): shared by source and target tokens.
        transformer (GQATransformer): the encoder-decoder.
        output (Union[nn.Linear, TiedLinear]): ``d -> vocab``.
        pad_id (Optional[int]): when set, source tokens equal to it are
            masked out if no ``src_mask`` is given, and finished sequences in
            :meth:`generate` are filled with it.
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        transformer: GQATransformer,
        output: Union[nn.Linear, TiedLinear],
        pad_id: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.transformer = transformer
        self.output = output
        self.pad_id = pad_id

    @property
    def num_tokens(self) -> int:
        return self.tok_embeddings.num_embeddings

    def _check_tokens(self, name: str, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor [b, s], got {getattr(tokens, 'shape', tokens)}")

    def _src_mask(self, src_tokens: torch.Tensor, src_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if src_mask is None and self.pad_id is not None:
            return src_tokens != self.pad_id
        return src_mask

    def forward(
        self, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor, src_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Args:
            src_tokens (torch.Tensor): ``[b, s_src]``.
            tgt_tokens (torch.Tensor): ``[b, s_tgt]`` decoder inputs (e.g. BOS + target[:-1]).
            src_mask (Optional[torch.Tensor]): bool ``[b, s_src]`` (True = keep);
                default ``src_tokens != pad_id`` when ``pad_id`` is set.

        Returns:
            torch.Tensor: logits ``[b, s_tgt, vocab]``.
        """
        self._check_tokens("src_tokens", src_tokens)
        self._check_tokens("tgt_tokens", tgt_tokens)
        if src_tokens.shape[0] != tgt_tokens.shape[0]:
            raise ValueError(f"batch sizes differ: src_tokens {tuple(src_tokens.shape)}, tgt {tuple(tgt_tokens.shape)}")
        src_mask = self._src_mask(src_tokens, src_mask)
        h = self.transformer(self.tok_embeddings(src_tokens), self.tok_embeddings(tgt_tokens), src_mask)
        return self.output(h)

    def as_decoder(self) -> TransformerDecoder:
        """The decoder side as a torchtune ``TransformerDecoder`` sharing this model's modules: target tokens ->
        logits, given the encoder output as ``encoder_input`` and the source mask as ``encoder_mask``
        ``[b, s_tgt, s_src]``. It is what :meth:`generate` hands to :func:`gqa_tune.generate`."""
        tf = self.transformer
        first = tf.decoder_layers[0].attn
        return _Decoder(
            tok_embeddings=self.tok_embeddings,
            layers=list(tf.decoder_layers),
            # generate's rule is prompt + new tokens <= max_seq_len; the prompt here is BOS alone and the last
            # new token is never fed back, so max_seq_len new tokens fit.
            max_seq_len=tf.max_seq_len + 1,
            num_heads=first.num_heads,
            head_dim=first.head_dim,
            norm=tf.decoder_norm,
            output=self.output,
        )

    @torch.no_grad()
    def generate(
        self,
        src_tokens: torch.Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: Optional[int] = None,
        *,
        src_mask: Optional[torch.Tensor] = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding.

        The source is encoded once. With ``use_cache`` (default) the decoder (:meth:`as_decoder`) runs through
        :func:`gqa_tune.generate`, the library's one generation loop: each step runs the newest token only,
        reading the earlier positions' self-attention keys/values and the encoder's cross-attention
        keys/values from KV caches (``n_kv`` heads each). ``use_cache=False`` re-runs the model on the whole
        prefix every step (the reference: same tokens, slower). Runs in eval mode (the previous mode is
        restored) and removes any caches the model had before and after.

        Args:
            src_tokens (torch.Tensor): ``[b, s_src]``.
            max_new_tokens (int): at most this many tokens per sequence.
            bos_id (int): first decoder input.
            eos_id (Optional[int]): a sequence ends after producing it; decoding
                stops once every sequence has ended. Later positions of an
                ended sequence hold ``pad_id`` (or ``eos_id`` when ``pad_id`` is unset).
            src_mask (Optional[torch.Tensor]): as in :meth:`forward`.
            use_cache (bool): decode incrementally with KV caches.

        Returns:
            torch.Tensor: ``[b, n]`` generated tokens (BOS excluded, EOS included), ``n <= max_new_tokens``.
        """
        self._check_tokens("src_tokens", src_tokens)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if max_new_tokens > self.transformer.max_seq_len:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds max_seq_len ({self.transformer.max_seq_len})")
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < self.num_tokens:
                raise ValueError(f"{name} ({value}) is outside the vocabulary [0, {self.num_tokens})")
        b = src_tokens.shape[0]
        prompt = torch.full((b, 1), bos_id, dtype=torch.long, device=src_tokens.device)
        if max_new_tokens == 0:
            return prompt[:, 1:]
        src_mask = self._src_mask(src_tokens, src_mask)
        was_training = self.training
        self.eval()
        self.transformer.remove_caches()
        try:
            if use_cache:
                memory = self.transformer.encode(self.tok_embeddings(src_tokens), src_mask)
                keep = src_mask if src_mask is not None else torch.ones(memory.shape[:2], dtype=torch.bool)
                tokens, _ = generate(
                    self.as_decoder(), prompt, max_new_tokens, pad_id=-1,  # BOS is never padding
                    stop_tokens=None if eos_id is None else [eos_id],
                    encoder_input=memory, encoder_mask=keep[:, None, :].to(memory.device),
                )  # fmt: skip
                tokens = tokens[:, 1:]
            else:
                tokens = prompt[:, 1:]
                for _ in range(max_new_tokens):
                    step = self(src_tokens, torch.cat([prompt, tokens], dim=1), src_mask)[:, -1].argmax(dim=-1)
                    tokens = torch.cat([tokens, step[:, None]], dim=1)
                    if eos_id is not None and bool((tokens == eos_id).any(dim=1).all()):
                        break
        finally:
            self.transformer.remove_caches()
            self.train(was_training)
        if eos_id is not None:  # positions after a row's first EOS hold the fill
            hit = (tokens == eos_id).to(torch.long)
            after = (hit.cumsum(dim=1) - hit) > 0
            fill = self.pad_id if self.pad_id is not None else eos_id
            tokens = tokens.masked_fill(after, fill)
        return tokens


class _Decoder(TransformerDecoder):
    """A ``TransformerDecoder`` of :class:`GQADecoderLayer` s: its caches take both lengths (torchtune's
    ``setup_caches`` sizes the self-attention caches only where it finds a ``TransformerSelfAttentionLayer``)."""

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: Optional[int] = None,
        decoder_max_seq_len: Optional[int] = None,
    ) -> None:
        self.encoder_max_cache_seq_len = encoder_max_seq_len or self.max_seq_len
        self.decoder_max_cache_seq_len = decoder_max_seq_len or self.max_seq_len
        for layer in self.layers:
            layer.setup_caches(
                batch_size, dtype, encoder_max_seq_len=self.encoder_max_cache_seq_len,
                decoder_max_seq_len=self.decoder_max_cache_seq_len,
            )  # fmt: skip


def _check_positive(**values) -> None:
    for name, value in values.items():
        checks.positive_int(name, value)


def _feed_forward(d_model: int, dim_feedforward: int, activation: str, dropout: float, bias: bool) -> nn.Module:
    if activation == "swiglu" and dropout == 0.0:
        return gqa_mlp(d_model, dim_feedforward)
    act = {"swiglu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}[activation]()
    if dropout > 0.0:
        # Elementwise dropout commutes with SwiGLU's product: the same as dropping the hidden units.
        act = nn.Sequential(act, nn.Dropout(dropout))
    gated = activation == "swiglu"
    return FeedForward(
        gate_proj=nn.Linear(d_model, dim_feedforward, bias=bias and not gated),
        down_proj=nn.Linear(dim_feedforward, d_model, bias=bias and not gated),
        up_proj=nn.Linear(d_model, dim_feedforward, bias=False) if gated else None,
        activation=act,
    )


def gqa_transformer(
    *,
    d_model: int,
    nhead: int,
    kv_heads: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    dim_feedforward: int,
    dropout: float = 0.0,
    attn_dropout: Optional[float] = None,
    activation: str = "swiglu",
    max_seq_len: int = 4096,
    qk_norm: bool = False,
    norm_eps: float = 1e-5,
    bias: bool = False,
    use_rope: bool = True,
    rope_base: float = 10_000,
    backend: str = "auto",
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> GQATransformer:
    """A pre-norm encoder-decoder transformer with grouped-query attention everywhere.

    Encoder layers are torchtune ``TransformerSelfAttentionLayer`` s with
    non-causal GQA self-attention; decoder layers are :class:`GQADecoderLayer` s
    (causal GQA self-attention, non-causal GQA cross-attention, feed-forward).
    All norms are RMSNorm; each stack ends with one.

    Args:
        d_model (int): model width.
        nhead (int): query heads per attention layer.
        kv_heads (int): key/value heads per attention layer (divides ``nhead``);
            ``k_proj``/``v_proj`` output ``kv_heads * d_model // nhead`` features.
        num_encoder_layers, num_decoder_layers (int): stack depths.
        dim_feedforward (int): feed-forward hidden width.
        dropout (float): dropout on each block's output before the residual
            add, and on the feed-forward hidden units (training only).
        attn_dropout (Optional[float]): dropout on attention weights (training
            only); default ``dropout``.
        activation (str): ``"swiglu"`` (gated, torchtune's ``FeedForward``
            with an up projection), ``"relu"`` or ``"gelu"``.
        max_seq_len (int): longest source or target (RoPE table).
        qk_norm (bool): RMSNorm on queries and keys in every attention layer.
        norm_eps (float): RMSNorm epsilon.
        bias (bool): biases on q/k/v projections and non-gated feed-forwards.
        use_rope (bool): RoPE in the self-attention layers (cross-attention
            never has positional embeddings); ``False`` leaves positions to the caller.
        rope_base (float): RoPE base.
        backend (str): attention backend for every layer. With a source
            padding mask the layers pass dense masks, which ``"flex"`` rejects.
        device, dtype: where and how to create the parameters.

    Raises:
        ValueError: naming the offending values (``d_model % nhead``,
            ``nhead % kv_heads``, non-positive sizes, dropout outside [0, 1],
            an unknown activation or backend, an odd head_dim with RoPE).
    """
    _check_positive(
        d_model=d_model,
        nhead=nhead,
        kv_heads=kv_heads,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        dim_feedforward=dim_feedforward,
        max_seq_len=max_seq_len,
    )
    if d_model % nhead != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
    if nhead % kv_heads != 0:
        raise ValueError(f"nhead ({nhead}) must be divisible by kv_heads ({kv_heads})")
    attn_dropout = dropout if attn_dropout is None else attn_dropout
    for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0, got {p!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    head_dim = d_model // nhead
    if use_rope and head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got d_model // nhead = {d_model} // {nhead} = {head_dim}")

    rope = _rope(head_dim, max_seq_len, rope_base, None) if use_rope else None

    def attention(is_causal: bool, positional: bool) -> MultiHeadAttention:
        return gqa_attention(
            embed_dim=d_model,
            num_heads=nhead,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_seq_len=max_seq_len,
            pos_embeddings=rope if positional else None,
            use_rope=positional and use_rope,
            qk_norm=qk_norm,
            norm_eps=norm_eps,
            bias=bias,
            is_causal=is_causal,
            attn_dropout=attn_dropout,
            backend=backend,
        )

    def norm() -> RMSNorm:
        return RMSNorm(d_model, eps=norm_eps)

    def drop() -> Optional[nn.Module]:
        return nn.Dropout(dropout) if dropout > 0.0 else None

    def mlp() -> nn.Module:
        return _feed_forward(d_model, dim_feedforward, activation, dropout, bias)

    encoder_layers = nn.ModuleList(
        TransformerSelfAttentionLayer(
            attn=attention(is_causal=False, positional=True),
            mlp=mlp(),
            sa_norm=norm(),
            mlp_norm=norm(),
            sa_scale=drop(),
            mlp_scale=drop(),
        )
        for _ in range(num_encoder_layers)
    )
    decoder_layers = nn.ModuleList(
        GQADecoderLayer(
            attn=attention(is_causal=True, positional=True),
            cross_attn=attention(is_causal=False, positional=False),
            mlp=mlp(),
            sa_norm=norm(),
            ca_norm=norm(),
            mlp_norm=norm(),
            sa_scale=drop(),
            ca_scale=drop(),
            mlp_scale=drop(),
        )
        for _ in range(num_decoder_layers)
    )
    model = GQATransformer(
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        encoder_norm=norm(),
        decoder_norm=norm(),
        max_seq_len=max_seq_len,
    )
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def gqa_transformer_lm(
    num_tokens: int,
    *,
    tie_word_embeddings: bool = True,
    pad_id: Optional[int] = None,
    init_std: Optional[float] = 0.02,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
    **transformer_kwargs,
) -> GQATransformerLM:
    """A token-level :class:`GQATransformerLM` around :func:`gqa_transformer`.

    Args:
        num_tokens (int): vocabulary size.
        tie_word_embeddings (bool): the output head shares the embedding weight.
        pad_id (Optional[int]): padding token (default source mask, generate's fill).
        init_std (Optional[float]): re-initialize linear and embedding weights
            from ``N(0, init_std)`` (``init_from_scratch``); ``None`` keeps
            PyTorch's defaults (``N(0, 1)`` embeddings).
        device, dtype: where and how to create the parameters.
        **transformer_kwargs: :func:`gqa_transformer`'s arguments (``d_model``,
            ``nhead``, ``kv_heads``, ``num_encoder_layers``, ...).
    """
    _check_positive(num_tokens=num_tokens)
    if pad_id is not None and not 0 <= pad_id < num_tokens:
        raise ValueError(f"pad_id ({pad_id}) is outside the vocabulary [0, {num_tokens})")
    transformer = gqa_transformer(**transformer_kwargs)
    d_model = transformer_kwargs["d_model"]
    tok_embeddings = nn.Embedding(num_tokens, d_model)
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else nn.Linear(d_model, num_tokens, bias=False)
    model = GQATransformerLM(tok_embeddings=tok_embeddings, transformer=transformer, output=output, pad_id=pad_id)
    if init_std is not None:
        init_from_scratch(model, std=init_std)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
