"""Model builders: fixed shapes, ready to train or load."""

from torchtune.modules import TransformerDecoder

from gqa_tune.models._component_builders import gqa_decoder, gqa_gemma2_decoder

#: Vocabulary of the byte-level tokenizer: 256 bytes + BOS, EOS, PAD, 1 spare.
BYTE_VOCAB_SIZE = 260


def gqa_tiny(backend: str = "auto", max_seq_len: int = 512, vocab_size: int = BYTE_VOCAB_SIZE) -> TransformerDecoder:
    """A 2-layer, 128-wide GQA model (8 query heads, 2 kv heads, ~0.41M parameters).

    Trains on a laptop CPU in minutes; the model of the offline default (configs/gqa_tiny/full.yaml).
    """
    return gqa_decoder(
        vocab_size=vocab_size,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=128,
        intermediate_dim=384,
        max_seq_len=max_seq_len,
        rope_base=10_000,
        backend=backend,
    )


def gqa_llama3_2_1b(backend: str = "auto", max_seq_len: int = 131_072) -> TransformerDecoder:
    """Llama-3.2-1B's shape (16 layers, 32 query / 8 kv heads, width 2048, scaled RoPE).

    State-dict keys and shapes equal ``torchtune.models.llama3_2.llama3_2_1b``'s,
    so its checkpoints load directly.
    """
    return gqa_decoder(
        vocab_size=128_256,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=2048,
        intermediate_dim=8192,
        max_seq_len=max_seq_len,
        rope_base=500_000,
        rope_scale_factor=32,
        norm_eps=1e-5,
        tie_word_embeddings=True,
        backend=backend,
    )


def gqa_mistral_tiny(backend: str = "auto", max_seq_len: int = 8192, vocab_size: int = BYTE_VOCAB_SIZE):
    """A 2-layer, 128-wide Mistral-shaped model: 8 query / 2 kv heads and Mistral's real 4096-token window."""
    return gqa_decoder(
        vocab_size=vocab_size,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        embed_dim=128,
        intermediate_dim=384,
        max_seq_len=max_seq_len,
        rope_base=10_000,
        norm_eps=1e-5,
        tie_word_embeddings=False,
        sliding_window_size=4096,
        backend=backend,
    )


def gqa_gemma2_tiny(backend: str = "auto", max_seq_len: int = 512, vocab_size: int = BYTE_VOCAB_SIZE):
    """A 4-layer, 128-wide Gemma 2-shaped model: local (window 32) and global layers alternating, 8 query /
    2 kv heads of 16, attention logits capped at 50 and final logits at 30."""
    return gqa_gemma2_decoder(
        vocab_size=vocab_size,
        num_layers=4,
        num_heads=8,
        head_dim=16,
        num_kv_heads=2,
        embed_dim=128,
        intermediate_dim=384,
        max_seq_len=max_seq_len,
        sliding_window_size=32,
        query_pre_attn_scalar=16,
        backend=backend,
    )
