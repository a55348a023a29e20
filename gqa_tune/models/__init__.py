"""Builders in torchtune's two tiers."""

from gqa_tune.models._component_builders import (
    gqa_attention,
    gqa_decoder,
    gqa_gemma2_decoder,
    gqa_gemma_decoder,
    gqa_mlp,
    init_from_scratch,
)
from gqa_tune.models._encoder_decoder import (
    GQADecoderLayer,
    GQATransformer,
    GQATransformerLM,
    gqa_transformer,
    gqa_transformer_lm,
)
from gqa_tune.models._lora_builders import (
    lora_gqa_decoder,
    lora_gqa_gemma2_decoder,
    lora_gqa_gemma_decoder,
    lora_gqa_llama3_2_1b,
    lora_gqa_tiny,
    qlora_gqa_decoder,
    qlora_gqa_llama3_2_1b,
    qlora_gqa_tiny,
)
from gqa_tune.models._model_builders import (
    BYTE_VOCAB_SIZE,
    gqa_gemma2_tiny,
    gqa_llama3_2_1b,
    gqa_mistral_tiny,
    gqa_tiny,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "GQADecoderLayer",
    "GQATransformer",
    "GQATransformerLM",
    "gqa_transformer",
    "gqa_transformer_lm",
    "gqa_attention",
    "gqa_decoder",
    "gqa_gemma2_decoder",
    "gqa_gemma2_tiny",
    "gqa_gemma_decoder",
    "gqa_llama3_2_1b",
    "gqa_mistral_tiny",
    "gqa_mlp",
    "gqa_tiny",
    "init_from_scratch",
    "lora_gqa_decoder",
    "lora_gqa_gemma2_decoder",
    "lora_gqa_gemma_decoder",
    "lora_gqa_llama3_2_1b",
    "lora_gqa_tiny",
    "qlora_gqa_decoder",
    "qlora_gqa_llama3_2_1b",
    "qlora_gqa_tiny",
]
