"""Batched generation with GQA-sized KV caches: prefill, then one token per step."""

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import local_kv_cache

from gqa_tune.generation import check_stop_tokens
from gqa_tune.ops.kv_quant import resolve_kv_cache_dtype


@dataclass
class GenerationResult:
    tokens: List[List[int]]  # generated ids per prompt (stop token excluded)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_cache_bytes: int = 0
    extra: dict = field(default_factory=dict)
    #: Per prompt, whether it ended at a stop token (rather than at ``max_new_tokens``).
    stopped: List[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / max(self.decode_seconds, 1e-9)


def kv_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes held by every KV cache in ``model`` (keys and values, with the scales of quantized caches)."""
    total = 0
    for module in model.modules():
        cache = getattr(module, "kv_cache", None)
        if isinstance(getattr(cache, "nbytes", None), int):
            total += cache.nbytes
        elif cache is not None and hasattr(cache, "k_cache"):
            total += cache.k_cache.nbytes + cache.v_cache.nbytes
    return total


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: Optional[int], generator: Optional[torch.Generator]
) -> torch.Tensor:
    """``[b, vocab]`` logits -> ``[b, 1]`` ids: greedy at temperature 0, else top-k sampling."""
    if temperature <= 0.0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_tokens: Sequence[int] = (),
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
    kv_cache_dtype: Optional[torch.dtype] = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (left-padded into one batch).

    KV caches are created for the call (``n_kv`` heads, ``prompt + max_new_tokens``
    positions) and removed afterwards. ``on_tokens`` receives each step's
    ``[b]`` new ids, for streaming. ``kv_cache_dtype`` (``torch.int8``, ``torch.float8_e4m3fn`` or their
    names) stores the caches quantized (:meth:`gqa_tune.modules.MultiHeadAttention.setup_cache`);
    ``None``: in the model's dtype.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_stop_tokens(stop_tokens, model.tok_embeddings.num_embeddings)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype) or dtype
    b, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {model.max_seq_len}"
        )
    tokens = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(list(p), device=device)
    real = torch.nn.functional.pad(tokens != pad_id, (0, max_new_tokens), value=True)
    masks = get_causal_mask_from_padding_mask(real, target_seq_len=total)  # [b, total, total]
    positions = get_position_ids_from_padding_mask(real)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out: List[torch.Tensor] = []
    result = GenerationResult(tokens=[], prefill_tokens=b * width)

    with local_kv_cache(model, batch_size=b, device=device, dtype=cache_dtype, decoder_max_seq_len=total):
        result.kv_cache_bytes = kv_cache_bytes(model)
        start = time.perf_counter()
        logits = model(tokens, mask=masks[:, :width], input_pos=positions[:, :width])[:, -1]
        result.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)  # [b, 1]
            nxt = torch.where(done[:, None], torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            if on_tokens is not None:
                on_tokens(nxt[:, 0])
            done = done | torch.isin(nxt[:, 0], stops)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = width + step
            logits = model(nxt, mask=masks[:, pos : pos + 1], input_pos=positions[:, pos : pos + 1])[:, -1]
        result.decode_seconds = time.perf_counter() - start
    generated = torch.cat(out, dim=1).tolist()
    stop_set = set(stop_tokens)
    for row in generated:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))  # finished rows only pad after a stop
        result.tokens.append(row[:cut])
        result.stopped.append(cut < len(row))
    result.decode_tokens = b * (len(out) - 1)
    return result
