"""``generate``: torchtune's ``generate`` for models with gqa_tune's attention, eager or with a compiled decode step.

The same call and the same return as ``torchtune.generation.generate`` (0.6.1): ``prompt`` ``[s]`` or
``[b, s]`` (left-padded with ``pad_id``), and ``(generated_tokens, generated_logits)`` with the prompt
included in the tokens and, with ``stop_tokens``, what follows a row's first stop token set to 0 in
both. Three differences:

* ``temperature=0`` (the default here) is greedy: the argmax of the logits. torchtune divides by 1e-5
  and still samples, which differs from the argmax only where logits are within about 1e-4 of each other.
* The model must use gqa_tune's ``MultiHeadAttention`` (a torchtune model after ``swap_attention``).
  Caches that are not set up are set up for the call and deleted afterwards; caches that are set up
  are reset and used, and must be large enough.
* ``compile=True`` compiles the decode step once, gpt-fast style: every tensor it sees has a fixed
  shape (the token ``[b, 1]``, the key-validity row ``[b, max_cache_len]``, the slot counter ``[1]``),
  the mask and the RoPE positions are computed inside the graph from the slot counter, and the loop
  reads nothing back from the device except every :data:`STOP_CHECK_EVERY` steps, when stop tokens are
  given (every step for a model with sliding-window ring caches, which cannot rewind). Steps past the
  point where every row has stopped are dropped, so the tokens returned are those the eager loop returns.
  (gqa_tune's ``KVCache`` checks each compiled write against its fill, read on the host: free on a CPU,
  one small sync per layer and step on a GPU.)

Timings go to a :class:`GenerationStats` passed as ``stats=``; the compile (the first, untimed call
of the compiled step) is reported on its own and left out of the rates.

Notation: ``b`` batch, ``s`` prompt length, ``n`` generated tokens, ``v`` vocabulary, ``L`` the
caches' length (``max_cache_len``).
"""

import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torchtune.data import Message
from torchtune.modules import MultiHeadAttention as TorchtuneMultiHeadAttention
from torchtune.modules import TransformerCrossAttentionLayer, TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

from gqa_tune import _checks as checks
from gqa_tune.modules.attention import MultiHeadAttention
from gqa_tune.modules.kv_cache import KVCache
from gqa_tune.ops.kv_quant import resolve_kv_cache_dtype

#: With ``compile=True`` and stop tokens, the host looks at the tokens once every this many steps.
STOP_CHECK_EVERY = 8


@dataclass
class GenerationStats:
    """What one :func:`generate` call measured (filled in by ``generate(..., stats=GenerationStats())``).

    Attributes:
        compiled (bool): whether the decode step ran compiled.
        compile_seconds (float): the first call of the compiled step (compilation, or only a cache
            lookup when it was compiled by an earlier call), untimed by the rates; 0.0 when eager.
        prefill_tokens (int): ``b * s`` (padding included).
        prefill_seconds (float): the prompt's forward pass and the first token's sampling.
        decode_steps (int): decode steps run (with ``compile=True`` and stop tokens, up to
            ``STOP_CHECK_EVERY - 1`` more than the tokens returned need; their tokens are dropped).
        decode_tokens (int): ``b * decode_steps``.
        decode_seconds (float): the decode loop.
        kv_cache_bytes (int): bytes the model's KV caches held (:func:`kv_cache_bytes`).
    """

    compiled: bool = False
    compile_seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    kv_cache_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def decode_ms_per_step(self) -> float:
        return self.decode_seconds / self.decode_steps * 1e3 if self.decode_steps else 0.0


def _sample(logits: torch.Tensor, q: Optional[torch.Tensor], temperature: float, top_k: Optional[int]) -> torch.Tensor:
    """``[b, v]`` logits -> ``[b, 1]`` int64 ids: the argmax at temperature 0, else torchtune's ``sample``
    (top-k pruning, softmax, then the argmax of ``probs / q`` for exponential noise ``q`` ``[b, v]``)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / max(temperature, 1e-5)  # torchtune's floor
    if top_k is not None:
        pivot = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = torch.where(logits < pivot, -float("inf"), logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


#: Linear layers on at most this many rows (a decode step's ``b`` tokens) run as ``(W @ x.T).T`` on CPU.
SKINNY_ROWS = 16


class _SkinnyLinear(TorchFunctionMode):
    """``F.linear`` on a few rows as ``(W @ x.T).T``: the same products, summed in another order.

    A decode step is mostly such products. On the CPU this was written on (torch 2.13, MKL), the 28
    layer projections of a 4-layer, width-512 model (46 MiB) on 4 rows took 3.2 ms this way against
    5.0 ms as ``x @ W.T`` on one thread, and 3 ms against 23 ms of CPU time on two threads of a
    shared machine. ``torch.compile`` traces the mode like the rest of the step.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            # Plain weights only: a torchao quantized weight (a tensor subclass) has its own linear kernel,
            # which this rewrite would bypass (and Dynamo cannot trace ``W @ x.T`` through it).
            plain = type(weight) in (torch.Tensor, nn.Parameter)
            if plain and x.device.type == "cpu" and x.dim() >= 2 and weight.dim() == 2 and 0 < rows <= SKINNY_ROWS:
                out = (weight @ x.reshape(rows, x.shape[-1]).t()).t()  # [rows, out]
                out = out.reshape(*x.shape[:-1], weight.shape[0])
                return out if bias is None else out + bias
        return func(*args, **kwargs)


def _decode_step(
    model: TransformerDecoder,
    token: torch.Tensor,
    slot: torch.Tensor,
    valid: torch.Tensor,
    pos_offset: torch.Tensor,
    slots: torch.Tensor,
    q: Optional[torch.Tensor],
    temperature: float,
    top_k: Optional[int],
    encoder_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token per row through ``model``, and the next one sampled.

    Every tensor has a fixed shape, so the compiled step is one graph for the whole loop.

    Args:
        token (torch.Tensor): ``[b, 1]`` int64, the last sampled tokens.
        slot (torch.Tensor): ``[1]`` int64, the cache slot they go to; advanced by one, in place.
        valid (torch.Tensor): ``[b, L]`` bool, False at the prompt's padding.
        pos_offset (torch.Tensor): ``[b]`` int64, RoPE position minus slot (minus each row's padding).
        slots (torch.Tensor): ``arange(L)``.
        q (Optional[torch.Tensor]): ``[b, v]`` exponential noise (sampling), or ``None`` (greedy).
        encoder_mask (Optional[torch.Tensor]): ``[b, 1, s_enc]`` for a decoder with cross-attention.

    Returns:
        ``(next_token [b, 1] int64, logits [b, v])``.
    """
    mask = (valid & (slots <= slot))[:, None, :]  # [b, 1, L]: the real tokens up to this one
    input_pos = (pos_offset + slot)[:, None]  # [b, 1]
    logits = model(token, mask=mask, input_pos=input_pos, encoder_mask=encoder_mask)[:, -1]  # [b, v]
    slot.add_(1)
    return _sample(logits, q, temperature, top_k), logits


def _skinny_decode_step(*args) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_decode_step` with the few-row linears of :class:`_SkinnyLinear` (what ``compile=True`` compiles;
    eagerly, the mode's Python call per op would cost more than it saves)."""
    with _SkinnyLinear():
        return _decode_step(*args)


_COMPILED_STEP: Optional[Callable] = None


def _compiled_step() -> Callable:
    """The decode step compiled once per process (``dynamic=False``: one graph per model and shape)."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_skinny_decode_step, dynamic=False, fullgraph=True)
    return _COMPILED_STEP


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(
    model, prompt, max_generated_tokens, pad_id, temperature, top_k, stop_tokens, rng, compile, stats
) -> List[MultiHeadAttention]:
    """``ValueError`` naming the value for anything a caller can get wrong; the model's attention layers."""
    if not isinstance(model, TransformerDecoder):
        raise ValueError(f"model must be a torchtune TransformerDecoder, got {type(model).__name__}")
    if not _is_int(max_generated_tokens) or max_generated_tokens < 1:
        raise ValueError(f"max_generated_tokens must be an int >= 1, got {max_generated_tokens!r}")
    if not isinstance(prompt, torch.Tensor):
        raise ValueError(f"prompt must be a 1-D [s] or 2-D [b, s] tensor of token ids, got {type(prompt).__name__}")
    if prompt.dim() not in (1, 2) or prompt.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            "prompt must be a 1-D [s] or 2-D [b, s] int32/int64 tensor of token ids, got "
            f"{prompt.dtype} {tuple(prompt.shape)}"
        )
    if prompt.numel() == 0:
        raise ValueError(f"prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
    if not _is_int(pad_id):
        raise ValueError(f"pad_id must be an int, got {pad_id!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not (0.0 <= float(temperature) < float("inf"))
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if stop_tokens is not None and (
        not isinstance(stop_tokens, (list, tuple)) or not all(_is_int(t) for t in stop_tokens)
    ):
        raise ValueError(f"stop_tokens must be None or a list of ints, got {stop_tokens!r}")
    if rng is not None and not isinstance(rng, torch.Generator):
        raise ValueError(f"rng must be None or a torch.Generator, got {type(rng).__name__}")
    checks.flag("compile", compile)
    if stats is not None and not isinstance(stats, GenerationStats):
        raise ValueError(f"stats must be None or a GenerationStats, got {type(stats).__name__}")
    theirs = [type(m).__name__ for m in model.modules() if isinstance(m, TorchtuneMultiHeadAttention)]
    if theirs:
        raise ValueError(
            f"the model still has {len(theirs)} torchtune {theirs[0]} layer(s); "
            "convert it with gqa_tune.swap_attention(model) first"
        )
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError("the model has no gqa_tune MultiHeadAttention layer; build it with gqa_tune's builders")
    param = next(model.parameters(), None)
    if param is not None and prompt.device != param.device:
        raise ValueError(f"prompt is on {prompt.device}, the model on {param.device}")
    vocab = model.tok_embeddings.num_embeddings
    low, high = int(prompt.min()), int(prompt.max())  # one host read, before anything runs
    if low < 0 or high >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) (the vocabulary), got {low}..{high}")
    check_stop_tokens(stop_tokens, vocab)
    return layers


def check_stop_tokens(stop_tokens: Optional[Sequence[int]], vocab: int) -> None:
    """``ValueError`` naming them if any of ``stop_tokens`` lies outside ``[0, vocab)``: the model can never
    produce such a token, so generation would silently run every step to the end."""
    outside = [t for t in stop_tokens or () if not 0 <= t < vocab]
    if outside:
        raise ValueError(
            f"stop_tokens {outside} lie outside the vocabulary [0, {vocab}): the model never generates them"
        )


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _check_caches(model: TransformerDecoder, layers: List[MultiHeadAttention], batch: int, total: int) -> None:
    """Caches the caller set up must be enabled and hold ``batch`` rows of ``total`` positions."""
    if not model.caches_are_enabled():
        raise ValueError("the model's KV caches are set up but disabled (disable_kv_cache); enable them to generate")
    for layer in layers:
        cache = layer.kv_cache
        if not isinstance(cache, KVCache):
            raise ValueError(f"the model's caches must be gqa_tune KVCaches, got {type(cache).__name__}")
        if cache.batch_size < batch or cache.max_seq_len < total:
            raise ValueError(
                f"the model's KV caches hold batch_size {cache.batch_size} x max_seq_len {cache.max_seq_len}; "
                f"this call needs batch {batch} x {total} positions (prompt + max_generated_tokens): "
                "set them up larger, or delete them (torchtune.modules.common_utils.delete_kv_caches) and "
                "let generate set them up"
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: TransformerDecoder,
    prompt: torch.Tensor,
    max_generated_tokens: int,
    *,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    rng: Optional[torch.Generator] = None,
    compile: bool = False,
    stats: Optional[GenerationStats] = None,
    on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
    kv_cache_dtype: Optional[Union[torch.dtype, str]] = None,
    encoder_input: Optional[torch.Tensor] = None,
    encoder_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate up to ``max_generated_tokens`` tokens per row, as ``torchtune.generation.generate`` does.

    Args:
        model (TransformerDecoder): a torchtune decoder whose attention is gqa_tune's ``MultiHeadAttention``.
        prompt (torch.Tensor): ``[s]`` or ``[b, s]`` int32/int64 token ids; shorter prompts left-padded with
            ``pad_id`` (every ``pad_id`` token is padding: masked out, and positions restart at the first
            real token, as in torchtune).
        max_generated_tokens (int): tokens to generate per row (fewer if every row hits a stop token).
        pad_id (int): the padding token.
        temperature (float): 0: greedy (argmax); otherwise the logits are divided by it and sampled.
        top_k (Optional[int]): sample only among the ``top_k`` largest logits.
        stop_tokens (Optional[Sequence[int]]): a row stops at the first of these; generation ends when
            every row has stopped. Tokens (and logits) after a row's stop token are 0.
        rng (Optional[torch.Generator]): the noise of sampling, drawn per step as torchtune draws it
            (``[b, v]`` exponential); ``None``: torch's global generator.
        compile (bool): compile the decode step once (``torch.compile``, fixed shapes, no recompiles
            between steps); the first call per model and shape compiles, which ``stats`` reports apart.
        stats (Optional[GenerationStats]): filled with the timings (prefill and decode tokens/s).
        on_tokens (Optional[Callable]): called with each step's new tokens ``[b]`` as they come (to stream
            them); with ``compile=True`` it reads each step's tokens on the host.
        kv_cache_dtype (Optional): caches set up for the call store K/V quantized in this dtype
            (``torch.int8``, ``torch.float8_e4m3fn`` or their names; :class:`gqa_tune.KVCache`); ``None``: in the
            model's dtype. Caches already set up are used as they are (and must be of this dtype when given).
        encoder_input (Optional[torch.Tensor]): ``[b, s_enc, d]`` for a decoder with cross-attention layers
            (torchtune's ``TransformerCrossAttentionLayer``, e.g. :meth:`gqa_tune.models.GQATransformerLM.as_decoder`):
            given with the prompt, then held in the cross-attention caches (``s_enc`` positions).
        encoder_mask (Optional[torch.Tensor]): bool ``[b, s, s_enc]`` (True = attend) for the prompt, as
            torchtune's; each decode step uses its last row. Required with ``encoder_input`` (torchtune's rule).

    Returns:
        ``(generated_tokens, generated_logits)``: ``[b, s + n]`` (the prompt, then ``n <=
        max_generated_tokens`` tokens; dtype of ``cat(prompt, int32)``) and ``[b, n, v]`` in the model's
        dtype. A 1-D prompt gives ``b = 1``.

    Raises:
        ValueError: a bad argument (named with its value), a model without gqa_tune attention, caches
            that are set up but too small or disabled, or prompt + max_generated_tokens longer than the
            model's ``max_seq_len``.

    Example:
        >>> model = gqa_tune.models.gqa_tiny()
        >>> tokens, logits = gqa_tune.generate(model, torch.tensor([1, 2, 3]), 8, compile=True)
    """
    layers = _check_args(
        model, prompt, max_generated_tokens, pad_id, temperature, top_k, stop_tokens, rng, compile, stats
    )
    if on_tokens is not None and not callable(on_tokens):
        raise ValueError(f"on_tokens must be None or a callable, got {type(on_tokens).__name__}")
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    temperature = float(temperature)
    prompt = prompt.view(1, -1) if prompt.dim() == 1 else prompt
    b, s = prompt.shape
    own = _check_encoder(model, layers, b, s, encoder_input, encoder_mask, compile)
    total = s + max_generated_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"prompt length {s} + max_generated_tokens {max_generated_tokens} = {total} exceeds the model's "
            f"max_seq_len {model.max_seq_len}"
        )
    device = prompt.device
    encoder = dict(encoder_input=encoder_input, encoder_mask=encoder_mask)
    if model.caches_are_setup():
        _check_caches(model, own, b, total)
        held = {layer.kv_cache.kv_cache_dtype for layer in layers}
        if kv_cache_dtype is not None and held != {kv_cache_dtype}:
            raise ValueError(
                f"kv_cache_dtype {kv_cache_dtype}: the model's caches are set up with {sorted(map(str, held))}; "
                "delete them or leave kv_cache_dtype out"
            )
        model.reset_caches()
        return _generate(model, own, prompt, max_generated_tokens, pad_id, temperature, top_k,
                         stop_tokens, rng, compile, stats, on_tokens, **encoder)  # fmt: skip
    cache_dtype = kv_cache_dtype or _model_dtype(model)  # a quantized dtype: MultiHeadAttention stores K/V in it
    s_enc = None if encoder_input is None else encoder_input.shape[1]
    with local_kv_cache(model, batch_size=b, device=device, dtype=cache_dtype, decoder_max_seq_len=total,
                        encoder_max_seq_len=s_enc):  # fmt: skip
        return _generate(model, own, prompt, max_generated_tokens, pad_id, temperature, top_k,
                         stop_tokens, rng, compile, stats, on_tokens, **encoder)  # fmt: skip


def _check_encoder(model, layers, b, s, encoder_input, encoder_mask, compile) -> List[MultiHeadAttention]:
    """``ValueError`` for encoder inputs that do not fit; the self-attention layers (the cross-attention ones
    hold the encoder's positions, not the generated ones)."""
    cross = {id(m.attn) for m in model.modules() if isinstance(m, TransformerCrossAttentionLayer)}
    if encoder_input is None:
        if encoder_mask is not None:
            raise ValueError("encoder_mask was given without encoder_input")
        return [layer for layer in layers if id(layer) not in cross]
    if not cross:
        raise ValueError("encoder_input needs a model with cross-attention layers (TransformerCrossAttentionLayer)")
    if compile:
        raise ValueError("compile=True does not take encoder_input yet: generate eagerly (compile=False)")
    if not isinstance(encoder_input, torch.Tensor) or encoder_input.dim() != 3 or encoder_input.shape[0] != b:
        raise ValueError(f"encoder_input must be [b={b}, s_enc, d], got {tuple(getattr(encoder_input, 'shape', ()))}")
    expected = (b, s, encoder_input.shape[1])
    if not isinstance(encoder_mask, torch.Tensor) or encoder_mask.dtype != torch.bool or (
        tuple(encoder_mask.shape) != expected
    ):
        got = None if encoder_mask is None else f"{encoder_mask.dtype} {tuple(encoder_mask.shape)}"
        raise ValueError(f"encoder_mask must be bool [b, s, s_enc] = {list(expected)} with encoder_input, got {got}")
    return [layer for layer in layers if id(layer) not in cross]


def _generate(
    model: TransformerDecoder,
    layers: List[MultiHeadAttention],
    prompt: torch.Tensor,
    max_generated_tokens: int,
    pad_id: int,
    temperature: float,
    top_k: Optional[int],
    stop_tokens: Optional[Sequence[int]],
    rng: Optional[torch.Generator],
    compile: bool,
    stats: Optional[GenerationStats],
    on_tokens: Optional[Callable[[torch.Tensor], None]] = None,
    encoder_input: Optional[torch.Tensor] = None,
    encoder_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loop, with the caches set up, enabled and empty (``layers``: the self-attention ones)."""
    b, s = prompt.shape
    device = prompt.device
    cache_len = layers[0].kv_cache.max_seq_len
    vocab = model.tok_embeddings.num_embeddings
    dtype = _model_dtype(model)
    stats = stats if stats is not None else GenerationStats()

    # Which keys are real (False at padding), and each row's RoPE position minus its cache slot.
    real = prompt != pad_id  # [b, s]
    valid = torch.ones(b, cache_len, dtype=torch.bool, device=device)
    valid[:, :s] = real
    pos_offset = (real.sum(-1) - s).to(torch.long)  # [b]: positions restart at the first real token
    slots = torch.arange(cache_len, device=device)

    noise_dtype = torch.get_default_dtype() if rng is not None else dtype

    def noise() -> Optional[torch.Tensor]:
        """torchtune's sampling noise, drawn as it draws it (generator, dtype and shape)."""
        if temperature == 0.0:
            return None
        return torch.empty((b, vocab), dtype=noise_dtype, device=device).exponential_(1, generator=rng)

    step = _compiled_step() if compile else _decode_step
    stats.compiled = compile
    if compile:
        # The first call compiles (or finds the graph of an earlier call); on the empty caches, which are
        # then emptied again, so it changes nothing and stays out of the timings.
        _sync(device)
        start = time.perf_counter()
        dummy_noise = None if temperature == 0.0 else torch.ones((b, vocab), dtype=noise_dtype, device=device)
        step(model, prompt[:, -1:].to(torch.long).contiguous(), torch.zeros(1, dtype=torch.long, device=device),
             valid, pos_offset, slots, dummy_noise, temperature, top_k, None)  # fmt: skip
        model.reset_caches()
        _sync(device)
        stats.compile_seconds = time.perf_counter() - start

    # Prefill, eagerly: torchtune's causal mask over the real tokens [b, s, L], positions from the padding.
    _sync(device)
    start = time.perf_counter()
    causal = torch.ones(s, cache_len, dtype=torch.bool, device=device).tril()
    mask = causal[None] & valid[:, None, :]
    mask.diagonal(dim1=1, dim2=2).fill_(True)  # a padding token sees itself (torchtune's rule)
    positions = ((real.cumsum(-1) - 1) * real).to(torch.long)  # [b, s]
    logits = model(prompt, mask=mask, input_pos=positions, encoder_input=encoder_input, encoder_mask=encoder_mask)
    logits = logits[:, -1]  # [b, v]
    step_encoder_mask = None if encoder_mask is None else encoder_mask[:, -1:]  # [b, 1, s_enc]
    token = _sample(logits, noise(), temperature, top_k)  # [b, 1] int64
    tokens, all_logits = [token], [logits]
    _sync(device)
    stats.prefill_seconds = time.perf_counter() - start
    stats.prefill_tokens = b * s
    stats.kv_cache_bytes = kv_cache_bytes(model)
    if on_tokens is not None:
        on_tokens(token[:, 0])

    # Decode: one token per step; the host looks at the tokens only to stop early.
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device) if stop_tokens else None
    # A ring (sliding-window) cache cannot rewind steps run past the end, so there the host looks every step.
    rings = any(layer.kv_cache.window is not None for layer in layers)
    check_every = STOP_CHECK_EVERY if compile and not rings else 1
    done = torch.zeros(b, dtype=torch.bool, device=device)
    checked = 0  # tokens already looked at

    def all_stopped() -> bool:
        nonlocal done, checked
        done = done | torch.isin(torch.cat(tokens[checked:], dim=1), stops).any(dim=1)
        checked = len(tokens)
        return bool(done.all())

    slot = torch.full((1,), s, dtype=torch.long, device=device)
    start = time.perf_counter()
    steps = 0
    if stops is None or not all_stopped():
        while len(tokens) < max_generated_tokens:
            token, logits = step(
                model, token, slot, valid, pos_offset, slots, noise(), temperature, top_k, step_encoder_mask
            )
            tokens.append(token)
            all_logits.append(logits)
            if on_tokens is not None:
                on_tokens(token[:, 0])
            steps += 1
            if stops is not None and (steps % check_every == 0 or len(tokens) == max_generated_tokens):
                if all_stopped():
                    break
    _sync(device)
    stats.decode_seconds = time.perf_counter() - start
    stats.decode_steps = steps
    stats.decode_tokens = b * steps

    generated = torch.cat(tokens, dim=1)  # [b, n_run]
    gen_logits = torch.stack(all_logits, dim=1)  # [b, n_run, v]
    if stops is not None:
        hit = torch.isin(generated, stops)  # [b, n_run]
        before = hit.cumsum(dim=1) - hit.to(torch.long)  # stop tokens strictly before each token
        keep = before == 0
        # torchtune ends at the first step after which every row has stopped.
        finished = (hit.cumsum(dim=1) > 0).all(dim=0)  # [n_run]
        n = int(finished.to(torch.int8).argmax()) + 1 if bool(finished.any()) else generated.shape[1]
        if n < len(tokens):  # compiled steps past the end: drop them, and forget their cache positions
            generated, gen_logits, keep = generated[:, :n], gen_logits[:, :n], keep[:, :n]
            for layer in layers:
                layer.kv_cache.truncate(s + n - 1)  # as the eager loop leaves them
        generated = generated * keep
        gen_logits = gen_logits * keep[..., None].to(gen_logits.dtype)
    out_dtype = torch.promote_types(prompt.dtype, torch.int32)
    return torch.cat([prompt.to(out_dtype), generated.to(out_dtype)], dim=1), gen_logits


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


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` renders a chat template (:class:`gqa_tune.data.HFTokenizer` with one)."""
    return getattr(tokenizer, "chat_template", None) is not None


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> List[List[int]]:
    """Token ids of each prompt: after BOS (``chat=False``), or as a user message through the tokenizer's chat
    template followed by its generation prompt (``chat=True``)."""
    if not chat:
        return [tokenizer.encode(p, add_bos=True, add_eos=False) for p in prompts]
    if not has_chat_template(tokenizer):
        raise ValueError(f"chat prompts need a tokenizer with a chat template, not {type(tokenizer).__name__}")
    return [tokenizer.tokenize_messages([Message("user", p, masked=True)], add_end_tokens=False)[0] for p in prompts]


def padding_id(prompts: Sequence[Sequence[int]], tokenizer: Any) -> int:
    """An id to left-pad ``prompts`` with: ``tokenizer.pad_id`` unless a prompt holds it (generation takes every
    ``pad_id`` token for padding; a chat template may end every turn with the pad token), else the first of the
    tokenizer's special ids that no prompt holds.

    Raises:
        ValueError: every candidate occurs in a prompt.
    """
    used = {int(t) for row in prompts for t in row}
    specials = sorted(getattr(tokenizer, "special_tokens", {}).values())
    for candidate in [tokenizer.pad_id, *specials]:
        if isinstance(candidate, int) and candidate not in used:
            return candidate
    raise ValueError(f"every padding candidate ({[tokenizer.pad_id, *specials]}) occurs in a prompt: left padding "
                     "would hide prompt tokens")  # fmt: skip


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """``[b, s]`` int64: the prompts' token ids, each left-padded with ``pad_id`` to the longest (what
    :func:`generate` takes).

    Raises:
        ValueError: no prompts, or an empty one.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        batch[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
    return batch


def new_tokens(tokens: torch.Tensor, prompt_len: int, stop_tokens: Sequence[int]) -> Tuple[List[List[int]], List[bool]]:
    """``(ids, stopped)`` per row of :func:`generate`'s ``tokens``: the generated ids up to (not including) the
    row's first stop token, and whether the row stopped at one (rather than at ``max_generated_tokens``)."""
    stops = set(stop_tokens)
    rows, stopped = [], []
    for row in tokens[:, prompt_len:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
        stopped.append(cut < len(row))
    return rows, stopped
