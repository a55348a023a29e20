"""MHA -> GQA conversion: pool the key/value heads of each group (Ainslie et al., 2023).

The paper turns a multi-head checkpoint into a grouped one by mean-pooling
the key and value projection heads within each group, then uptraining. With
``n_kv`` current kv heads and ``new`` target heads, group ``j`` is made of the
current heads ``j * r .. (j + 1) * r - 1`` with ``r = n_kv // new``, so query
head ``i`` (which used kv head ``i // (n_h // n_kv)``) now uses kv head
``i // (n_h // new)``: the contiguous grouping that torch's ``enable_gqa``,
Llama's ``repeat_kv`` and torchtune's expand all assume.

Methods: ``"mean"`` (the paper), ``"first"`` (keep the first head of each
group), ``"random"`` (a fresh initialization, for the ablation).
Converting to the current number of kv heads is the identity for every method.
"""

from typing import Dict, Mapping, Optional

import torch

from gqa_tune import _checks as checks
from gqa_tune.modules.kv_cache import KVCache

METHODS = ("mean", "first", "random")


def check_conversion(num_kv_heads: int, new_num_kv_heads: int, method: str) -> None:
    """Raise ``ValueError`` unless ``new_num_kv_heads`` divides ``num_kv_heads`` and ``method`` is known."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {', '.join(METHODS)}")
    checks.positive_int("num_kv_heads", new_num_kv_heads)
    checks.positive_int("the current num_kv_heads", num_kv_heads)
    if new_num_kv_heads > num_kv_heads:
        raise ValueError(f"cannot convert to more kv heads ({new_num_kv_heads}) than the model has ({num_kv_heads})")
    if num_kv_heads % new_num_kv_heads != 0:
        raise ValueError(f"num_kv_heads {new_num_kv_heads} does not divide the current {num_kv_heads} kv heads")


def pool_heads(
    t: torch.Tensor,
    num_kv_heads: int,
    new_num_kv_heads: int,
    head_dim: int,
    method: str = "mean",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Pool a k/v projection weight ``[n_kv * h_d, d]`` (or bias ``[n_kv * h_d]``) to ``new`` heads.

    Returns ``[new * h_d, d]`` (or ``[new * h_d]``) in ``t``'s dtype; pooling runs in float32.
    """
    check_conversion(num_kv_heads, new_num_kv_heads, method)
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
        got = f"a tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"
        raise ValueError(f"t must be a k/v projection weight tensor [n_kv * h_d, d] or bias [n_kv * h_d], got {got}")
    checks.positive_int("head_dim", head_dim)
    _check_generator(generator)
    if t.shape[0] != num_kv_heads * head_dim:
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} is not {num_kv_heads} heads x head_dim {head_dim} on its first dim"
        )
    if new_num_kv_heads == num_kv_heads:
        return t.clone()
    ratio = num_kv_heads // new_num_kv_heads
    grouped = t.float().reshape(new_num_kv_heads, ratio, head_dim, *t.shape[1:])  # [new, r, h_d, ...]
    if method == "mean":
        pooled = grouped.mean(dim=1)
    elif method == "first":
        pooled = grouped[:, 0]
    else:
        if t.dim() == 1:
            pooled = torch.zeros_like(grouped[:, 0])
        else:
            fan_in = t.shape[1]
            bound = fan_in**-0.5  # nn.Linear's default init range
            device = generator.device if generator is not None else t.device  # a generator draws on its own device
            pooled = torch.empty(grouped[:, 0].shape, device=device).uniform_(-bound, bound, generator=generator)
            pooled = pooled.to(t.device)
    return pooled.reshape(new_num_kv_heads * head_dim, *t.shape[1:]).to(t.dtype)


def convert_state_dict(
    state_dict: Dict[str, torch.Tensor],
    *,
    num_kv_heads: int,
    new_num_kv_heads: int,
    head_dim: int,
    method: str = "mean",
    fmt: str = "torchtune",
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """Pool every layer's key/value projections in a state dict; other entries are kept.

    Args:
        state_dict: torchtune (``layers.{i}.attn.k_proj.weight``) or Hugging Face
            Llama (``model.layers.{i}.self_attn.k_proj.weight``) format; biases too.
        num_kv_heads: kv heads now; ``new_num_kv_heads`` must divide it.
        head_dim: per-head width.
        method: ``"mean"``, ``"first"`` or ``"random"``.
        fmt: ``"torchtune"`` or ``"hf"``.
        seed: for ``"random"``.
        generator: for ``"random"``, instead of ``seed`` (to draw one stream over several shards).

    Raises:
        ValueError: a bad target or method, an unknown format, a state dict with
            no k/v projections of that format, a k/v tensor that is not
            ``num_kv_heads x head_dim`` rows (the key is named), or k/v entries
            other than ``weight``/``bias`` (e.g. unmerged LoRA ``lora_a``/``lora_b``).
    """
    check_conversion(num_kv_heads, new_num_kv_heads, method)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    _check_seed(seed)
    _check_generator(generator)
    markers = {"torchtune": (".attn.k_proj.", ".attn.v_proj."), "hf": (".self_attn.k_proj.", ".self_attn.v_proj.")}
    if fmt not in markers:
        raise ValueError(f"unknown state-dict format {fmt!r}; choose 'torchtune' or 'hf'")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    out, found = {}, 0
    for key, value in state_dict.items():
        marker = next((m for m in markers[fmt] if m in key), None)
        if marker is None:
            out[key] = value
            continue
        if key.rsplit(marker, 1)[1] not in ("weight", "bias"):
            raise ValueError(
                f"cannot pool {key!r}: only plain key/value projection weights and biases can be pooled "
                "(merge LoRA adapters or dequantize first)"
            )
        try:
            out[key] = pool_heads(value, num_kv_heads, new_num_kv_heads, head_dim, method, generator)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err
        found += 1
    if found == 0:
        raise ValueError(f"no key/value projection weights of {fmt!r} format found (e.g. '*{markers[fmt][0]}weight')")
    return out


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def _check_projections(attn: torch.nn.Module) -> None:
    for name in ("k_proj", "v_proj"):
        linear = getattr(attn, name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(
                f"cannot resize a {type(linear).__name__} {name} (key/value projection); convert before wrapping "
                "it (e.g. merge LoRA adapters first, or convert the base model and add LoRA afterwards)"
            )


def pooled_linear(
    linear: torch.nn.Module, num_kv_heads: int, new: int, head_dim: int, method: str, generator=None
) -> torch.nn.Linear:
    """A new ``nn.Linear`` whose output heads are ``linear``'s pooled to ``new`` (see :func:`pool_heads`).

    Raises:
        ValueError: if ``linear`` is not a plain ``nn.Linear`` (e.g. a ``LoRALinear``).
    """
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(
            f"cannot resize a {type(linear).__name__} key/value projection; convert before wrapping it "
            "(e.g. merge LoRA adapters first, or convert the base model and add LoRA afterwards)"
        )
    new_linear = torch.nn.Linear(
        linear.in_features, new * head_dim, bias=linear.bias is not None,
        device=linear.weight.device, dtype=linear.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new_linear.weight.copy_(pool_heads(linear.weight, num_kv_heads, new, head_dim, method, generator))
        if linear.bias is not None:
            new_linear.bias.copy_(pool_heads(linear.bias, num_kv_heads, new, head_dim, method, generator))
    new_linear.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        new_linear.bias.requires_grad_(linear.bias.requires_grad)
    return new_linear


def _check_attention(attn: torch.nn.Module, num_kv_heads: int, method: str) -> None:
    check_conversion(attn.num_kv_heads, num_kv_heads, method)
    if attn.num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({attn.num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    _check_projections(attn)


def _converted(attn: torch.nn.Module, num_kv_heads: int, method: str, generator: torch.Generator):
    """``(k_proj, v_proj, kv_cache)`` of ``attn`` with ``num_kv_heads`` heads, nothing assigned yet: the pooled
    projections and, where it has a KV cache, an empty one like it (positions, window, storage dtype, device)."""
    old = attn.num_kv_heads
    k_proj = pooled_linear(attn.k_proj, old, num_kv_heads, attn.head_dim, method, generator)
    v_proj = pooled_linear(attn.v_proj, old, num_kv_heads, attn.head_dim, method, generator)
    cache = attn.kv_cache
    if cache is None:
        return k_proj, v_proj, None
    batch, _, _, head_dim = cache.k_cache.shape
    if isinstance(cache, KVCache):
        new_cache = KVCache(
            batch, cache.max_seq_len, num_kv_heads, head_dim, cache.dtype, device=cache.k_cache.device,
            window=cache.window, kv_cache_dtype=cache.kv_cache_dtype,
        )  # fmt: skip
    else:  # torchtune's KVCache
        new_cache = type(cache)(batch, cache.k_cache.shape[2], num_kv_heads, head_dim, cache.k_cache.dtype)
        new_cache.to(cache.k_cache.device)
    return k_proj, v_proj, new_cache


def convert_attention_(attn: torch.nn.Module, num_kv_heads: int, method: str = "mean", seed: int = 0) -> None:
    """Convert one attention module (gqa_tune's or torchtune's ``MultiHeadAttention``) in place.

    ``k_proj``/``v_proj`` are replaced by pooled ``nn.Linear``s, ``num_kv_heads``
    is updated, and an existing KV cache is replaced by an empty one with the
    new head count (same batch, positions, window, dtype and storage; enabled as before).
    The new projections are new parameters: build optimizers afterwards.

    Raises:
        ValueError: a bad target, method or seed, or k/v projections that are not
            ``nn.Linear`` (e.g. ``LoRALinear``); the module is then unchanged.
    """
    _check_attention(attn, num_kv_heads, method)
    _check_seed(seed)
    k_proj, v_proj, cache = _converted(attn, num_kv_heads, method, torch.Generator().manual_seed(seed))
    _assign(attn, num_kv_heads, k_proj, v_proj, cache)


def _assign(attn: torch.nn.Module, num_kv_heads: int, k_proj, v_proj, cache) -> None:
    attn.k_proj, attn.v_proj, attn.num_kv_heads = k_proj, v_proj, num_kv_heads
    if cache is not None:
        attn.kv_cache = cache


def convert_model_(model: torch.nn.Module, num_kv_heads: int, method: str = "mean", seed: int = 0) -> int:
    """Convert every attention module of ``model`` that has ``k_proj``/``v_proj`` and ``num_kv_heads``.

    Works on gqa_tune and plain torchtune models. Returns how many modules were converted.
    Every module's new parts are built before any is assigned, so a rejected request leaves ``model`` as it
    was.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_seed(seed)
    targets = [
        m for m in model.modules()
        if hasattr(m, "num_kv_heads") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    ]  # fmt: skip
    if not targets:
        raise ValueError(f"{type(model).__name__} has no attention modules with k_proj/v_proj to convert")
    for attn in targets:
        _check_attention(attn, num_kv_heads, method)
    parts = [
        _converted(attn, num_kv_heads, method, torch.Generator().manual_seed(seed + index))
        for index, attn in enumerate(targets)
    ]
    for attn, (k_proj, v_proj, cache) in zip(targets, parts):
        _assign(attn, num_kv_heads, k_proj, v_proj, cache)
    return len(targets)
